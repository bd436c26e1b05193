"""The fused bottleneck kernels, run on the CPU by Triton's interpreter in float16.

Not collected by the main test run (the interpreter must be switched on before Triton is imported):
``tests/test_fused_bottleneck.py`` runs this file in a pytest process of its own, with ``TRITON_INTERPRET=1``.
The interpreter computes bfloat16 dots wrongly (Triton 3.8), so these checks use float16; the GPU runs of
``benchmarks/fused_bottleneck.py`` check bfloat16.

The kernels must compute the unfused path's function at least as precisely: every comparison measures the
fused result's and the unfused half-precision result's distance to a float32 computation of the same inputs.
"""

from __future__ import annotations

import operator
import os

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import benchmark_script, perturb_  # tests/conftest.py, which pytest loads for this file too
from unipelt.kernels import bottleneck as kb

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fused_bottleneck.py"
assert kb._TRITON is not None, "Triton's interpreter did not load"

HALF = torch.float16


def distance(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest error over the tensors, each relative to its float32 counterpart's largest value."""
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
               for g, w in zip(got, want, strict=True))


def adapter_pass(fn, tensors: dict[str, torch.Tensor], act: str, scale: float, serial: bool,
                 grad: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients; gated when ``tensors`` hold the gate's ``w_gate`` and ``b_gate``."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    gate = [n for n in ("w_gate", "b_gate") if n in leaves]
    out = fn(leaves["x"], None if serial else leaves["residual"], leaves["w_down"], leaves["b_down"],
             leaves["w_up"], leaves["b_up"], act, scale, *(leaves[n] for n in gate))
    names = ["x", "w_down", "b_down", "w_up", "b_up", *gate] + ([] if serial else ["residual"])
    return [out.detach(), *torch.autograd.grad(out, [leaves[n] for n in names], grad.to(out.dtype))]


def gate_logit_grads(tensors: dict[str, torch.Tensor], act: str, scale: float, grad: torch.Tensor) -> torch.Tensor:
    """Each token's gradient of the gate logit, in float32: the terms that b_gate's gradient sums."""
    x = tensors["x"]
    logit = F.linear(x, tensors["w_gate"], tensors["b_gate"]).requires_grad_()
    delta = F.linear(kb._ACT_FNS[act](F.linear(x, tensors["w_down"], tensors["b_down"])), tensors["w_up"],
                     tensors["b_up"])
    return torch.autograd.grad((delta * scale * torch.sigmoid(logit) * grad).sum(), logit)[0]


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "tanh"])
def test_the_kernels_compute_the_adapter_and_its_gradients(act: str, serial: bool, gated: bool) -> None:
    # sizes that fill no block: 2 x 21 tokens, width 40, bottleneck 12; several token splits in the weight gradients
    torch.manual_seed(0)
    rows, d, m, scale = 42, 40, 12, 2.0
    tensors = {"x": torch.randn(rows, d), "residual": torch.randn(rows, d), "w_down": torch.randn(m, d) * 0.3,
               "b_down": torch.randn(m) * 0.1, "w_up": torch.randn(d, m) * 0.3, "b_up": torch.randn(d) * 0.1}
    if gated:  # UniPELT's gate, sigmoid(x w_g^T + b_g) per token
        tensors |= {"w_gate": torch.randn(1, d) * 0.3, "b_gate": torch.randn(1) * 0.1}
    grad = torch.randn(rows, d)
    exact = adapter_pass(kb.reference, tensors, act, scale, serial, grad)
    halves = {k: v.to(HALF) if k in ("x", "residual") else v for k, v in tensors.items()}
    assert kb.available(halves["x"], torch.float32, m, act, gated) is False  # float32 weights, no autocast
    with torch.autocast("cpu", dtype=HALF):
        assert kb.available(halves["x"], torch.float32, m, act, gated)
        fused = adapter_pass(kb.bottleneck_add, {k: v.view(2, 21, d) if v.shape[0] == rows else v
                                                 for k, v in halves.items()}, act, scale, serial,
                             grad.view(2, 21, d))
        unfused = adapter_pass(kb.reference, halves, act, scale, serial, grad)
    fused = [t.reshape(e.shape) for t, e in zip(fused, exact, strict=True)]
    assert [t.dtype for t in fused[2:6 + 2 * gated]] == [torch.float32] * (4 + 2 * gated)  # the weights' own
    if gated:
        # b_gate's gradient sums 42 tokens' terms of either sign: its error is measured against their size, not
        # against the (cancelling) sum, on which the rounding of both half-precision paths looks large at random
        terms = gate_logit_grads(tensors, act, scale, grad).abs().sum()
        errors = [(t[7].float() - exact[7]).abs().item() / terms.item() for t in (fused, unfused)]
        assert errors[0] <= 1.5 * errors[1] + 1e-3
        fused, unfused, exact = ([t for i, t in enumerate(ts) if i != 7] for ts in (fused, unfused, exact))
    assert distance(fused, exact) <= 1.5 * distance(unfused, exact) + 1e-3
    assert distance(fused, exact) < 5e-3


