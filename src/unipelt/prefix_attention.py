"""Attention over ``[prefix; keys]`` as two score blocks, merged by their log-sum-exp.

Prepending ``l`` prefix keys to ``n`` keys makes the fused attention kernel walk ``n + l`` keys in tiles
of 64: at BERT-base (n = 128, l = 10) that is three tiles instead of two, 50% more attention work in
both passes for 8% more keys. Here the kernel runs over the model's own keys only and returns its
softmax statistics (``lse_1``, the log of the row's sum of ``exp(scores)``); the few prefix scores are
one small batched matmul. The two halves combine exactly:

    lse = logaddexp(lse_1, lse_2),   out = exp(lse_1 - lse) out_1 + softmax-weights_2 P_v

Backward uses the kernel's own backward with the merged ``out`` and ``lse`` (a block's gradients only
need the row's global statistics, the ring-attention identity), plus the prefix block's few matmuls.

Used by :mod:`unipelt.attention` for SDPA when the call allows it (:func:`applies`): queries and keys
with the same number of heads, no dropout, not causal, no position bias. Anything else takes the
concatenation path.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def applies(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
            causal: bool, position_bias: torch.Tensor | None) -> bool:
    """Whether :func:`prefix_attention` can serve this SDPA call (else the caller concatenates)."""
    if dropout or causal or position_bias is not None or query.shape[1] != key.shape[1]:
        return False
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16) or query.shape[-1] > 128:
        return False
    if query.device.type == "cuda":
        # the kernel with statistics for these: cuDNN (half types, no mask), else memory-efficient
        return attention_mask is None or attention_mask.dim() == 4
    return query.device.type == "cpu" and (attention_mask is None or attention_mask.dim() == 4)


def _main_block(q, k, v, bias, scale):
    """The fused kernel over the model's keys: ``(out, lse in the kernel's layout, kernel, tensors, sizes)``,
    the last three what its backward needs besides the inputs."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse, "cpu", (), ()
    if bias is None and q.dtype in (torch.bfloat16, torch.float16):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
        return out, lse, "cudnn", (cum_q, cum_k, seed, offset), (max_q, max_k)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
    return out, lse, "efficient", (seed, offset), ()


def _main_block_backward(grad, q, k, v, bias, out, lse, kernel, tensors, sizes, scale):
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, False,
                                                                        attn_mask=bias, scale=scale)
    if kernel == "cudnn":
        cum_q, cum_k, seed, offset = tensors
        return aten._scaled_dot_product_cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None, cum_q,
                                                                 cum_k, *sizes, 0.0, False, scale=scale)
    seed, offset = tensors
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale)
    return dq, dk, dv


def _rows(lse: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The kernel's statistics as (batch, heads, queries): cuDNN adds a trailing 1, the memory-efficient
    kernel pads the queries to a multiple of 32."""
    return lse.reshape(*lse.shape[:2], -1)[..., :n_queries]


def _as_layout(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows`` (batch, heads, queries) back in the kernel's layout ``like`` (padding kept as it was)."""
    flat = like.reshape(*like.shape[:2], -1)
    if flat.shape[-1] != rows.shape[-1]:
        rows = torch.cat([rows, flat[..., rows.shape[-1]:]], dim=-1)
    return rows.reshape(like.shape)


class _PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, bias, scale):
        out_1, lse_1, kernel, tensors, sizes = _main_block(q, k, v, bias, scale)
        rows_1 = _rows(lse_1, q.shape[2])
        scores_2 = torch.matmul(q, pk.transpose(-1, -2)).float() * scale
        lse = torch.logaddexp(rows_1, torch.logsumexp(scores_2, dim=-1))
        weights_2 = torch.exp(scores_2 - lse.unsqueeze(-1))
        out = (torch.exp(rows_1 - lse).unsqueeze(-1) * out_1.float()
               + torch.matmul(weights_2.to(pv.dtype), pv).float()).to(q.dtype)
        ctx.save_for_backward(q, k, v, pk, pv, bias, out, _as_layout(lse, lse_1), *tensors)
        ctx.kernel, ctx.sizes, ctx.scale = kernel, sizes, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, pk, pv, bias, out, lse, *tensors = ctx.saved_tensors
        scale = ctx.scale
        grad = grad.contiguous()
        dq, dk, dv = _main_block_backward(grad, q, k, v, bias, out, lse, ctx.kernel, tensors, ctx.sizes, scale)
        # the prefix block, its weights recomputed ((b, h, n, l) is small): dS = P (dO P_v^T - rowsum(dO * O))
        weights_2 = torch.exp(torch.matmul(q, pk.transpose(-1, -2)).float() * scale
                              - _rows(lse, q.shape[2]).unsqueeze(-1))
        row_dot = (grad.float() * out.float()).sum(-1, keepdim=True)
        d_pv = torch.matmul(weights_2.transpose(-1, -2).to(grad.dtype), grad)
        d_scores = (weights_2 * (torch.matmul(grad, pv.transpose(-1, -2)).float() - row_dot) * scale).to(q.dtype)
        dq = dq + torch.matmul(d_scores, pk)
        d_pk = torch.matmul(d_scores.transpose(-1, -2), q)
        return dq, dk, dv, _reduce_to(d_pk, pk), _reduce_to(d_pv, pv), None, None


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dimensions ``like`` broadcast (a prefix shared by the batch)."""
    dims = [i for i, (g, t) in enumerate(zip(grad.shape, like.shape, strict=True)) if t == 1 and g != 1]
    return (grad.sum(dims, keepdim=True) if dims else grad).to(like.dtype)


def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                     prefix_value: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``softmax([q P_k^T, q K^T] * scale + [0, mask]) [P_v; V]``, shaped like SDPA's output (b, h, n, d).

    ``attention_mask``: None, or boolean / additive over the model's keys, broadcastable to
    (b, h, n_queries, n_keys); the prefix is visible to every query.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    bias = attention_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(
                ~bias, torch.finfo(query.dtype).min)
        bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        if query.device.type == "cuda":
            bias = _aligned(bias)
    return _PrefixAttention.apply(query, key, value, prefix_key.to(query.dtype), prefix_value.to(query.dtype), bias,
                                  scale)


def _aligned(bias: torch.Tensor) -> torch.Tensor:
    """The memory-efficient kernel reads the bias's rows at 16-element aligned strides: pad and view."""
    n = bias.shape[-1]
    pad = -n % 16
    if pad == 0 and bias.stride(-1) == 1:
        return bias
    return torch.nn.functional.pad(bias, (0, pad))[..., :n]
