"""A bottleneck adapter and its residual add as Triton kernels, forward and backward.

``out = residual + s * G * (f(x W_d^T + b_d) W_u^T + b_u)``, with ``residual = x`` for a serial adapter and
``G = 1``, or UniPELT's gate ``G = sigmoid(x w_g^T + b_g)`` (one scalar per token).

Unfused and compiled, a 768-wide adapter with m = 48 at BERT-base's 4096 tokens is 23 kernels and about
58 us of GPU time per training step on an H200: small GEMMs with split-K reductions, bias sums, the
activation and its gradient, casts of the float32 weights and their gradients, and the adds, most of them
a pass over the 4096 x 768 activation. Here it is six kernels and a memset (about 37 us;
benchmarks/fused_bottleneck.py):

- forward: ``z = x W_d^T + b_d`` (one program per block of tokens, looping over the width), then
  ``out = residual + s (f(z) W_u^T + b_u)`` (a program per output tile, inner dimension m, the
  activation, biases, scale and residual in the epilogue);
- backward: ``grad_z = s (g W_u) * f'(z)`` with ``s f(z)`` for W_u's gradient, ``grad_x = grad_z W_d``
  (plus ``g`` for a serial adapter), and the two weight gradients with their bias sums, each split over
  the tokens into about one program per SM that adds its share with float32 atomics (so the bias and
  weight gradients' summation order varies between runs, as with other atomic reductions in torch).

The gate costs no kernel of its own: its row is one more rank of the down projection (``[W_d; w_g]``, a
concatenation of the small weights), so z's last column is the logit, and the up kernel scales its tile by
``G``. Backward, the logit's gradient ``s G (1 - G) g . u`` comes from pieces the first kernel has,
``g . u = f(z) . (g W_u) + g . b_u`` (``b_u`` as the up projection's rank for the gate's row); it is one more
rank of grad_z for ``grad_x`` and for the down projection's gradient, and the ``s G`` column beside
``s G f(z)`` gives ``b_u``'s.

The kernels read the weights in their own dtype (float32 under autocast) and cast tiles in registers, so
no cast kernels run and the gradients come back in the weights' dtype. Precision follows autocast's:
GEMMs take ``x``'s dtype with float32 accumulation, ``z`` is stored in that dtype. Saved for the
backward: ``x`` and ``z``. The ranks reach the kernels padded with zeros to a multiple of 16
(:func:`aligned_ranks`; gated, W_down's rows, the gate's included, and W_up as it is). The ops are opaque
to ``torch.compile`` (``torch.library.custom_op``): a compiled model runs them as they are, inside its one
graph.

Used where they compute the unfused path's function: a half-precision ``x`` on a GPU (or in Triton's
interpreter, for the tests) whose matmul would run in that dtype (autocast to it, or weights of it), a
bottleneck of at most :data:`MAX_BOTTLENECK` (wider ones are GEMMs cuBLAS runs well), and an activation
of :data:`ACTIVATIONS`. ``UNIPELT_FUSED=0`` in the environment (read at import) or ``enabled = False``
here turns them off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": 0, "silu": 1, "swish": 1, "gelu": 2, "tanh": 3}
MAX_BOTTLENECK = 128
_HALF = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests run the kernels on the CPU


def _load_triton():
    if not (_INTERPRET or torch.cuda.is_available()):
        return None  # importing Triton costs a CPU-only process time and buys nothing
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


_TRITON = _load_triton()
enabled = os.environ.get("UNIPELT_FUSED", "1") != "0"  # a switch for comparisons; the kernels stay registered


def reference(x: torch.Tensor, residual: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor,
              w_up: torch.Tensor, b_up: torch.Tensor, act: str, scale: float, w_gate: torch.Tensor | None = None,
              b_gate: torch.Tensor | None = None) -> torch.Tensor:
    """The function the kernels compute, in plain PyTorch (``residual=None``: serial, the residual is ``x``; with
    ``w_gate`` and ``b_gate``, UniPELT's per-token gate)."""
    z = F.linear(x, w_down.to(x.dtype), b_down.to(x.dtype))
    delta = F.linear(_ACT_FNS[act](z), w_up.to(x.dtype), b_up.to(x.dtype)) * scale
    if w_gate is not None:
        delta = delta * torch.sigmoid(F.linear(x, w_gate.to(x.dtype), b_gate.to(x.dtype)))
    return (x if residual is None else residual) + delta


_ACT_FNS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


def available(x: torch.Tensor, weight_dtype: torch.dtype, bottleneck: int, act: str, gated: bool = False) -> bool:
    """Whether :func:`bottleneck_add` runs the fused kernels for this input, weights' dtype, width and activation
    (``gated``: with a UniPELT gate, whose logit takes one more rank)."""
    if not enabled or _TRITON is None or x.dtype not in _HALF or act not in ACTIVATIONS:
        return False
    if bottleneck + gated > MAX_BOTTLENECK or x.numel() == 0:  # an empty grid is no launch
        return False
    if not (x.is_cuda or (_INTERPRET and x.device.type == "cpu")):
        return False
    # the unfused matmul runs in x's dtype only under autocast to it, or with weights of that dtype
    autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == x.dtype
    return autocast or weight_dtype == x.dtype


def rank_padding(ranks: int, gated: bool = False) -> int:
    """How many zero ranks take ``ranks``, plus the gate's when ``gated``, to a multiple of 16
    (:func:`aligned_ranks`)."""
    return -(ranks + gated) % 16


def aligned_ranks(w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None = None,
                  b_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_down, b_down, W_up)`` as the kernels take them: zero ranks appended up to a multiple of 16 (the same
    function: f(0) = 0); with a gate, its row and bias last, after W_down's zero rows.

    Triton vectorises a load only where it sees a row stride or a mask's bound divide by 16; the rank count
    is both. At m = 24 (Compacter's) every kernel ran slower than at m = 32 (H200, 40.7 against 32.9 us an
    adapter, run 68), though both compute 32 ranks in registers. The padding never widens that block (the
    next power of two). Gated, UniPELT's m = 48 runs 64 ranks where it ran 49, in the same 64-rank block
    (38.9 against 53.5 us an adapter, run 72); W_up stays as it is there: the kernels read its m columns, and
    its gradient is a view of theirs (padded, a copy: 45.7 us, run 71).
    """
    if w_gate is not None:  # autograd splits the gate row's gradient back
        pad = rank_padding(w_down.shape[0], gated=True)
        return _with_rows(w_down, pad, w_gate), _with_rows(b_down, pad, b_gate), w_up
    pad = rank_padding(w_down.shape[0])
    if not pad:
        return w_down, b_down, w_up
    return _with_rows(w_down, pad), _with_rows(b_down, pad), F.pad(w_up, (0, pad))


def _with_rows(t: torch.Tensor, zero_rows: int, *last: torch.Tensor) -> torch.Tensor:
    """``t`` with ``zero_rows`` rows of zeros and then ``last`` appended: one concatenation, whose backward is
    slices of the kernels' gradient buffer (a negative padding's, F.pad's backward, would copy them)."""
    return torch.cat([t, t.new_zeros((zero_rows, *t.shape[1:])), *(x.to(t.dtype) for x in last)])


def bottleneck_add(x: torch.Tensor, residual: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor,
                   w_up: torch.Tensor, b_up: torch.Tensor, act: str, scale: float, w_gate: torch.Tensor | None = None,
                   b_gate: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + scale * G * (f(x W_d^T + b_d) W_u^T + b_u)`` by the fused kernels; check :func:`available` first.

    ``x`` (..., d); ``residual`` like it, or None for a serial adapter (the residual is ``x``);
    ``w_down`` (m, d), ``w_up`` (d, m); ``G = sigmoid(x w_gate^T + b_gate)`` per token with a gate
    (``w_gate`` (1, d), ``b_gate`` (1,)), else 1.
    """
    shape = x.shape
    # the kernels index rows by the width: any other layout (a slice of a fused projection) is copied first
    flat = x.reshape(-1, shape[-1]).contiguous()
    res = residual.reshape(-1, shape[-1]).to(x.dtype).contiguous() if residual is not None else None
    weights = (w.contiguous() for w in (*aligned_ranks(w_down, b_down, w_up, w_gate, b_gate), b_up))
    out, _ = torch.ops.unipelt.bottleneck_forward(flat, res, *weights, w_gate is not None, ACTIVATIONS[act],
                                                  float(scale))
    return out.view(shape)


if _TRITON is not None:
    triton, tl = _TRITON

    # Block sizes: the fastest of a sweep on an H200 at BERT-base's shape (4096 tokens, d = 768, m = 48;
    # docs/findings.md), fixed rather than autotuned (the autotuner's timing runs cost the
    # first step a 256 MB buffer and seconds), then shrunk until the pipelined tiles fit the GPU's shared
    # memory (wide bottlenecks, smaller GPUs). Triton's interpreter (the CPU tests) runs the smallest blocks.
    def _fit(blocks: dict, tile_bytes, device: torch.device) -> dict:
        """``blocks`` with fewer stages, then half the ``BLOCK_K``/``BLOCK_M``, until the ``stages - 1`` buffers
        of ``tile_bytes(blocks)`` that Triton's pipelined loop keeps fit the device's shared memory per block
        (with room for its other uses)."""
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024) - 16 * 1024
        blocks = dict(blocks)
        while max(1, blocks["num_stages"] - 1) * tile_bytes(blocks) > limit:
            if blocks["num_stages"] > 2:
                blocks["num_stages"] -= 1
            elif blocks.get("BLOCK_K", 0) > 32:
                blocks["BLOCK_K"] //= 2
            elif blocks["BLOCK_M"] > 16:
                blocks["BLOCK_M"] //= 2
            else:
                break
        return blocks

    @functools.cache  # the same few shapes every step: chosen once, not on each call
    def _skinny_blocks(d: int, r: int, weight_bytes: int, backward: bool, device: torch.device) -> dict:
        if _INTERPRET:
            return dict(BLOCK_M=16, BLOCK_K=16, num_warps=1)
        block_k = min(64 if backward else 256, max(16, triton.next_power_of_2(d)))
        return _fit(dict(BLOCK_M=32, BLOCK_K=block_k, num_warps=4, num_stages=3),
                    lambda b: b["BLOCK_M"] * b["BLOCK_K"] * 2 + b["BLOCK_K"] * _block_r(r) * weight_bytes, device)

    @functools.cache
    def _tiled_blocks(d: int) -> dict:
        if _INTERPRET:
            return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
        return dict(BLOCK_M=64, BLOCK_N=min(128, max(16, triton.next_power_of_2(d))), num_warps=4, num_stages=2)

    @functools.cache
    def _weight_grad_blocks(d: int, r: int, device: torch.device) -> dict:
        if _INTERPRET:
            return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1)
        return _fit(dict(BLOCK_M=128, BLOCK_N=min(64, max(16, triton.next_power_of_2(d))), num_warps=4, num_stages=3),
                    lambda b: b["BLOCK_M"] * (b["BLOCK_N"] + _block_r(r)) * 2, device)

    @triton.jit
    def _activation(z, ACT: tl.constexpr):
        if ACT == 0:
            return tl.maximum(z, 0.0)
        if ACT == 1:
            return z * tl.sigmoid(z)
        if ACT == 2:
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh

    @triton.jit
    def _activation_grad(z, ACT: tl.constexpr):
        if ACT == 0:
            return tl.where(z > 0.0, 1.0, 0.0)
        if ACT == 1:
            sig = tl.sigmoid(z)
            return sig * (1.0 + z * (1.0 - sig))
        if ACT == 2:
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        return 1.0 - t * t

    @triton.jit
    def _skinny_kernel(a_ptr, w_ptr, bias_ptr, z_ptr, out_ptr, act_ptr, M, D, R, Z_STRIDE, scale, W_STRIDE_R,
                       W_STRIDE_D, BACKWARD: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Forward: ``out = a W^T + bias`` (z). Backward: ``out = s G (a W) * f'(z)`` (grad_z) and ``act = s G f(z)``.

        ``a`` (M, D); W has R ranks, its element (rank r, column d) at ``r * W_STRIDE_R + d * W_STRIDE_D``; the
        (M, R) tensors z, out and act have rows Z_STRIDE apart (:func:`_z_stride`). Gated, the last rank is the
        gate's: forward, W is [W_d; w_g], so z's last column is the gate logit; backward, W's last rank is b_u, so
        that column of the product is ``g . b_u``, and the outputs' last column is the logit's gradient (out) and
        ``s G`` (act, b_u's row weights).
        """
        dtype = a_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + cols
            k_ok = k < D
            a = tl.load(a_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + k[:, None] * W_STRIDE_D + ranks[None, :] * W_STRIDE_R,
                        mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            acc = tl.dot(a, w.to(dtype), acc)
        small = rows[:, None] * Z_STRIDE + ranks[None, :]
        small_ok = row_ok[:, None] & rank_ok[None, :]
        if BACKWARD:
            z = tl.load(z_ptr + small, mask=small_ok, other=0.0).to(tl.float32)
            if GATED:
                extra = (ranks == R - 1)[None, :]
                gate = tl.sigmoid(tl.sum(tl.where(extra, z, 0.0), axis=1))[:, None]
                z = tl.where(extra, 0.0, z)  # the logit is no rank of the bottleneck: f(0) = 0 there
                fz = _activation(z, ACT)
                grad_z = scale * gate * acc * _activation_grad(z, ACT)
                # d loss / d logit = s (g . u) G (1 - G), u = f(z) W_u^T + b_u: g . u = f(z) . (g W_u) + g . b_u
                g_dot_u = tl.sum(tl.where(extra, 1.0, fz) * acc, axis=1)[:, None]
                grad_z = tl.where(extra, scale * g_dot_u * gate * (1.0 - gate), grad_z)
                act_scaled = tl.where(extra, scale * gate, scale * gate * fz)
            else:
                grad_z = scale * acc * _activation_grad(z, ACT)
                act_scaled = scale * _activation(z, ACT)
            tl.store(out_ptr + small, grad_z.to(dtype), mask=small_ok)
            tl.store(act_ptr + small, act_scaled.to(dtype), mask=small_ok)
        else:
            bias = tl.load(bias_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + small, (acc + bias[None, :]).to(dtype), mask=small_ok)

    @triton.jit
    def _tiled_kernel(z_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, M, D, R, RZ, Z_STRIDE, scale, W_STRIDE_R, W_STRIDE_D,
                      ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``out = res + s G (f(z) W^T + bias)`` on one (BLOCK_M, BLOCK_N) tile; z has RZ ranks, W the first R of
        them (the rest count as zero). ACT < 0: ``z`` as it is. G = 1, or gated (forward only) the sigmoid of z's
        last column RZ - 1, the gate logit.

        Forward: z, W_u, b_u, the residual. Backward: grad_z, W_d (as its transpose; gated, [W_d; w_g] with the
        logit's gradient as one more rank of grad_z), no bias, ``g`` when serial.
        """
        dtype = z_ptr.dtype.element_ty
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        z = tl.load(z_ptr + rows[:, None] * Z_STRIDE + ranks[None, :], mask=row_ok[:, None] & (ranks < RZ)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + ranks[:, None] * W_STRIDE_R + n[None, :] * W_STRIDE_D,
                    mask=rank_ok[:, None] & n_ok[None, :], other=0.0)
        if ACT >= 0:
            if GATED:
                # the logit's rank of W is beyond its R (masked to zero above): f(logit) adds nothing to the dot
                gate = tl.sigmoid(tl.sum(tl.where((ranks == RZ - 1)[None, :], z.to(tl.float32), 0.0), axis=1))
            z = _activation(z.to(tl.float32), ACT).to(dtype)  # padded ranks: f(0) = 0 for every activation here
        y = tl.dot(z, w.to(dtype))
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = scale * y
        if ACT >= 0 and GATED:
            y = y * gate[:, None]
        at = rows[:, None] * D + n[None, :]
        tile_ok = row_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, y.to(dtype), mask=tile_ok)

    @triton.jit
    def _weight_grad_kernel(big_ptr, small_ptr, dw_ptr, dbig_ptr, dsmall_ptr, M, D, R, DW_RANKS, SMALL_STRIDE,
                            big_sum_scale, DW_STRIDE_R, DW_STRIDE_D, SUM_BIG: tl.constexpr, SUM_SMALL: tl.constexpr,
                            LAST_RANK_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """``dw += big^T small`` (small's R ranks, dw's first DW_RANKS) over this program's share of the tokens
        (split-K, float32 atomics), and the column sums of ``big`` (times ``big_sum_scale``) and of ``small`` when
        asked: the biases' gradients. LAST_RANK_BIAS: small's last column R - 1 holds each row's weight ``s G``,
        and that column of the product is the gradient of ``dbig`` (b_u's, gated). ``small``'s rows are
        SMALL_STRIDE apart."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < D
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        blocks = tl.cdiv(M, BLOCK_M)
        per_split = tl.cdiv(blocks, tl.num_programs(1))
        first = tl.program_id(1) * per_split
        acc = tl.zeros((BLOCK_N, BLOCK_R), tl.float32)
        big_sum = tl.zeros((BLOCK_N,), tl.float32)
        small_sum = tl.zeros((BLOCK_R,), tl.float32)
        for b in range(first, tl.minimum(first + per_split, blocks)):
            rows = (b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < M
            big = tl.load(big_ptr + rows[:, None] * D + n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            small = tl.load(small_ptr + rows[:, None] * SMALL_STRIDE + ranks[None, :],
                            mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(big), small, acc)
            if SUM_BIG:
                big_sum += tl.sum(big.to(tl.float32), axis=0)
            if SUM_SMALL:
                small_sum += tl.sum(small.to(tl.float32), axis=0)
        if LAST_RANK_BIAS:
            tl.atomic_add(dbig_ptr + n, tl.sum(tl.where((ranks == R - 1)[None, :], acc, 0.0), axis=1), mask=n_ok,
                          sem="relaxed")
        tl.atomic_add(dw_ptr + n[:, None] * DW_STRIDE_D + ranks[None, :] * DW_STRIDE_R, acc,
                      mask=n_ok[:, None] & (ranks < DW_RANKS)[None, :], sem="relaxed")
        if SUM_BIG:
            tl.atomic_add(dbig_ptr + n, big_sum * big_sum_scale, mask=n_ok, sem="relaxed")
        if SUM_SMALL:  # once: every column block summed the same rows of small (zeros from all but the first;
            # a mask built from program_id is refused by Triton 3.9's interpreter)
            first_column = (tl.program_id(0) == 0).to(tl.float32)
            tl.atomic_add(dsmall_ptr + ranks, small_sum * first_column, mask=rank_ok, sem="relaxed")

    def _z_stride(rz: int) -> int:
        """The row stride of the (tokens, rz) tensors z, grad_z and s f(z): a multiple of 16 elements, which Triton
        sees in the argument and which lets it vectorise their rows (the gate's 49 columns would not)."""
        return 16 * triton.cdiv(rz, 16)

    def _block_r(r: int) -> int:
        return max(16, triton.next_power_of_2(r))

    def _require_rows(*tensors: torch.Tensor | None) -> None:
        """The kernels index a row by its width: a strided view would be read wrong (Triton's interpreter,
        which the tests use, copies its inputs and would not notice)."""
        for t in tensors:
            if t is not None and not t.is_contiguous():
                raise ValueError(f"fused bottleneck kernels need contiguous tensors, got strides {t.stride()} "
                                 f"for shape {tuple(t.shape)}; call bottleneck_add, which copies them")

    def _require_ranks(w_down: torch.Tensor, w_up: torch.Tensor, gated: bool) -> None:
        """W_up's ranks are W_down's, or gated, at most those before the gate's row."""
        rz, r = w_down.shape[0], w_up.shape[1]
        if not (r < rz if gated else r == rz):
            raise ValueError(f"fused bottleneck kernels need W_down (r, d) and W_up (d, r) (gated, W_down with one row"
                             f" more), got {tuple(w_down.shape)} and {tuple(w_up.shape)}; call bottleneck_add")

    def _on_device(t: torch.Tensor):
        return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

    def _rows_grid(m_rows: int, blocks: dict) -> tuple[int]:
        return (triton.cdiv(m_rows, blocks["BLOCK_M"]),)

    def _tiles_grid(m_rows: int, d: int, blocks: dict) -> tuple[int, int]:
        return triton.cdiv(m_rows, blocks["BLOCK_M"]), triton.cdiv(d, blocks["BLOCK_N"])

    def _splits_grid(m_rows: int, d: int, blocks: dict, device: torch.device) -> tuple[int, int]:
        # about one program per SM, splitting the tokens; each split adds its share atomically
        programs = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        columns = triton.cdiv(d, blocks["BLOCK_N"])
        return columns, max(1, min(triton.cdiv(m_rows, blocks["BLOCK_M"]), triton.cdiv(programs, columns)))

    # Opaque custom ops, not ``triton_op``: Inductor then calls them as they are, where it would otherwise
    # functionalise the kernels' writes into fresh outputs and could add copies of them.
    @torch.library.custom_op("unipelt::bottleneck_forward", mutates_args=())
    def _forward(x: torch.Tensor, residual: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor,
                 w_up: torch.Tensor, b_up: torch.Tensor, gated: bool, act: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``out`` and ``z`` (tokens, rz, plus columns of padding: :func:`_z_stride`) for ``w_down`` (rz, d) and
        ``w_up`` (d, r), r = rz. Gated, ``w_down`` and ``b_down`` end with the gate's row and bias (z's last column
        is the gate logit) and r < rz: W_down's rows from r up to the gate's are zero."""
        _require_rows(x, residual, w_down, b_down, w_up, b_up)
        _require_ranks(w_down, w_up, gated)
        m_rows, d = x.shape
        r, rz = w_up.shape[1], w_down.shape[0]
        z = x.new_empty((m_rows, _z_stride(rz)))  # the padding columns are never read
        out = torch.empty_like(x)
        skinny = _skinny_blocks(d, rz, w_down.element_size(), backward=False, device=x.device)
        tiled = _tiled_blocks(d)
        with _on_device(x):  # Triton launches on the current device: a model split over GPUs needs x's
            # z = x W_d^T + b_d; W_d (rz, d): rank stride d, column stride 1. The forward reads neither the gate
            # nor the activation (a gate's row is a rank like the others): one compiled kernel serves every case
            _skinny_kernel[_rows_grid(m_rows, skinny)](
                x, w_down, b_down, z, z, z, m_rows, d, rz, z.shape[1], 1.0, d, 1, BACKWARD=False, GATED=False,
                ACT=0, BLOCK_R=_block_r(rz), **skinny)
            # out = residual + s G (f(z) W_u^T + b_u); W_u (d, r): rank stride 1, column stride r
            _tiled_kernel[_tiles_grid(m_rows, d, tiled)](
                z, w_up, b_up, x if residual is None else residual, out, m_rows, d, r, rz, z.shape[1], scale, 1, r,
                ACT=act, GATED=gated, HAS_BIAS=True, HAS_RES=True, BLOCK_R=_block_r(rz), **tiled)
        return out, z

    @torch.library.custom_op("unipelt::bottleneck_backward", mutates_args=())
    def _backward(grad_out: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_down: torch.Tensor,
                  w_up: torch.Tensor, b_up: torch.Tensor, gated: bool, act: int, scale: float,
                  serial: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``grad_x`` and one float32 vector holding the gradients of W_down, b_down (each with the gate's row
        when gated), W_up and b_up, in order."""
        _require_rows(grad_out, x, z, w_down, w_up, b_up)
        _require_ranks(w_down, w_up, gated)
        m_rows, d = grad_out.shape
        r, rz, zs = w_up.shape[1], w_down.shape[0], z.shape[1]
        grad_z, act_scaled = z.new_empty((m_rows, zs)), z.new_empty((m_rows, zs))
        grad_x = torch.empty_like(grad_out)
        grads = grad_out.new_zeros((rz * d + rz + d * r + d,), dtype=torch.float32)
        grad_w_down, grad_b_down, grad_w_up, grad_b_up = grads.split([rz * d, rz, d * r, d])
        # gated, b_u as the rank of W_u for the gate's row (so the product g W_u's last column is g . b_u), and as
        # the ranks between r and the gate's too: their z is 0, so f(z) = 0 and they add to no gradient kept
        w_up_ranks = torch.cat([w_up, b_up[:, None].to(w_up.dtype).expand(-1, rz - r)], 1) if gated else w_up
        skinny = _skinny_blocks(d, rz, w_up.element_size(), backward=True, device=grad_out.device)
        tiled, wgrad = _tiled_blocks(d), _weight_grad_blocks(d, rz, grad_out.device)
        splits = _splits_grid(m_rows, d, wgrad, grad_out.device)
        block_r = _block_r(rz)
        with _on_device(grad_out):
            # grad_z = s G (g W_u) * f'(z), with s G f(z) for W_u's gradient (gated, the logit's gradient and s G as
            # the last column); W_u as (rz, d): rank stride 1, column stride rz
            _skinny_kernel[_rows_grid(m_rows, skinny)](
                grad_out, w_up_ranks, w_up_ranks, z, grad_z, act_scaled, m_rows, d, rz, zs, scale, 1, rz,
                BACKWARD=True, GATED=gated, ACT=act, BLOCK_R=block_r, **skinny)
            # grad_x = grad_z W_d over rz ranks (+ g for a serial adapter, whose residual is x)
            _tiled_kernel[_tiles_grid(m_rows, d, tiled)](
                grad_z, w_down, w_down, grad_out, grad_x, m_rows, d, rz, rz, zs, 1.0, d, 1,
                ACT=-1, GATED=False, HAS_BIAS=False, HAS_RES=serial, BLOCK_R=block_r, **tiled)
            # W_u (d, r) += g^T s G f(z), b_u += sum(s G g) (gated: the product's last column); W_d (rz, d) +=
            # (x^T grad_z)^T, b_d += sum(grad_z)
            _weight_grad_kernel[splits](
                grad_out, act_scaled, grad_w_up, grad_b_up, grad_b_up, m_rows, d, rz, r, zs, scale, 1, r,
                SUM_BIG=not gated, SUM_SMALL=False, LAST_RANK_BIAS=gated, BLOCK_R=block_r, **wgrad)
            _weight_grad_kernel[splits](
                x, grad_z, grad_w_down, grad_b_down, grad_b_down, m_rows, d, rz, rz, zs, 1.0, d, 1,
                SUM_BIG=False, SUM_SMALL=True, LAST_RANK_BIAS=False, BLOCK_R=block_r, **wgrad)
        return grad_x, grads

    @_forward.register_fake
    def _forward_shapes(x, residual, w_down, b_down, w_up, b_up, gated, act, scale):
        return torch.empty_like(x), x.new_empty((x.shape[0], _z_stride(w_down.shape[0])))

    @_backward.register_fake
    def _backward_shapes(grad_out, x, z, w_down, w_up, b_up, gated, act, scale, serial):
        (rz, d), r = w_down.shape, w_up.shape[1]
        return torch.empty_like(grad_out), grad_out.new_empty((rz * d + rz + d * r + d,), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        x, residual, w_down, b_down, w_up, b_up, gated, act, scale = inputs
        ctx.save_for_backward(x, output[1], w_down, w_up, b_up)
        ctx.gated, ctx.act, ctx.scale, ctx.serial = gated, act, scale, residual is None
        ctx.layout = [(w.shape, w.dtype) for w in (w_down, b_down, w_up, b_up)]  # the gradient buffer's order

    def _autograd_backward(ctx, grad_out, _grad_z):
        x, z, w_down, w_up, b_up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x, grads = torch.ops.unipelt.bottleneck_backward(grad_out, x, z, w_down, w_up, b_up, ctx.gated, ctx.act,
                                                              ctx.scale, ctx.serial)
        pieces = grads.split([shape.numel() for shape, _ in ctx.layout])
        weight_grads = (p.view(shape).to(dtype) for (shape, dtype), p in zip(ctx.layout, pieces, strict=True))
        return grad_x, None if ctx.serial else grad_out, *weight_grads, None, None, None

    torch.library.register_autograd("unipelt::bottleneck_forward", _autograd_backward, setup_context=_setup_context)