def test_the_kernels_get_ranks_padded_with_zeros_to_a_multiple_of_16(monkeypatch) -> None:
    # W_up's row stride is the rank count: Triton vectorises its loads only where that divides by 16
    torch.manual_seed(2)
    wd, bd, wu = torch.randn(12, 40), torch.randn(12), torch.randn(40, 12)
    pd, pb, pu = kb.aligned_ranks(wd, bd, wu)
    assert (pd.shape, pb.shape, pu.shape) == ((16, 40), (16,), (40, 16))
    assert torch.equal(pd[:12], wd) and torch.equal(pb[:12], bd) and torch.equal(pu[:, :12], wu)
    assert not (pd[12:].any() or pb[12:].any() or pu[:, 12:].any())
    aligned = (torch.randn(16, 40), torch.randn(16), torch.randn(40, 16))
    assert all(a is b for a, b in zip(kb.aligned_ranks(*aligned), aligned, strict=True))
    assert (kb.rank_padding(12), kb.rank_padding(12, gated=True), kb.rank_padding(15, gated=True)) == (4, 3, 0)
    wg, bg = torch.randn(1, 40), torch.randn(1)
    gd, gb, gu = kb.aligned_ranks(wd, bd, wu, wg, bg)  # gated: zero rows, then the gate's; W_up as it is
    assert (gd.shape, gb.shape, gu is wu) == ((16, 40), (16,), True)
    assert torch.equal(gd[:12], wd) and torch.equal(gd[15:], wg) and not gd[12:15].any()
    assert torch.equal(gb[:12], bd) and torch.equal(gb[15:], bg) and not gb[12:15].any()
    seen = []
    real = torch.ops.unipelt.bottleneck_forward

    class Spy:
        def __call__(self, *args):
            seen.append(tuple(t.detach().clone() for t in args[2:5]))  # W_down, b_down, W_up as the kernels get them
            return real(*args)

    monkeypatch.setattr(torch.ops.unipelt, "bottleneck_forward", Spy())
    x = torch.randn(2, 5, 40, dtype=HALF, requires_grad=True)
    bu, wg, bg = torch.randn(40), torch.randn(1, 40), torch.randn(1)
    leaves = [t.clone().requires_grad_() for t in (wd, bd, wu, bu, wg, bg)]
    with torch.autocast("cpu", dtype=HALF):
        out = kb.bottleneck_add(x, None, *leaves[:4], "gelu", 1.0)
        gated_out = kb.bottleneck_add(x, None, *leaves[:4], "gelu", 1.0, *leaves[4:])
    (out.float().sum() + gated_out.float().sum()).backward()  # the padded ranks' gradients are cut off again
    (d0, b0, u0), (d1, b1, u1) = seen
    assert u0.shape == (40, 16) and not u0[:, 12:].any() and not d0[12:].any()
    # gated: W_down's 12 rows, 3 zero and the gate's; W_up as it is, read up to its 12 columns
    assert (d1.shape, b1.shape, u1.shape) == ((16, 40), (16,), (40, 12))
    assert not (d1[12:15].any() or b1[12:15].any()) and torch.equal(u1, wu)
    assert torch.equal(d1[15], wg[0]) and torch.equal(b1[15], bg[0])
    assert [leaf.grad.shape for leaf in leaves] == [leaf.shape for leaf in leaves] and x.grad.shape == x.shape


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_the_weights_gradients_are_views_of_the_kernels_buffer(gated: bool) -> None:
    # m = 48 as UniPELT's at BERT-base: gated, W_down gets 15 zero rows and the gate's; a copy of a gradient (an
    # add, a negative padding) would be one more kernel per adapter and step
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.manual_seed(3)
    d, m = 64, 48
    x = torch.randn(8, d, dtype=HALF, requires_grad=True)
    weights = [torch.randn(m, d), torch.randn(m), torch.randn(d, m), torch.randn(d)]
    weights += [torch.randn(1, d), torch.randn(1)] if gated else []
    weights = [w.requires_grad_() for w in weights]

    def adapter(x, *weights):
        with torch.autocast("cpu", dtype=HALF):
            return kb.bottleneck_add(x, None, *weights[:4], "relu", 1.0, *weights[4:])

    aot_function(adapter, fw_compiler=keep, bw_compiler=keep)(x, *weights).float().sum().backward()
    backward = graphs[1]
    ops = {node.target for node in backward.graph.nodes if node.op == "call_function"}
    views = {torch.ops.aten.view.default, torch.ops.aten.slice.Tensor, torch.ops.aten.split_with_sizes.default,
             torch.ops.aten.detach.default, operator.getitem, torch.ops.unipelt.bottleneck_backward.default}
    assert ops <= views, ops - views
    assert all(w.grad is not None and w.grad.shape == w.shape for w in weights)


