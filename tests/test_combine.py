"""``unipelt.combine``: one delta from several of the same method, each formula written out here on small tensors.

The formulas (task vectors ``tau_i``, weights ``w_i``): linear ``sum_i w_i tau_i``; TIES trims each ``tau_i`` to
its ``round(density n)`` largest magnitudes, elects ``sign(sum_i t_i)`` and takes the disjoint mean of the weighted
agreeing entries; DARE keeps each entry with probability ``density`` and divides it by ``density``. LoRA's task
vector is ``Delta W = (alpha / r) B A``; IA3's is ``l - 1``; BitFit's and LN's the saved deltas. A combined delta
loaded into a fresh model must carry the formula's ``Delta W`` (and, merged, give ``W + Delta W``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unipelt
from conftest import build, inputs, logits, perturb_
from unipelt.combine import combine_tensors

WEIGHTS = [0.7, -0.4]


def lora_models(ranks=(2, 4), alphas=(3.0, 8.0), train_head=False) -> list[nn.Module]:
    models = []
    for i, (r, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        model = build("bert")
        unipelt.attach(model, {"method": "lora", "r": r, "alpha": alpha}, train_head=train_head)
        perturb_(model.unipelt_deltas.parameters(), 10 + i, 0.1)
        if train_head:
            perturb_(model.classifier.parameters(), 20 + i, 0.1)
        models.append(model)
    return models


def delta_ws(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each LoRA site's ``(alpha / r) B A`` in float64, written out."""
    lora = model.unipelt_deltas["lora"]
    s = lora.config.alpha / lora.config.r
    return {k: s * (p.B.weight.double() @ p.A.weight.double()) for k, p in lora.pairs.items()}


def loaded(folder: Path) -> nn.Module:
    return unipelt.load(build("bert"), folder)


# ------------------------------------------------------------------ the formulas, by hand on small tensors


