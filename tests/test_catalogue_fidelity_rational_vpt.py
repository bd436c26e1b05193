"""RAFT's rational units and VPT-deep's prompt dropout against their references (issue 26, points 3 and 7).

RAFT (UKPLab/2022-RAFT with ml-research/rational_activations):
- the unit is version A, ``P(x) / (1 + sum_k |b_k| |x|^k)``, checked against the formula written out here;
- units stand at every FFN activation and at the [CLS] pooler's activation (``rational_layers="0-11,pooler"``);
- the coefficients train in their own optimizer group at the reference's ``rational_lr`` (1e-3), the head at 5e-3;
- a RAFT checkpoint's pretrained coefficients load into the units exactly.

VPT (KMnP/vpt): VPT-deep drops out its prompts (0.1) at every insertion in training, not in evaluation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unipelt
from conftest import build, inputs, logits, perturb_, step
from unipelt.core import deltas
from unipelt.methods import rational as rational_module
from unipelt.methods.rational import (
    RationalConfig,
    RationalUnit,
    _UnitSlot,
    initial_coefficients,
    load_coefficients,
    rational,
    read_coefficients,
)
from unipelt.methods.vpt import VPTConfig
from unipelt.train.loop import default_lr, parameter_groups


def version_a(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rational_activations' ``Rational_PYTORCH_A_F``: sum_j a_j x^j / (1 + sum_k |b_k x^k|)."""
    numerator = sum(a[j] * x ** j for j in range(a.shape[0]))
    denominator = 1 + sum((b[k - 1] * x ** k).abs() for k in range(1, b.shape[0] + 1))
    return numerator / denominator