def test_weights_in_half_precision_need_no_autocast_and_get_half_gradients() -> None:
    torch.manual_seed(1)
    x, wd, bd, wu, bu = (torch.randn(33, 24), torch.randn(8, 24) * 0.3, torch.randn(8) * 0.1,
                         torch.randn(24, 8) * 0.3, torch.randn(24) * 0.1)
    tensors = {"x": x.to(HALF), "w_down": wd.to(HALF), "b_down": bd.to(HALF), "w_up": wu.to(HALF), "b_up": bu.to(HALF)}
    assert kb.available(tensors["x"], HALF, 8, "silu")
    grad = torch.randn(33, 24)
    fused = adapter_pass(kb.bottleneck_add, tensors, "silu", 1.0, True, grad)
    exact = adapter_pass(kb.reference, {k: v.float() for k, v in tensors.items()}, "silu", 1.0, True, grad)
    assert all(t.dtype == HALF for t in fused)
    assert distance(fused, exact) < 5e-3


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
def test_inputs_of_any_layout_are_read_right(serial: bool) -> None:
    # x and the residual as slices of one wider tensor (a fused projection's output): rows 3 d apart
    torch.manual_seed(2)
    weights = [torch.randn(8, 24) * 0.3, torch.randn(8) * 0.1, torch.randn(24, 8) * 0.3, torch.randn(24) * 0.1]
    wide_values, grad = torch.randn(2, 9, 3 * 24), torch.randn(2, 9, 24)

    def run(fn, dtype):
        wide = wide_values.to(dtype).requires_grad_()
        x, residual = wide[..., 24:48], wide[..., 48:]
        out = fn(x, None if serial else residual, *weights, "gelu", 1.0)
        return [out.detach(), torch.autograd.grad(out, wide, grad.to(out.dtype))[0]]

    assert not wide_values[..., 24:48].reshape(-1, 24).is_contiguous()
    with torch.autocast("cpu", dtype=HALF):
        fused = run(kb.bottleneck_add, HALF)
    assert distance(fused, run(kb.reference, torch.float32)) < 5e-3


def test_an_empty_batch_takes_the_unfused_path() -> None:
    with torch.autocast("cpu", dtype=HALF):
        assert not kb.available(torch.empty(0, 5, 24, dtype=HALF), torch.float32, 8, "relu")


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=96, max_position_embeddings=32)
    torch.manual_seed(1234)  # one base model for every test
    return BertModel(config).eval()


def perturbed(spec: dict, seed: int = 0, train_head: bool = True) -> torch.nn.Module:
    model = tiny_bert()
    torch.manual_seed(seed)
    unipelt.attach(model, spec, train_head=train_head)
    with torch.no_grad():
        perturb_(unipelt.core.deltas(model).parameters(), seed, 0.2)
    return model