def test_ties_and_linear_by_hand() -> None:
    t1 = torch.tensor([3.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    t2 = torch.tensor([-1.0, 2.0, 0.25, -3.0], dtype=torch.float64)
    w = [1.0, 0.5]
    # linear: 1 * t1 + 0.5 * t2
    assert combine_tensors([t1, t2], w, "linear").tolist() == [2.5, 0.0, 0.625, -3.5]
    # TIES, density 0.5: trimmed t1 = [3, 0, 0, -2], t2 = [0, 2, 0, -3]; sum [3, 2, 0, -5] elects [+, +, +, -];
    # agreeing: t1 at 0 and 3, t2 at 1 and 3; disjoint mean of the weighted: [3/1, 1/1, 0, (-2 - 1.5)/2]
    assert combine_tensors([t1, t2], w, "ties", density=0.5).tolist() == [3.0, 1.0, 0.0, -1.75]
    # DARE: the kept entries divided by the density
    g = torch.Generator().manual_seed(5)
    keep = [torch.rand(4, generator=g, dtype=torch.float64) < 0.5 for _ in range(2)]
    expected = 1.0 * t1 * keep[0] / 0.5 + 0.5 * t2 * keep[1] / 0.5
    got = combine_tensors([t1, t2], w, "dare_linear", density=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def ties_by_formula(taus: list[torch.Tensor], weights: list[float], density: float,
                    keep: list[torch.Tensor] | None = None) -> torch.Tensor:
    """TIES (``keep`` None) or DARE-TIES (``keep``: each delta's kept entries), entry by entry."""
    trimmed = []
    for i, tau in enumerate(taus):
        if keep is None:
            k = round(density * tau.numel())
            threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
            trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
        else:
            trimmed.append(tau * keep[i] / density)
    total = sum(trimmed)
    elected = torch.where(total >= 0, 1.0, -1.0).double()
    num = sum(w * t * (torch.sign(t) == elected) for w, t in zip(weights, trimmed, strict=True))
    count = sum((torch.sign(t) == elected).double() for t in trimmed)
    return num / count.clamp(min=1)


# ------------------------------------------------------------------ LoRA


def test_linear_lora_is_exact_concatenation(tmp_path: Path) -> None:
    """``linear`` keeps sum_i w_i (alpha_i / r_i) B_i A_i exactly: rank r_1 + r_2, scale 1; the loaded and merged
    model is the base with W + Delta W."""
    models = lora_models()
    folder = unipelt.combine(models, WEIGHTS, out=tmp_path / "linear")
    model = loaded(folder)
    lora = model.unipelt_deltas["lora"]
    assert (lora.config.r, lora.config.alpha) == (6, 6.0) and lora.scaling == 1.0
    parts = [delta_ws(m) for m in models]
    expected = {k: WEIGHTS[0] * parts[0][k] + WEIGHTS[1] * parts[1][k] for k in parts[0]}
    for k, dw in delta_ws(model).items():
        torch.testing.assert_close(dw, expected[k], atol=1e-7, rtol=0)
    # as a merged model: the base weights plus the formula's Delta W, nothing else changed
    names = {id(m): n for n, m in model.named_modules()}
    sites = {names[id(lora.sites[k].module)] + ".weight": k for k in lora.sites}
    batch = inputs("bert")
    out = logits(model, batch)
    unipelt.merge(model)
    torch.testing.assert_close(logits(model, batch), out, atol=1e-6, rtol=0)
    for name, p in build("bert").state_dict().items():
        want = p.double() + expected[sites[name]] if name in sites else p.double()
        torch.testing.assert_close(model.state_dict()[name].double(), want, atol=1e-6, rtol=0)


def test_svd_is_the_best_rank_k_approximation(tmp_path: Path) -> None:
    models = lora_models()
    folders = [unipelt.save(m, tmp_path / f"src{i}") for i, m in enumerate(models)]  # folders or models alike
    parts = [delta_ws(m) for m in models]
    for rank in (3, 32):  # 32: the full rank of a 32 x 32 projection, exact
        model = loaded(unipelt.combine(folders, WEIGHTS, "svd", rank=rank, out=tmp_path / f"svd{rank}"))
        assert model.unipelt_deltas["lora"].config.r == rank
        for k, dw in delta_ws(model).items():
            full = WEIGHTS[0] * parts[0][k] + WEIGHTS[1] * parts[1][k]
            u, s, vh = torch.linalg.svd(full)
            torch.testing.assert_close(dw, u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], atol=1e-6, rtol=0)
    default = loaded(unipelt.combine(folders, WEIGHTS, "svd", out=tmp_path / "svd"))
    assert default.unipelt_deltas["lora"].config.r == 4  # the largest of the ranks, as peft's svd_rank


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_lora_ties_and_dare_act_on_delta_w(method: str, tmp_path: Path) -> None:
    """TIES and DARE on each projection's Delta W, factored back at full rank (exact)."""
    models = lora_models()
    parts = [delta_ws(m) for m in models]
    density, seed = 0.3, 11
    model = loaded(unipelt.combine(models, WEIGHTS, method, density=density, rank=32, seed=seed,
                                   out=tmp_path / method))
    g = torch.Generator().manual_seed(seed)  # the drops: projection by projection (sorted), delta by delta
    for k in sorted(parts[0]):
        taus = [p[k] for p in parts]
        keep = [torch.rand(t.shape, generator=g, dtype=torch.float64) < density for t in taus] \
            if method != "ties" else None
        if method == "dare_linear":
            expected = sum(w * t * m / density for w, t, m in zip(WEIGHTS, taus, keep, strict=True))
        else:
            expected = ties_by_formula(taus, WEIGHTS, density, keep)
        torch.testing.assert_close(delta_ws(model)[k], expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ IA3, BitFit, LN


@pytest.mark.parametrize("kind", ["ia3", "bitfit", "ln"])
def test_vector_methods_linear(kind: str, tmp_path: Path) -> None:
    models = []
    for i in range(3):
        model = build("bert")
        unipelt.attach(model, kind, train_head=False)
        perturb_(model.unipelt_deltas.parameters(), 30 + i, 0.1)
        models.append(model)
    weights = [0.5, 0.25, -1.0]
    model = loaded(unipelt.combine(models, weights, out=tmp_path / kind))
    got = model.unipelt_deltas[kind].delta_state()
    for key, value in got.items():
        parts = [m.unipelt_deltas[kind].delta_state()[key].double() for m in models]
        if kind == "ia3":  # the scales: 1 + sum_i w_i (l_i - 1)
            expected = 1 + sum(w * (p - 1) for w, p in zip(weights, parts, strict=True))
        else:  # bias deltas, LN gain and bias deltas: sum_i w_i tau_i
            expected = sum(w * p for w, p in zip(weights, parts, strict=True))
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)


def test_ia3_ties(tmp_path: Path) -> None:
    models = []
    for i in range(2):
        model = build("bert")
        unipelt.attach(model, "ia3", train_head=False)
        perturb_(model.unipelt_deltas.parameters(), 40 + i, 0.1)
        models.append(model)
    model = loaded(unipelt.combine(models, WEIGHTS, "ties", density=0.5, out=tmp_path / "ties"))
    for key, value in model.unipelt_deltas["ia3"].delta_state().items():
        taus = [m.unipelt_deltas["ia3"].delta_state()[key].double() - 1 for m in models]
        torch.testing.assert_close(value.double(), 1 + ties_by_formula(taus, WEIGHTS, 0.5), atol=1e-7, rtol=0)


# ------------------------------------------------------------------ heads, refusals


def test_heads_need_a_choice(tmp_path: Path) -> None:
    models = lora_models(train_head=True)
    with pytest.raises(unipelt.ConfigError, match="heads='drop'.*heads='mean'"):
        unipelt.combine(models, WEIGHTS, out=tmp_path / "x")
    model = loaded(unipelt.combine(models, [0.75, 0.25], heads="mean", out=tmp_path / "mean"))
    for name, p in model.classifier.named_parameters():
        want = sum(w * dict(m.classifier.named_parameters())[name] for w, m in zip([0.75, 0.25], models, strict=True))
        torch.testing.assert_close(p, want, atol=1e-7, rtol=0)
    fresh = build("bert")
    model = loaded(unipelt.combine(models, WEIGHTS, heads="drop", out=tmp_path / "drop"))
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)


def test_refusals(tmp_path: Path) -> None:
    def attached(config, seed=0):
        model = build("bert")
        torch.manual_seed(seed)
        return unipelt.attach(model, config, train_head=False)

    with pytest.raises(unipelt.ConfigError, match=r"cannot combine 'prefix'.*lora, ia3, bitfit, ln"):
        unipelt.combine([attached("prefix"), attached("prefix")], out=tmp_path / "p")
    with pytest.raises(unipelt.ConfigError, match="gated lora"):
        unipelt.combine([attached({"method": "lora", "gate": True})], out=tmp_path / "g")
    with pytest.raises(unipelt.ConfigError, match="'svd' factors LoRA"):
        unipelt.combine([attached("ia3"), attached("ia3")], method="svd", out=tmp_path / "s")
    with pytest.raises(unipelt.ConfigError, match="same methods"):
        unipelt.combine([attached("ia3"), attached("lora")], out=tmp_path / "m")
    with pytest.raises(unipelt.ConfigError, match="differs.*targets"):
        unipelt.combine([attached("lora"), attached({"method": "lora", "targets": ["q"]})], out=tmp_path / "t")
    with pytest.raises(unipelt.ConfigError, match="density"):
        unipelt.combine([attached("lora"), attached("lora")], method="ties", out=tmp_path / "d")
    with pytest.raises(unipelt.ConfigError, match="one finite weight per delta"):
        unipelt.combine([attached("lora"), attached("lora")], [1.0], out=tmp_path / "w")
    with pytest.raises(unipelt.ConfigError, match="method='svd'"):
        unipelt.combine([attached("lora")], rank=2, out=tmp_path / "r")
    with pytest.raises(unipelt.ConfigError, match="unknown combine method"):
        unipelt.combine([attached("lora")], method="cat", out=tmp_path / "c")
    other = build("llama")
    unipelt.attach(other, "lora")
    with pytest.raises(unipelt.DeltaFileError, match="one base model"):
        unipelt.combine([attached("lora"), other], out=tmp_path / "b")
    assert not any(tmp_path.iterdir())  # nothing written by a refused combination
