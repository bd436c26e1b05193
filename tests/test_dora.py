"""DoRA, PiSSA and OLoRA as LoRA options: the papers' formulas written out, and ``peft`` for equal weights.

DoRA (Liu et al. 2024, Eq. 5): ``W' = m (W + s B A) / ||W + s B A||_c``, the norm per output unit over the
inputs and constant to the gradient (Section 4.3; peft ``tuners/lora/dora.py``). PiSSA (Meng et al. 2024):
A, B from W's top-r singular triplets; OLoRA (Buyukakyuz 2024): from W's QR; both train on the residual
``W - s B_0 A_0``, which unipelt keeps as a frozen correction instead of writing it into W (peft does the
latter), so ``detach`` gives W back bit for bit. Each comparison with peft perturbs the weights first, and checks
that the outputs moved, so that agreeing means something.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import unipelt  # noqa: E402
from conftest import build, inputs, load_with_peft, logits, perturb_, step  # noqa: E402
from unipelt.core import deltas  # noqa: E402
from unipelt.methods.lora import olora_factors, pissa_factors  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5  # float32 rounding of two orders of the same sums (as tests/test_peft_interop.py)

PEFT_TARGETS = {  # family: (unipelt targets, peft target_modules, fan_in_fan_out)
    "bert": (("query", "value"), ["query", "value"], False),
    "gpt2": (("c_attn",), ["c_attn"], True),  # Conv1D: the weight stored (in, out)
    "llama": (("q_proj", "v_proj"), ["q_proj", "v_proj"], False),  # no biases
}


def ours(name: str, seed: int = 0, **options) -> nn.Module:
    targets = PEFT_TARGETS[name][0]
    torch.manual_seed(seed)
    return unipelt.attach(build(name), {"method": "lora", "r": 4, "alpha": 8, "targets": list(targets), **options},
                          train_head=False)


def peft_model(name: str, **options) -> nn.Module:
    _, targets, fan_in_fan_out = PEFT_TARGETS[name]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, **options)
    return peft.get_peft_model(build(name), config).eval()


def lora_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def copy_from_peft(model: nn.Module, reference: nn.Module) -> None:
    """peft's A, B (and DoRA magnitude) into unipelt's LoRA on the same modules."""
    method = deltas(model)["lora"]
    with torch.no_grad():
        for site_key, proj in method.sites.items():
            layer = reference.base_model.model.get_submodule(proj.path)
            pair = method.pairs[site_key]
            pair.A.weight.copy_(layer.lora_A["default"].weight)
            pair.B.weight.copy_(layer.lora_B["default"].weight)
            if method.config.dora:
                pair.m.copy_(layer.lora_magnitude_vector["default"].weight)


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits and the last layer's hidden states, flat: a tiny BERT's N(0, 0.02) classifier damps changes
    to its logits (3e-4 for these perturbations), its hidden states move by far more."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    hidden = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) else out.hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert torch.allclose(a, b, atol=atol, rtol=RTOL), (a - b).abs().max()


# ------------------------------------------------------------------------------------------ DoRA: the formula


def dora_weight(w, m, a, b, s, detach: bool = True):
    """Eq. 5 of the paper: ``m (W + s B A) / ||W + s B A||_c``, the norm of each output unit's row."""
    v = w + s * b @ a
    norm = v.norm(dim=1, keepdim=True)
    return m[:, None] * v / (norm.detach() if detach else norm)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name,targets", [("bert", ("q", "v", "ffn_out")), ("gpt2", ("q", "v")),
                                          ("llama", ("q", "v", "o"))])