class FormulaUnit(nn.Module):
    """A stand-in for the reference's unit: the formula above, with fixed coefficients, in float64."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = a.double(), b.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return version_a(x.double(), self.a, self.b).to(x.dtype)


def _coefficients(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients with negative denominator entries (where |b_k| differs from b_k)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    b[0], b[2] = -b[0].abs() - 0.1, -b[2].abs() - 0.05
    return a, b


# ------------------------------------------------------------------------------------------ version A


@pytest.mark.parametrize("compiling", [False, True])
def test_the_unit_is_version_a(compiling: bool, monkeypatch) -> None:
    """Values and gradients (both backwards) against autograd through the formula, with negative b_k."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    a, b = _coefficients(0)
    assert (b < 0).sum() >= 2
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    torch.testing.assert_close(rational(x, a, b), version_a(x, a, b), rtol=1e-12, atol=1e-12)
    # the former form 1 + |sum_k b_k x^k| is another function at these coefficients
    former = sum(a[j] * x ** j for j in range(6)) / (1 + sum(b[k - 1] * x ** k for k in range(1, 5)).abs())
    assert float((version_a(x, a, b) - former).abs().max()) > 1e-1
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mine = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    (rational(*mine) * weight).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    (version_a(*ref) * weight).sum().backward()
    for got, want in zip(mine, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(rational, tuple(t.detach().clone().requires_grad_() for t in (x, a, b)))


def test_float32_unit_and_fits_are_version_a() -> None:
    a, b = _coefficients(2)
    unit = RationalUnit(a, b)
    x = torch.randn(3, 11, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(unit(x).double(), version_a(x.double(), unit.numerator.double(),
                                                           unit.denominator.double()), rtol=0, atol=2e-5)
    grid = torch.linspace(-5, 5, 20001, dtype=torch.float64)
    for name, bound in (("gelu", 3e-3), ("silu", 1e-4), ("tanh", 2e-4)):
        a, b = initial_coefficients(name)
        error = float((version_a(grid, a, b) - rational_module.TARGETS[name](grid)).abs().max())
        assert error < bound, (name, error)


# ------------------------------------------------------------------------------------ where the units are


def test_units_at_every_ffn_activation_and_the_pooler() -> None:
    model = build("bert")
    tanh = model.bert.pooler.activation
    batch = inputs("bert")
    base = logits(model, batch)
    unipelt.attach(model, "rational")
    method = deltas(model)["rational"]
    assert sorted(method.units) == ["layers0", "layers1", "pooler"] and method.pooler_init == "tanh"
    for i, layer in enumerate(model.bert.encoder.layer):
        assert layer.intermediate.intermediate_act_fn.unit is method.units[f"layers{i}"]
    assert isinstance(model.bert.pooler.activation, _UnitSlot)
    assert model.bert.pooler.activation.unit is method.units["pooler"]
    # the pooler's unit starts at a fit of its tanh, and the classifier reads it
    grid = torch.linspace(-5, 5, 1001)
    assert float((method.units["pooler"](grid) - torch.tanh(grid)).abs().max()) < 2e-4
    assert 0 < float((logits(model, batch) - base).abs().max()) < 1e-2
    seen = []
    handle = model.bert.pooler.activation.register_forward_hook(lambda m, i, o: seen.append(o))
    logits(model, batch)
    handle.remove()
    assert len(seen) == 1
    with torch.no_grad():
        method.units["pooler"].numerator.mul_(2)
    assert float((logits(model, batch) - base).abs().max()) > 1e-3
    unipelt.detach(model)
    assert model.bert.pooler.activation is tanh and torch.equal(logits(model, batch), base)
    # pooler=False leaves it alone; models without a [CLS] pooler get FFN units only
    model = build("bert")
    unipelt.attach(model, {"method": "rational", "pooler": False})
    assert "pooler" not in deltas(model)["rational"].units and isinstance(model.bert.pooler.activation, nn.Tanh)
    for family in ("roberta", "distilbert"):
        model = build(family)
        unipelt.attach(model, "rational")
        assert "pooler" not in deltas(model)["rational"].units


def test_shared_ffn_unit_keeps_its_own_pooler_unit() -> None:
    model = build("bert")
    unipelt.attach(model, {"method": "rational", "shared": True})
    method = deltas(model)["rational"]
    assert sorted(method.units) == ["pooler", "shared"]
    assert method.unit("layers0") is method.unit("layers1") is method.units["shared"]
    assert method.unit("pooler") is method.units["pooler"]


# ----------------------------------------------------------------------------------------- learning rates


def test_coefficients_train_in_their_own_group_at_the_reference_rate() -> None:
    config = RationalConfig()
    assert RationalConfig.reference_lr == 5e-3 and default_lr("rational", config) == 5e-3
    model = build("bert")
    unipelt.attach(model, config)
    coefficients = {id(p) for p in deltas(model)["rational"].parameters()}
    assert len(coefficients) == 6  # two FFN units and the pooler's
    groups, by_part = parameter_groups(model, default_lr("rational", config), {})
    assert by_part == {"rational.coefficients": 1e-3}
    assert len(groups) == 2
    rest, own = groups
    assert rest["lr"] == 5e-3 and own["lr"] == 1e-3
    assert {id(p) for p in own["params"]} == coefficients
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for p in rest["params"]} == head  # the base stays frozen
    groups, by_part = parameter_groups(model, 5e-3, {"rational.coefficients": 2e-3})
    assert by_part == {"rational.coefficients": 2e-3} and groups[1]["lr"] == 2e-3


# -------------------------------------------------------------------------------- pretrained coefficients


def _raft_state(model: nn.Module, style: str) -> dict[str, torch.Tensor]:
    """A checkpoint as RAFT's models store it: the body's weights, and each unit's coefficients."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer = {"hf": "bert.encoder.layer.{i}.intermediate.intermediate_act_fn",
             "academic": "bert.encoder.layer.{i}.intermediate.dense_act.rf"}[style]
    pooler = {"hf": "bert.pooler.activation", "academic": "bert.pooler.dense_act.rf"}[style]
    for i in range(2):
        a, b = _coefficients(10 + i)
        state[f"{layer.format(i=i)}.numerator"], state[f"{layer.format(i=i)}.denominator"] = a.float(), b.float()
    a, b = _coefficients(20)
    state[f"{pooler}.numerator"], state[f"{pooler}.denominator"] = a.float(), b.float()
    return state


def _with_formula_units(model: nn.Module, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """The reference model: its activations replaced by the formula at the checkpoint's coefficients."""
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.intermediate.intermediate_act_fn = FormulaUnit(*sets[f"bert.encoder.layer.{i}.intermediate."
                                                                   f"intermediate_act_fn"])
    model.bert.pooler.activation = FormulaUnit(*sets["bert.pooler.activation"])
    return model


@pytest.mark.parametrize("style", ["hf", "academic"])
def test_pretrained_coefficients_load_exactly(style: str, tmp_path: Path) -> None:
    source = build("bert")
    state = _raft_state(source, style)
    folder = tmp_path / "raft"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    sets = read_coefficients(folder)
    assert len(sets) == 3
    batch = inputs("bert")

    model = build("bert")
    unipelt.attach(model, {"method": "rational", "coefficients": str(folder)})
    method = deltas(model)["rational"]
    for key, prefix in (("layers0", "layer.0."), ("layers1", "layer.1."), ("pooler", "pooler.")):
        (numerator, denominator), = [v for k, v in sets.items() if prefix in k]
        assert torch.equal(method.units[key].numerator, numerator) and torch.equal(method.units[key].denominator,
                                                                                   denominator)
        assert method.units[key].tails is None  # the reference's units have no tails
    out = logits(model, batch)

    # the same through the function, on a model attached with tails=False, from the state dict itself
    other = build("bert")
    unipelt.attach(other, {"method": "rational", "tails": False})
    assert load_coefficients(other, state) == ["layers0", "layers1", "pooler"]
    assert torch.equal(logits(other, batch), out)

    # against the formula at those coefficients
    if style == "hf":
        reference = _with_formula_units(build("bert"), {k: (a, b) for k, (a, b) in sets.items()})
        torch.testing.assert_close(out, logits(reference, batch), rtol=0, atol=1e-5)

    # save/load keeps them without the checkpoint: the saved config does not name it
    unipelt.save(model, tmp_path / "delta")
    (folder / "pytorch_model.bin").unlink()
    fresh = unipelt.load(build("bert"), tmp_path / "delta")
    assert deltas(fresh)["rational"].config.coefficients is None
    assert deltas(fresh)["rational"].units["layers0"].tails is None
    assert torch.equal(logits(fresh, batch), out)


def test_pretrained_coefficients_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    state = _raft_state(build("bert"), "hf")
    model = build("bert")
    unipelt.attach(model, {"method": "rational", "tails": False})
    before = {k: v.clone() for k, v in deltas(model).state_dict().items()}
    missing = {k: v for k, v in state.items() if "layer.1." not in k}
    with pytest.raises(unipelt.ConfigError, match=r"units without a set \['layers1'\]"):
        load_coefficients(model, missing)
    with pytest.raises(unipelt.ConfigError, match="pooler=False"):
        unipelt.attach(build("bert"), {"method": "rational", "pooler": False, "coefficients": _saved(state, tmp_path)})
    with pytest.raises(unipelt.ConfigError, match="degrees"):
        unipelt.attach(build("bert"), {"method": "rational", "numerator_degree": 3,
                                       "coefficients": _saved(state, tmp_path)})
    with pytest.raises(unipelt.ConfigError, match="shared=True"):
        unipelt.attach(build("bert"), {"method": "rational", "shared": True, "coefficients": _saved(state, tmp_path)})
    with pytest.raises(unipelt.ConfigError, match="no checkpoint"):
        unipelt.attach(build("bert"), {"method": "rational", "coefficients": str(tmp_path / "nowhere.bin")})
    after = deltas(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # all or nothing


def _saved(state: dict[str, torch.Tensor], tmp_path: Path) -> str:
    path = tmp_path / "raft.bin"
    torch.save(state, path)
    return str(path)


def test_a_unipelt_delta_is_a_coefficient_source(tmp_path: Path) -> None:
    model = build("bert")
    unipelt.attach(model, "rational")
    perturb_(deltas(model).parameters(), 5, 0.05)
    unipelt.save(model, tmp_path / "delta")
    other = build("bert")
    unipelt.attach(other, "rational")
    load_coefficients(other, tmp_path / "delta")
    for key, unit in deltas(model)["rational"].units.items():
        assert torch.equal(deltas(other)["rational"].units[key].numerator, unit.numerator)


# ------------------------------------------------------------------------------ training, saving (RAFT)


def test_rational_trains_only_coefficients_and_head_and_saves_exactly(tmp_path: Path) -> None:
    model = build("bert")
    unipelt.attach(model, "rational")
    model.train()
    out = model(**inputs("bert")).logits
    out.square().sum().backward()
    own = {id(p) for p in deltas(model).parameters()}
    head = {id(p) for p in model.classifier.parameters()}
    for name, p in model.named_parameters():
        if id(p) in own or id(p) in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert deltas(model)["rational"].units["pooler"].numerator.grad.abs().sum() > 0
    model.zero_grad()
    step(model, "bert")
    batch = inputs("bert")
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    fresh = unipelt.load(build("bert"), tmp_path)
    assert torch.equal(logits(fresh, batch), out)


# ------------------------------------------------------------------------------------------ VPT-deep dropout


def _capture(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Hooks (after VPT's) that record the hidden states entering every layer."""
    seen: list[torch.Tensor] = []
    vpt = deltas(model)["vpt"]
    handles = [vpt.embed_module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))]
    for layer in vpt.layer_modules[1:]:
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(hidden.detach().clone())
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_vpt_deep_drops_out_its_prompts_at_every_insertion_in_training() -> None:
    assert unipelt.parse_config("vpt_deep").prompt_dropout == 0.1
    assert unipelt.parse_config("vpt").prompt_dropout == 0.0  # the reference uses none for VPT-shallow
    assert VPTConfig(deep=True, dropout=0.0).prompt_dropout == 0.0
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(unipelt.ConfigError, match="vpt dropout"):
            unipelt.parse_config({"method": "vpt_deep", "dropout": bad})
    n = 3
    model = build("vit")
    unipelt.attach(model, {"method": "vpt_deep", "length": n})
    prompts = deltas(model)["vpt"].prompts.detach()
    seen, handles = _capture(model)
    batch = inputs("vit")
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert len(seen) == prompts.shape[0] == 2
    for i, hidden in enumerate(seen):
        inserted = hidden[:, 1:1 + n]
        kept = inserted != 0
        assert 0 < int((~kept).sum()) < kept.numel() // 2, i  # about a tenth dropped
        scaled = (prompts[i] / 0.9).expand_as(inserted)
        torch.testing.assert_close(inserted[kept], scaled[kept], rtol=1e-6, atol=1e-7)
        assert not torch.equal(kept[0], kept[1])  # each example's copy is drawn on its own
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(**batch)
    for i, hidden in enumerate(seen):
        assert torch.equal(hidden[:, 1:1 + n], prompts[i].expand(hidden.shape[0], -1, -1))
    for h in handles:
        h.remove()
    # eval is deterministic; train differs between calls, and only by the prompt dropout
    model.eval()
    assert torch.equal(logits(model, batch), logits(model, batch))
    model.train()
    assert not torch.equal(logits(model, batch), logits(model, batch))
    no_dropout = build("vit")
    unipelt.attach(no_dropout, {"method": "vpt_deep", "length": n, "dropout": 0.0})
    no_dropout.train()
    first = logits(no_dropout, batch)
    assert torch.equal(first, logits(no_dropout, batch))
    no_dropout.eval()
    assert torch.equal(first, logits(no_dropout, batch))


def test_vpt_deep_trains_only_prompts_and_head_and_saves_exactly(tmp_path: Path) -> None:
    model = build("vit")
    unipelt.attach(model, {"method": "vpt_deep", "length": 3})
    model.train()
    model(**inputs("vit")).logits.square().sum().backward()
    own = {id(p) for p in deltas(model).parameters()}
    head = {id(p) for p in model.classifier.parameters()}
    for name, p in model.named_parameters():
        if id(p) in own or id(p) in head:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    model.zero_grad()
    step(model, "vit")
    batch = inputs("vit")
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    fresh = unipelt.load(build("vit"), tmp_path)
    assert deltas(fresh)["vpt"].config.prompt_dropout == 0.1
    assert torch.equal(logits(fresh.eval(), batch), out)


def test_the_docstrings_state_formula_reference_and_setting() -> None:
    doc = rational_module.__doc__
    assert "1 + |b_1| |x|" in doc and "UKPLab/2022-RAFT" in doc and "ml-research/rational_activations" in doc
    assert "approximation" in doc and "pretrained with" in doc
    from unipelt.methods import vpt

    assert "KMnP/vpt" in vpt.__doc__ and "drop(P_i)" in vpt.__doc__
