"""ATTEMPT: a target prompt plus per-input attention over frozen source prompts (saved prompt deltas)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import build, inputs, logits
from unipelt.core import deltas


def _sources(family: str, folder: Path, count: int = 2, length: int = 3) -> list[str]:
    """Prompt deltas of ``count`` "source tasks" (random prompts stand in for trained ones)."""
    out = []
    for i in range(count):
        model = build(family)
        torch.manual_seed(10 + i)
        unipelt.attach(model, {"method": "prompt", "length": length, "init": "random"})
        with torch.no_grad():
            deltas(model)["prompt"].embedding.normal_(0, 1.0)
        out.append(str(unipelt.save(model, folder / f"source{i}")))
    return out


def _attempt(family: str, sources: list[str], **extra) -> torch.nn.Module:
    model = build(family)
    torch.manual_seed(0)
    return unipelt.attach(model, {"method": "attempt", "length": 3, "sources": sources, "attention_hidden": 8,
                                  **extra})


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "distilbert"])
def test_attempt_invariants(family: str, tmp_path: Path) -> None:
    model = _attempt(family, _sources(family, tmp_path))
    method = deltas(model)["attempt"]
    d = model.config.hidden_size if family != "distilbert" else model.config.dim
    m = 8
    assert unipelt.trainable_parameters(model)["attempt"] == 3 * d + d * m + m * d  # no biases, frozen LayerNorm
    assert "sources" not in dict(method.named_parameters())  # frozen: a buffer, saved with the delta
    batch = inputs(family)
    base = logits(build(family), batch)
    out = logits(model, batch)
    assert (out - base).abs().max() > 1e-6  # a prompt changes the model at init
    # only the target prompt and the attention module (and the head) get gradients
    model.train()
    logits_all = model(**batch).logits
    F.cross_entropy(logits_all.reshape(-1, logits_all.shape[-1]),
                    torch.zeros(logits_all.reshape(-1, logits_all.shape[-1]).shape[0], dtype=torch.long)).backward()
    model.eval()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("attempt.embedding" in n for n in got) and any("attempt.down" in n for n in got)
    assert all(n.startswith("unipelt_deltas.attempt.") or not n.startswith("unipelt_deltas") for n in got)
    # the saved delta is self-contained: it loads without the source folders
    unipelt.save(model, tmp_path / "attempt")
    for source in tmp_path.glob("source*"):
        for f in source.iterdir():
            f.unlink()
    fresh = unipelt.load(build(family), tmp_path / "attempt")
    assert torch.equal(logits(fresh, batch), out)
    assert deltas(fresh)["attempt"].config.n_sources == 2


def test_mixture_is_per_input_and_ignores_padding(tmp_path: Path) -> None:
    model = _attempt("bert", _sources("bert", tmp_path))
    method = deltas(model)["attempt"]
    with torch.no_grad():
        method.up.weight.normal_(0, 1.0)  # an attention that discriminates
        embeds = torch.randn(2, 5, 32)
        prompts = method.row_prompts(embeds, None)
    assert prompts.shape == (2, 3, 32) and not torch.allclose(prompts[0], prompts[1])
    batch = inputs("bert")  # the last row is padded
    together = logits(model, batch)
    length = int(batch["attention_mask"][2].sum())
    alone = logits(model, {k: v[2:3, :length] for k, v in batch.items()})
    torch.testing.assert_close(alone[0], together[2], atol=1e-5, rtol=0)


def test_bad_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(unipelt.ConfigError, match="attempt needs source prompts"):
        unipelt.attach(build("bert"), {"method": "attempt"})
    lora = build("bert")
    unipelt.attach(lora, "lora")
    unipelt.save(lora, tmp_path / "lora")
    with pytest.raises(unipelt.ConfigError, match="is not a prompt-tuning delta"):
        _attempt("bert", [str(tmp_path / "lora")])
    with pytest.raises(unipelt.ConfigError, match="prompts of length 3 and width 32"):
        _attempt("bert", _sources("bert", tmp_path, length=4))
    with pytest.raises(unipelt.DeltaFileError, match="holds no unipelt.json"):
        _attempt("bert", [str(tmp_path / "missing")])