def test_dora_forward_and_gradients_follow_the_formula(name, targets, fold):
    """Each adapted module computes ``x W'^T + b`` with W' of Eq. 5, the magnitude started at ``||W||_c``; the
    gradients are those of Eq. 5 with the norm detached (Section 4.3), which differ from the undetached ones.
    GPT-2's q and v are slices of one fused Conv1D: the other outputs (k) stay as they were."""
    torch.manual_seed(0)
    model = unipelt.attach(build(name), {"method": "lora", "r": 4, "alpha": 8, "targets": list(targets),
                                         "dora": True, "fold": fold})
    method = deltas(model)["lora"]
    for site_key, proj in method.sites.items():  # m starts at ||W||_c: W' = W
        assert torch.equal(method.pairs[site_key].m, proj.weight().norm(dim=1))
    perturb_([p for n, p in method.named_parameters() if not n.endswith(".m")], 1, 0.3)
    with torch.no_grad():
        for pair in method.pairs.values():
            pair.m.mul_(torch.rand(pair.m.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
    s = method.scaling
    g = torch.Generator().manual_seed(3)
    for site_key, proj in method.sites.items():
        pair = method.pairs[site_key]
        x = torch.randn(2, 5, proj.in_features, generator=g)
        full_w = proj.module.weight.t() if proj.transposed else proj.module.weight
        before = torch.nn.functional.linear(x, full_w, proj.module.bias)
        out = proj.module(x)
        with torch.no_grad():
            w_new = dora_weight(proj.weight(), pair.m, pair.A.weight, pair.B.weight, s)
            bias = proj.bias()
            expected = torch.nn.functional.linear(x, w_new, bias)
        part = out if proj.out_slice is None else out[..., proj.out_slice]
        close(part, expected, atol=2e-6)
        assert (part - before if proj.out_slice is None else part - before[..., proj.out_slice]).abs().max() > 1e-3
        if proj.out_slice is not None:  # the fused module's other outputs: untouched by this site
            others = torch.ones(out.shape[-1], dtype=torch.bool)
            for p in method.sites.values():
                others[p.out_slice] = False
            assert torch.equal(out[..., others], before[..., others])

        # gradients: those of Eq. 5 with ||V||_c a constant, as peft
        params = [pair.m, pair.A.weight, pair.B.weight]
        weights = torch.randn(expected.shape, generator=g)
        grads = torch.autograd.grad((part * weights).sum(), params)
        a, b, m = (t.detach().clone().requires_grad_(True) for t in (pair.A.weight, pair.B.weight, pair.m))
        formula = torch.nn.functional.linear(x, dora_weight(proj.weight().detach(), m, a, b, s), bias)
        expected_grads = torch.autograd.grad((formula * weights).sum(), [m, a, b])
        for got, want in zip(grads, expected_grads, strict=True):
            close(got, want, atol=1e-5)
        undetached = torch.nn.functional.linear(x, dora_weight(proj.weight().detach(), m, a, b, s, detach=False), bias)
        other = torch.autograd.grad((undetached * weights).sum(), [m, a, b])
        assert (other[1] - expected_grads[1]).abs().max() > 1e-4  # the detach matters (to A and B; m's is the same)


def test_dora_config_errors():
    with pytest.raises(unipelt.ConfigError, match="gate"):
        unipelt.attach(build("bert"), {"method": "lora", "dora": True, "gate": True})
    with pytest.raises(unipelt.ConfigError, match="init must be one of"):
        unipelt.attach(build("bert"), {"method": "lora", "init": "loftq"})


# ------------------------------------------------------------------------------------------ DoRA against peft


@pytest.mark.parametrize("name", sorted(PEFT_TARGETS))
def test_dora_equals_peft_for_equal_weights(name):
    reference = peft_model(name, use_dora=True)
    randomize = lora_params(reference)
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n, _ in reference.named_parameters())
    perturb_(randomize, 0, 0.3)
    model = ours(name, dora=True)
    copy_from_peft(model, reference)
    batch = inputs(name)
    expected = outputs(reference, batch)
    assert (expected - outputs(build(name), batch)).abs().max() > 1e-3
    close(outputs(model, batch), expected)
    # the magnitude unipelt starts from is peft's: ||W||_c
    fresh, untouched = ours(name, dora=True), peft_model(name, use_dora=True)
    for site_key, proj in deltas(fresh)["lora"].sites.items():
        layer = untouched.base_model.model.get_submodule(proj.path)
        close(deltas(fresh)["lora"].pairs[site_key].m, layer.lora_magnitude_vector["default"].weight, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dora,init", [(True, "lora"), (False, "pissa"), (True, "pissa")])
def test_training_step_equals_peft(dora, init, dropout):
    """Gradients, and with dropout the train-mode outputs (the same masks drawn in the same order), equal peft's:
    DoRA's rescale of ``W D(x)``, PiSSA's ``W_res x + s B A D(x)``."""
    reference = peft_model("bert", use_dora=dora, lora_dropout=dropout,
                           init_lora_weights=True if init == "lora" else init)
    perturb_(lora_params(reference), 0, 0.3 if init == "lora" else 0.1)
    model = ours("bert", dora=dora, dropout=dropout, init=init)
    copy_from_peft(model, reference)
    reference.train()
    model.train()
    batch = inputs("bert")
    outs = []
    for m in (reference, model):
        torch.manual_seed(11)
        out = m(**batch).logits
        out.square().sum().backward()
        outs.append(out.detach())
    close(outs[1], outs[0])
    method = deltas(model)["lora"]
    for site_key, proj in method.sites.items():
        layer = reference.base_model.model.get_submodule(proj.path)
        pair = method.pairs[site_key]
        close(pair.A.weight.grad, layer.lora_A["default"].weight.grad, atol=1e-5)
        close(pair.B.weight.grad, layer.lora_B["default"].weight.grad, atol=1e-5)
        if dora:
            close(pair.m.grad, layer.lora_magnitude_vector["default"].weight.grad, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("options", [{"dora": True}, {"dora": True, "fold": True}, {"dora": True, "init": "pissa"}])
def test_dora_merges(name, options):
    torch.manual_seed(0)
    model = unipelt.attach(build(name), {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], **options})
    perturb_(deltas(model).parameters(), 1, 0.1)
    batch = inputs(name)
    out = outputs(model, batch)
    assert (out - outputs(build(name), batch)).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unipelt.merge(model)
    assert not deltas(model)
    close(outputs(model, batch), out, atol=1e-5)


def test_dora_beside_another_delta_on_its_module_stays_unmerged():
    """DoRA rescales its module's whole output: where another delta hooks the same module, merge keeps it."""
    torch.manual_seed(0)
    model = unipelt.attach(build("bert"), unipelt.Composition(methods=[
        {"method": "lora", "r": 2, "targets": ["q"]}, {"method": "lora", "r": 4, "targets": ["q", "v"], "dora": True}]))
    perturb_(deltas(model).parameters(), 1, 0.1)
    batch = inputs("bert")
    out = outputs(model, batch)
    with pytest.warns(UserWarning, match="not mergeable"):
        unipelt.merge(model)
    assert "lora_1" in deltas(model)
    close(outputs(model, batch), out, atol=1e-5)


def test_dora_serves_its_rows_only(tmp_path):
    """Multi-task serving: DoRA's rescale of the base output acts on its own task's rows only."""
    folders, alone = {}, []
    batch = inputs("bert")
    for i, name in enumerate(("a", "b")):
        model = build("bert")
        torch.manual_seed(i)
        unipelt.attach(model, {"method": "lora", "dora": True, "init": "pissa" if i else "lora"}, train_head=False)
        perturb_(deltas(model).parameters(), 30 + i, 0.1)
        alone.append(logits(model, batch))
        unipelt.save(model, tmp_path / name)
        folders[name] = tmp_path / name
    served = build("bert")
    unipelt.load_tasks(served, folders)
    task_ids = torch.tensor([0, 1, 0])
    out = logits(served, {**batch, "task_ids": task_ids})
    for row, task in enumerate(task_ids.tolist()):
        close(out[row], alone[task][row], atol=1e-6)


# ---------------------------------------------------------------------------------- DoRA: the peft format


@pytest.mark.parametrize("name", sorted(PEFT_TARGETS))
def test_dora_exports_to_peft_and_back(name, tmp_path):
    model = ours(name, dora=True)
    perturb_(deltas(model).parameters(), 0, 0.3)
    batch = inputs(name)
    expected = outputs(model, batch)
    assert (expected - outputs(build(name), batch)).abs().max() > 1e-3
    unipelt.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["init_lora_weights"] is True
    loaded = load_with_peft(name, tmp_path)
    close(outputs(loaded, batch), expected)
    again = unipelt.load(build(name), tmp_path)
    assert deltas(again)["lora"].config.dora
    close(outputs(again, batch), expected)


@pytest.mark.parametrize("name", sorted(PEFT_TARGETS))
def test_peft_dora_checkpoint_loads_into_unipelt(name, tmp_path):
    reference = peft_model(name, use_dora=True)
    perturb_(lora_params(reference), 0, 0.3)
    batch = inputs(name)
    expected = outputs(reference, batch)
    reference.save_pretrained(tmp_path)
    model = unipelt.load(build(name), tmp_path)
    method = deltas(model)["lora"]
    assert method.config.dora and len(method.sites) == 2 * len(PEFT_TARGETS[name][1])
    close(outputs(model, batch), expected)


# --------------------------------------------------------------------------------------- PiSSA and OLoRA


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_pissa_factors_follow_the_svd(name):
    """``A = S_r^{1/2} V_r^T / sqrt(s)``, ``B = U_r S_r^{1/2} / sqrt(s)``: ``s B A`` is W's best rank-r part, the
    residual's largest singular value is W's (r+1)-th; the frozen A_0, B_0 are the same values."""
    torch.manual_seed(0)
    model = unipelt.attach(build(name), {"method": "lora", "r": 4, "alpha": 6, "targets": ["q", "v", "ffn_out"],
                                         "init": "pissa"})
    method = deltas(model)["lora"]
    s = method.scaling
    assert s == 1.5
    for site_key, proj in method.sites.items():
        pair, w = method.pairs[site_key], proj.weight().detach()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.diag(torch.sqrt(sv[:4] / s))
        close(pair.A.weight, root @ vh[:4], atol=1e-6)
        close(pair.B.weight, u[:, :4] @ root, atol=1e-6)
        close(s * pair.B.weight @ pair.A.weight, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-6)
        residual = w - s * pair.B.weight.detach() @ pair.A.weight.detach()
        assert torch.linalg.matrix_norm(residual, ord=2).item() == pytest.approx(sv[4].item(), rel=1e-4)
        assert torch.equal(pair.A0, pair.A.weight) and torch.equal(pair.B0, pair.B.weight)
        assert not pair.A0.requires_grad and "A0" not in dict(pair.named_parameters())


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_olora_factors_follow_the_qr(name):
    """``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]`` (orthonormal columns), no division by s."""
    torch.manual_seed(0)
    model = unipelt.attach(build(name), {"method": "lora", "r": 4, "alpha": 6, "targets": ["q", "v", "ffn_out"],
                                         "init": "olora"})
    method = deltas(model)["lora"]
    for site_key, proj in method.sites.items():
        pair, w = method.pairs[site_key], proj.weight().detach()
        q, r = torch.linalg.qr(w)
        assert torch.equal(pair.A.weight, r[:4]) and torch.equal(pair.B.weight, q[:, :4])
        close(pair.B.weight.t() @ pair.B.weight, torch.eye(4), atol=1e-6)
        assert torch.equal(pair.A0, pair.A.weight) and torch.equal(pair.B0, pair.B.weight)
        close(q @ r, w, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "bart"])
def test_residual_init_leaves_the_model_unchanged_and_detach_restores_w(name, init):
    model = build(name)
    batch = inputs(name)
    base = outputs(model, batch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    unipelt.attach(model, {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "init": init,
                           "dropout": 0.1})
    assert torch.equal(outputs(model, batch), base)  # the update [B - B0, B0] [A; A - A0] is exactly zero
    step(model, name)
    assert (outputs(model, batch) - base).abs().max() > 1e-4
    unipelt.detach(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in weights.items())
    assert torch.equal(outputs(model, batch), base)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_residual_init_equals_peft(name, init):
    """peft's init on the same W gives the same A, B, and the residual it writes into the base weight is
    ``W - s B_0 A_0``; after the same perturbation of A and B the outputs agree. peft's OLoRA factors a Conv1D's
    weight as stored (in, out) and breaks GPT-2's shapes: GPT-2 is compared for PiSSA only."""
    if init == "olora" and name == "gpt2":
        pytest.skip("peft's olora_init does not transpose a Conv1D weight")
    reference = peft_model(name, init_lora_weights=init)
    model = ours(name, init=init)
    method = deltas(model)["lora"]
    for site_key, proj in method.sites.items():
        layer = reference.base_model.model.get_submodule(proj.path)
        pair = method.pairs[site_key]
        close(pair.A.weight, layer.lora_A["default"].weight, atol=1e-6)
        close(pair.B.weight, layer.lora_B["default"].weight, atol=1e-6)
        residual = layer.base_layer.weight.t() if proj.transposed else layer.base_layer.weight
        close(residual, proj.weight() - method.scaling * pair.B0 @ pair.A0, atol=1e-6)
    perturb_(lora_params(reference), 0, 0.1)
    copy_from_peft(model, reference)
    batch = inputs(name)
    expected = outputs(reference, batch)
    assert (expected - outputs(build(name), batch)).abs().max() > 1e-3
    close(outputs(model, batch), expected)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_pissa_with_dora_equals_peft(name):
    reference = peft_model(name, init_lora_weights="pissa", use_dora=True)
    perturb_(lora_params(reference), 0, 0.1)
    model = ours(name, init="pissa", dora=True)
    copy_from_peft(model, reference)
    batch = inputs(name)
    expected = outputs(reference, batch)
    assert (expected - outputs(build(name), batch)).abs().max() > 1e-3
    close(outputs(model, batch), expected)


def test_factor_functions_match_peft_exactly():
    """The module-level factor functions against peft's own code path on one layer."""
    w = build("bert").bert.encoder.layer[0].attention.self.query.weight.detach()
    reference = peft_model("bert", init_lora_weights="pissa")
    layer = reference.base_model.model.bert.encoder.layer[0].attention.self.query
    a, b = pissa_factors(w, 4, 2.0)
    assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)
    reference = peft_model("bert", init_lora_weights="olora")
    layer = reference.base_model.model.bert.encoder.layer[0].attention.self.query
    a, b = olora_factors(w, 4)
    assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)


