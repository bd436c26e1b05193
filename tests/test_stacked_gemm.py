"""GEMMs stacked over one input (an adapter's W_down with its gate's row, LoRA's A's with their gates) run
on aligned rows: their output width is padded to a multiple of 8, same values and gradients."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unipelt
from conftest import build, inputs
from unipelt.core import method_instances
from unipelt.runtime import stacked_linear


def test_stacked_linear_equals_separate_linears_and_pads_the_row_stride() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 32, generator=g, requires_grad=True)
    ws = [torch.randn(n, 32, generator=g, requires_grad=True) for n in (16, 1)]
    bs = [torch.randn(n, generator=g, requires_grad=True) for n in (16, 1)]
    parts = stacked_linear(x, ws, bs, [16, 1])
    assert [p.shape[-1] for p in parts] == [16, 1]
    assert parts[0].stride(-2) == 24  # 17 columns padded to 24: 16-byte rows in bf16
    alone = [torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs, strict=True)]
    # one GEMM of 24 columns against two of 16 and 1: the same sums, blocked differently by the CPU's BLAS
    # (3.7e-6 relative on one CPU, AMD EPYC)
    close = {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(parts, alone, strict=True):
        torch.testing.assert_close(a, b, **close)
    grads = torch.autograd.grad(sum(p.square().sum() for p in parts), [x, *ws, *bs])
    expected = torch.autograd.grad(sum(p.square().sum() for p in alone), [x, *ws, *bs])
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, **close)
    assert stacked_linear(x, ws[:1], None, [16])[0].stride(-2) == 16  # aligned already: no padding


class _GemmShapes(TorchDispatchMode):
    """What the GEMMs of a pass see: every size of the 2-D ones' operands (``dims``) and the inner
    (contracted) size of every one, batched ones too (``inner``)."""

    def __init__(self) -> None:
        super().__init__()
        self.dims: set[int] = set()
        self.inner: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            self.dims.update(d for a in args if isinstance(a, torch.Tensor) for d in a.shape)
        if name in ("mm", "bmm", "addmm", "baddbmm"):
            self.inner.append(args[name in ("addmm", "baddbmm")].shape[-1])
        return func(*args, **(kwargs or {}))


def test_unipelt_runs_no_gemm_of_the_unpadded_stacked_widths() -> None:
    model = build("bert")
    unipelt.attach(model, {"method": "unipelt", "adapter": {"bottleneck": 16}})  # d / 16 = 2 would meet other dims
    methods = {type(m).__name__: m for m in method_instances(model).values()}
    m = methods["Adapter"].bottleneck
    r = methods["LoRA"].config.r
    recorder = _GemmShapes()
    with recorder:
        model(**inputs("bert")).logits.square().sum().backward()
    # the adapter's W_down + gate (m + 1) and LoRA's q, v A's + two gates (2 r + 2), unpadded
    assert recorder.dims.isdisjoint({m + 1, 2 * r + 2}), sorted(recorder.dims)
    assert {m + 1 + (-(m + 1) % 8), 2 * r + 2 + (-(2 * r + 2) % 8)} <= recorder.dims


def test_gated_sparse_adapter_runs_no_gemm_of_the_unpadded_stacked_width() -> None:
    """SparseAdapter's gated PyTorch path stacks its masked W_down with the gate's row as Adapter's does."""
    model = build("bert")
    unipelt.attach(model, {"method": "sparse_adapter", "bottleneck": 16, "gate": True})
    recorder = _GemmShapes()
    with recorder:
        model(**inputs("bert")).logits.square().sum().backward()
    assert 17 not in recorder.dims and 24 in recorder.dims, sorted(recorder.dims)


def test_rank_one_factors_are_an_outer_product_not_a_gemm_of_inner_size_one() -> None:
    """KAdaptation's u_i v_i^T at rank 1: a broadcast product with the values and gradients of the matmul,
    and no GEMM of inner size 1 in either pass."""
    from unipelt.methods.kadaptation import low_rank_product

    g = torch.Generator().manual_seed(0)
    for rank in (1, 3):
        s = torch.randn(2, 4, 6, rank, generator=g, requires_grad=True)
        t = torch.randn(2, 4, rank, 5, generator=g, requires_grad=True)
        got, expected = low_rank_product(s, t), s @ t
        torch.testing.assert_close(got, expected)
        direction = torch.randn(expected.shape, generator=g)
        for a, b in zip(torch.autograd.grad((got * direction).sum(), [s, t]),
                        torch.autograd.grad((expected * direction).sum(), [s, t]), strict=True):
            torch.testing.assert_close(a, b)
    model = build("bert")
    unipelt.attach(model, {"method": "kadaptation", "n": 4})  # n = d = 32 would make 1 x 1 blocks
    recorder = _GemmShapes()
    with recorder:
        model(**inputs("bert")).logits.square().sum().backward()
    assert recorder.inner and 1 not in recorder.inner, sorted(set(recorder.inner))