class CountingCalls:
    """Counts the fused calls the adapters make (the kernels' entry point, patched for the duration)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = kb.bottleneck_add

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(kb, "bottleneck_add", counted)


def model_pass(model: torch.nn.Module, ids: torch.Tensor, autocast: bool, **kwargs) -> list[torch.Tensor]:
    params = [p for n, p in model.named_parameters() if p.requires_grad and "pooler" not in n]
    with torch.autocast("cpu", dtype=HALF, enabled=autocast):
        out = model(input_ids=ids, **kwargs).last_hidden_state.float()
    direction = torch.linspace(-1.0, 1.0, out.numel()).view_as(out).sin()  # not a sum of squares: LN makes that flat
    return [out.detach(), *(g.float() for g in torch.autograd.grad((out * direction).sum(), params))]


SITES = {"houlsby": 4, "parallel": 2, "compacter": 4, "phm_adapter": 4, "sparse_adapter": 4, "pfeiffer": 2,
         "unipelt_legacy": 2}


@pytest.mark.parametrize("spec", [
    {"method": "houlsby", "bottleneck": 8, "activation": "silu"},
    {"method": "parallel", "bottleneck": 16, "scaling": 4.0},  # reads a LayerNorm's float32 output
    {"method": "compacter"},
    {"method": "phm_adapter", "bottleneck": 8, "n": 4},
    {"method": "sparse_adapter", "bottleneck": 8, "placement": "houlsby"},
    # the kernels' gate is per token (UniPELT's per-example mean runs unfused): unipelt_legacy's gated adapter
    # (m = 48, on W_2's output), beside the gated prefix and LoRA
    {"method": "unipelt_legacy"},
    {"method": "parallel", "bottleneck": 16, "scaling": 2.0, "gate": True, "gate_pooling": "token",
     "activation": "tanh"},
    {"method": "compacter", "gate": True, "gate_pooling": "token"},  # the gate as a module of its own unfused
], ids=lambda s: s["method"] + ("_gated" if s.get("gate") else ""))
def test_adapters_of_a_model_run_fused_under_autocast_as_precisely_as_unfused(spec: dict, monkeypatch) -> None:
    model = perturbed(spec)
    ids = torch.randint(1, 96, (2, 7))
    exact = model_pass(model, ids, autocast=False)
    counter = CountingCalls(monkeypatch)
    monkeypatch.setattr(kb, "enabled", False)
    unfused = model_pass(model, ids, autocast=True)
    assert counter.calls == 0
    monkeypatch.setattr(kb, "enabled", True)
    fused = model_pass(model, ids, autocast=True)
    assert counter.calls == SITES[spec["method"]]
    assert distance(fused, exact) <= 1.5 * distance(unfused, exact) + 1e-3


@pytest.mark.parametrize(("spec", "width"), [
    ({"method": "phm_adapter", "bottleneck": 8, "n": 4}, (16, 16, 16)),
    ({"method": "compacter", "bottleneck": 12}, (16, 16, 16)),
    # gated: W_down's rows leave room for the gate's (aligned_ranks adds it), and W_up keeps its 12 columns
    ({"method": "compacter", "bottleneck": 12, "gate": True, "gate_pooling": "token"}, (15, 15, 12)),
], ids=["phm_adapter", "compacter", "compacter_gated"])
def test_compacter_hands_the_kernels_ranks_padded_in_its_one_batched_build(spec: dict, width: tuple,
                                                                           monkeypatch) -> None:
    # the padding of every site's weights happens in the build (one kernel per tensor kind), not per call
    model = perturbed(spec)
    widths, original = [], kb.bottleneck_add

    def spy(x, residual, w_down, b_down, w_up, b_up, act, scale, *gate):
        widths.append((w_down.shape[0], b_down.shape[0], w_up.shape[1]))
        aligned = kb.aligned_ranks(w_down, b_down, w_up, *gate)
        assert aligned[2] is w_up and aligned[0].shape[0] == 16  # nothing left to pad but the gate's row
        return original(x, residual, w_down, b_down, w_up, b_up, act, scale, *gate)

    monkeypatch.setattr(kb, "bottleneck_add", spy)
    model_pass(model, torch.randint(1, 96, (2, 7)), autocast=True)
    assert widths == [width] * SITES[spec["method"]]


def test_a_fresh_adapter_leaves_the_base_output_exactly(monkeypatch) -> None:
    base = tiny_bert()
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=HALF):
        before = base(input_ids=ids).last_hidden_state
    counter = CountingCalls(monkeypatch)
    model = unipelt.attach(base, {"method": "houlsby", "bottleneck": 8, "init": "lora"})  # W_up = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=HALF):
        after = model(input_ids=ids).last_hidden_state
    assert counter.calls == 4
    assert torch.equal(before, after)


@pytest.mark.parametrize("case", ["gated too wide", "float32", "too wide", "switched off", "serving rows",
                                  "per-example gate", "float32 residual"])
def test_the_unfused_path_runs_where_the_kernels_would_compute_another_function(case: str, monkeypatch,
                                                                                  tmp_path) -> None:
    spec = {"method": "houlsby", "bottleneck": 8}
    if case == "gated too wide":  # the gate's logit takes one more rank than the kernels hold
        spec |= {"gate": True, "gate_pooling": "token", "bottleneck": kb.MAX_BOTTLENECK}
    if case == "too wide":
        spec["bottleneck"] = kb.MAX_BOTTLENECK + 8
    if case == "per-example gate":  # UniPELT's gate is a mean over the sequence; the kernels' is per token
        spec = {"method": "unipelt", "prefix": None, "lora": None}
    if case == "float32 residual":  # Pfeiffer's adapter adds to LN(h + x)'s input, float32 under autocast in BERT
        spec = {"method": "pfeiffer", "bottleneck": 8}
    model, kwargs = perturbed(spec), {}
    if case == "serving rows":  # each row's task: the delta is masked per row
        folders = {name: unipelt.save(perturbed(task, seed, train_head=False), tmp_path / name)
                   for seed, (name, task) in enumerate((("a", spec), ("b", {"method": "lora", "r": 2})))}
        model = tiny_bert()
        unipelt.load_tasks(model, folders)
        kwargs = {"task_ids": torch.tensor([0, 1])}
    if case == "switched off":
        monkeypatch.setattr(kb, "enabled", False)
    counter = CountingCalls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=HALF, enabled=case != "float32"):
        model(input_ids=torch.randint(1, 96, (2, 7)), **kwargs)
    assert counter.calls == 0
    if case not in ("serving rows", "per-example gate", "float32 residual"):  # fused once the reason is gone
        monkeypatch.setattr(kb, "enabled", True)
        if case in ("switched off", "float32"):
            with torch.no_grad(), torch.autocast("cpu", dtype=HALF):
                model(input_ids=torch.randint(1, 96, (2, 7)))
            assert counter.calls == 4  # Houlsby: after the attention and the FFN of both layers


@pytest.mark.parametrize("spec", [{"method": "houlsby", "bottleneck": 8, "activation": "gelu"},
                                  {"method": "unipelt_legacy", "prefix": None, "lora": None}],
                         ids=["houlsby", "unipelt_legacy"])
def test_a_compiled_model_runs_the_kernels_in_one_graph_with_eager_results(spec: dict) -> None:
    model = perturbed(spec)
    ids = torch.randint(1, 96, (2, 7))
    eager = model_pass(model, ids, autocast=True)
    compiled = model_pass(torch.compile(model), ids, autocast=True)
    assert distance(compiled, eager) < 1e-3
    with torch.autocast("cpu", dtype=HALF):
        explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_the_kernel_benchmark_runs_on_the_cpu_and_finds_the_fused_path_as_precise() -> None:
    # the benchmark's own code path (variants, errors, table) as a smoke run; its GPU timing needs a GPU
    fused_bottleneck = benchmark_script("fused_bottleneck")
    rows = fused_bottleneck.compare(tokens=40, width=24, bottlenecks=[8], activations=["silu"], steps=1, device="cpu",
                                    gates=(False, True), weight_dtypes=(torch.float32, HALF))
    assert [(r["gated"], r["weights"]) for r in rows] == [(False, "float32"), (False, str(HALF)[6:]),
                                                          (True, "float32"), (True, str(HALF)[6:])]
    assert "us_fused" not in rows[0]
    for row in rows:
        assert row["err_fused"] <= 1.5 * row["err_unfused"] + 1e-3
        assert row["err_fused+compiled"] <= 1.5 * row["err_compiled"] + 1e-3
    assert "| 8 | silu | on | float32 | - | - | - | - | - |" in fused_bottleneck.table(rows)