# ------------------------------------------------------------------------- PiSSA and OLoRA: the peft format


@pytest.mark.parametrize("convert", [False, True])
@pytest.mark.parametrize("name,init,dora", [("bert", "pissa", False), ("bert", "olora", False),
                                            ("gpt2", "pissa", False), ("llama", "pissa", True),
                                            ("bert", "olora", True)])
def test_residual_init_exports_to_peft_and_back(name, init, dora, convert, tmp_path):
    """By default as peft saves it (A, B, ``init_lora_weights``: peft recomputes the residual from the original
    base at load); ``convert_to_lora=True`` as peft's ``path_initial_model_for_weight_conversion`` writes it: a
    plain rank-2r LoRA for the original base."""
    model = ours(name, init=init, dora=dora)
    perturb_(deltas(model).parameters(), 0, 0.1)
    batch = inputs(name)
    expected = outputs(model, batch)
    assert (expected - outputs(build(name), batch)).abs().max() > 1e-3
    unipelt.export_peft(model, tmp_path, convert_to_lora=convert)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == (True if convert else init) and config["use_dora"] is dora
    assert (config["r"], config["lora_alpha"]) == ((8, 16) if convert else (4, 8))
    loaded = load_with_peft(name, tmp_path)
    close(outputs(loaded, batch), expected)
    again = unipelt.load(build(name), tmp_path)
    assert deltas(again)["lora"].config.init == ("lora" if convert else init)
    close(outputs(again, batch), expected)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_residual_init_checkpoint_loads_into_unipelt(init, tmp_path):
    """A PiSSA/OLoRA folder as peft saves it, loaded on the original base: unipelt rebuilds the correction from W
    as peft rebuilds the residual, and leaves W itself untouched."""
    reference = peft_model("bert", init_lora_weights=init)
    perturb_(lora_params(reference), 0, 0.1)
    batch = inputs("bert")
    expected = outputs(reference, batch)
    reference.save_pretrained(tmp_path)
    model = build("bert")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unipelt.load(model, tmp_path)
    assert deltas(model)["lora"].config.init == init
    close(outputs(model, batch), expected)
    unipelt.detach(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_olora_on_conv1d_exports_only_converted(tmp_path):
    model = ours("gpt2", init="olora")
    with pytest.raises(unipelt.ConfigError, match="convert_to_lora=True"):
        unipelt.export_peft(model, tmp_path / "native")
    unipelt.export_peft(model, tmp_path / "converted", convert_to_lora=True)
    batch = inputs("gpt2")
    close(outputs(load_with_peft("gpt2", tmp_path / "converted"), batch), outputs(model, batch))
