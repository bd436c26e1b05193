"""LN tuning on RMS norms: the fused path is taken only where it computes the base norm's function."""

from __future__ import annotations

import torch
import torch.nn as nn

import unipelt
from conftest import build, inputs, logits, perturb_
from unipelt.methods.ln_tuning import is_plain_rms_norm


class OffsetRMSNorm(nn.Module):
    """A Gemma-style norm, ``(1 + g) * n(x)``: not ``g * rms_norm(x)``, so it must keep the generic hook."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return ((1 + self.weight.float()) * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") or type(m).__name__ == "T5LayerNorm"]


def _perturb_gains(model: nn.Module, seed: int = 3) -> None:
    perturb_([p for name, p in model.named_parameters() if p.requires_grad and ".gains." in name], seed, 0.2)


def test_llama_and_t5_norms_are_recognised_and_run_fused() -> None:
    for family in ("llama", "t5"):
        model = build(family)
        norms = _norms(model)
        assert norms and all(is_plain_rms_norm(m) for m in norms), family
        unipelt.attach(model, "ln")
        assert all("forward" in m.__dict__ for m in norms), f"{family}: some norm kept the generic hook"


def test_offset_norm_is_not_taken_for_a_plain_rms_norm() -> None:
    norm = OffsetRMSNorm(32)
    assert not is_plain_rms_norm(norm)
    with torch.no_grad():
        norm.weight.normal_()
    assert not is_plain_rms_norm(norm)


def _replace_norms(model: nn.Module) -> int:
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                new = OffsetRMSNorm(child.weight.numel(), child.variance_epsilon)
                with torch.no_grad():
                    new.weight.normal_(0, 0.1)
                setattr(module, name, new)
                count += 1
    return count


def test_identity_and_merge_on_both_paths() -> None:
    """Fused (LLaMA's norm) and hooked (an offset norm): unchanged at init, merged equals unmerged."""
    for offset in (False, True):
        model = build("llama")
        if offset:
            assert _replace_norms(model) > 0
        batch = inputs("llama")
        base = logits(model, batch)
        unipelt.attach(model, "ln")
        assert all(("forward" in m.__dict__) != offset for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
        torch.testing.assert_close(logits(model, batch), base, rtol=0, atol=1e-6)
        _perturb_gains(model)
        tuned = logits(model, batch)
        assert (tuned - base).abs().max() > 1e-3
        unipelt.merge(model)
        torch.testing.assert_close(logits(model, batch), tuned, rtol=1e-5, atol=1e-5)


def test_fused_path_keeps_the_base_dtype_in_bf16() -> None:
    model = build("llama").to(torch.bfloat16)
    batch = inputs("llama")
    norm = _norms(model)[0]
    x = torch.randn(2, 5, norm.weight.numel(), dtype=torch.bfloat16)
    with torch.no_grad():
        expected = norm(x)
    unipelt.attach(model, "ln")
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)
    assert torch.isfinite(logits(model, batch)).all()


def test_only_gains_get_gradients_on_the_fused_path() -> None:
    model = build("llama")
    unipelt.attach(model, "ln")
    out = model(**inputs("llama")).logits
    out.float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".gains." in n or "lm_head" in n or "score" in n for n in grads), sorted(grads)[:5]
    assert any(".gains." in n for n in grads)


def test_two_ln_tasks_serve_one_batch(tmp_path) -> None:
    """Two LN-tuning deltas on one model (the second adds to the norm the first runs): each row equals its
    task alone, on LayerNorm (BERT) and RMSNorm (LLaMA)."""
    for family in ("bert", "llama"):
        folders = {}
        for i, name in enumerate(("a", "b")):
            model = build(family)
            unipelt.attach(model, "ln", train_head=False)
            _perturb_gains(model, seed=10 + i)
            folders[name] = tmp_path / f"{family}-{name}"
            unipelt.save(model, folders[name])
        served = build(family)
        unipelt.load_tasks(served, folders)
        batch = inputs(family)
        task_ids = torch.arange(batch["input_ids"].shape[0]) % 2
        with torch.no_grad():
            mixed = served(**batch, task_ids=task_ids).logits
        for t, name in enumerate(("a", "b")):
            alone = build(family)
            unipelt.load(alone, folders[name])
            rows = task_ids == t
            torch.testing.assert_close(mixed[rows], logits(alone, batch)[rows], rtol=1e-5, atol=1e-5)
