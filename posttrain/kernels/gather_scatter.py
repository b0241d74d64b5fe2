"""Fused gather-mul (tokens -> expert order) and scatter-add (expert order -> tokens) in Triton.

The two are each other's backward: the gradient of a gather is a scatter-add and vice versa. The
scatter-add is computed as a per-token gather over ``slot_positions`` (the inverse permutation),
so it needs no atomics and sums the k expert outputs of a token in a fixed order, in float32.
Per-pair scale gradients come from a row-dot kernel and land in a dense [T, E] table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from posttrain.kernels.launch import LazyKernel, next_pow2
from posttrain.kernels.reference import ShuffledIndices

_BLOCK_ROWS = 16
_MAX_BLOCK_H = 256


def _gather_mul_kernel(
    x_ptr,  # [T, H]
    token_ptr,  # [S] int32
    expert_ptr,  # [S] int32
    scales_ptr,  # [T, E] (ignored unless HAS_SCALES)
    out_ptr,  # [S, H]
    num_rows,
    hidden,
    stride_x,
    stride_s,
    stride_o,
    HAS_SCALES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r_mask = rows < num_rows
    mask = r_mask[:, None] & (cols[None, :] < hidden)
    tok = tl.load(token_ptr + rows, mask=r_mask, other=0).to(tl.int64)
    vals = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALES:
        exp = tl.load(expert_ptr + rows, mask=r_mask, other=0)
        scale = tl.load(scales_ptr + tok * stride_s + exp, mask=r_mask, other=0.0).to(tl.float32)
        vals = vals.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], vals, mask=mask)


def _combine_kernel(
    y_ptr,  # [S, H]
    slot_ptr,  # [T, TOP_K] int32
    expert_ptr,  # [S] int32
    scales_ptr,  # [T, E]
    shared_ptr,  # [T, H]
    out_ptr,  # [T, H]
    num_tokens,
    hidden,
    stride_y,
    stride_s,
    stride_sh,
    stride_o,
    TOP_K: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = toks < num_tokens
    mask = t_mask[:, None] & (cols[None, :] < hidden)
    toks64 = toks.to(tl.int64)
    if HAS_SHARED:
        acc = tl.load(shared_ptr + toks64[:, None] * stride_sh + cols[None, :], mask=mask, other=0.0)
        acc = acc.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = tl.load(slot_ptr + toks64 * TOP_K + j, mask=t_mask, other=0).to(tl.int64)
        rows = tl.load(y_ptr + slot[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALES:
            exp = tl.load(expert_ptr + slot, mask=t_mask, other=0)
            scale = tl.load(scales_ptr + toks64 * stride_s + exp, mask=t_mask, other=0.0).to(tl.float32)
            rows = rows * scale[:, None]
        acc += rows
    tl.store(out_ptr + toks64[:, None] * stride_o + cols[None, :], acc, mask=mask)


def _row_dot_kernel(
    a_ptr,  # [S, H]
    b_ptr,  # [T, H], row of pair p is b_idx[p]
    b_idx_ptr,  # [S] int32
    out_ptr,  # [S] float32
    num_rows,
    hidden,
    stride_a,
    stride_b,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < num_rows
    b_rows = tl.load(b_idx_ptr + rows, mask=r_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = r_mask[:, None] & (cols[None, :] < hidden)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + cols[None, :], mask=mask, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc, mask=r_mask)


_GATHER = LazyKernel(_gather_mul_kernel)
_COMBINE = LazyKernel(_combine_kernel)
_ROW_DOT = LazyKernel(_row_dot_kernel)


def _block_h(hidden: int) -> int:
    return min(_MAX_BLOCK_H, next_pow2(hidden))


def gather_mul_forward(
    x: torch.Tensor, indices: ShuffledIndices, scales: torch.Tensor | None
) -> torch.Tensor:
    """out[p] = x[token[p]] * scales[token[p], expert[p]]: [S, H] in ``x.dtype`` (no autograd)."""
    x = x.contiguous()
    num_rows, hidden = indices.token_indices.shape[0], x.shape[1]
    out = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_h = _block_h(hidden)
    scales_arg = scales.contiguous() if scales is not None else x
    _GATHER[(triton.cdiv(num_rows, _BLOCK_ROWS), triton.cdiv(hidden, block_h))](
        x,
        indices.token_indices,
        indices.expert_indices,
        scales_arg,
        out,
        num_rows,
        hidden,
        x.stride(0),
        scales_arg.stride(0),
        out.stride(0),
        HAS_SCALES=scales is not None,
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_H=block_h,
    )
    return out


def scatter_add_forward(
    y: torch.Tensor, indices: ShuffledIndices, scales: torch.Tensor | None, shared: torch.Tensor | None
) -> torch.Tensor:
    """out[t] = shared[t] + sum_j scales[t, e_tj] * y[slot[t, j]]: [T, H] in ``y.dtype`` (no autograd)."""
    y = y.contiguous()
    num_tokens, top_k = indices.slot_positions.shape
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    block_h = _block_h(hidden)
    scales_arg = scales.contiguous() if scales is not None else y
    shared_arg = shared.contiguous() if shared is not None else y
    _COMBINE[(triton.cdiv(num_tokens, _BLOCK_ROWS), triton.cdiv(hidden, block_h))](
        y,
        indices.slot_positions,
        indices.expert_indices,
        scales_arg,
        shared_arg,
        out,
        num_tokens,
        hidden,
        y.stride(0),
        scales_arg.stride(0),
        shared_arg.stride(0),
        out.stride(0),
        TOP_K=top_k,
        HAS_SCALES=scales is not None,
        HAS_SHARED=shared is not None,
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_H=block_h,
    )
    return out


def _pair_scale_grad(
    rows: torch.Tensor, tokens: torch.Tensor, indices: ShuffledIndices, scales: torch.Tensor
) -> torch.Tensor:
    """d scales [T, E]: entry (token[p], expert[p]) = <rows[p], tokens[token[p]]>, zero elsewhere."""
    rows, tokens = rows.contiguous(), tokens.contiguous()
    num_rows, hidden = rows.shape
    dots = torch.empty(num_rows, dtype=torch.float32, device=rows.device)
    if num_rows:
        _ROW_DOT[(triton.cdiv(num_rows, _BLOCK_ROWS),)](
            rows,
            tokens,
            indices.token_indices,
            dots,
            num_rows,
            hidden,
            rows.stride(0),
            tokens.stride(0),
            BLOCK_R=_BLOCK_ROWS,
            BLOCK_H=_block_h(hidden),
        )
    grad = torch.zeros(scales.shape, dtype=torch.float32, device=scales.device)
    grad.index_put_((indices.token_indices.long(), indices.expert_indices.long()), dots, accumulate=True)
    return grad.to(scales.dtype)


class GatherMul(torch.autograd.Function):
    """Autograd for :func:`gather_mul`: dx is a scatter-add of dout, dscales a row dot."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scales: torch.Tensor | None,
        *index_tensors: torch.Tensor,
    ) -> torch.Tensor:
        indices = ShuffledIndices(*index_tensors)
        ctx.save_for_backward(x, scales, *index_tensors)
        return gather_mul_forward(x, indices, scales)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, scales, *index_tensors = ctx.saved_tensors
        indices = ShuffledIndices(*index_tensors)
        grad_x = grad_scales = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_add_forward(grad_out.to(x.dtype), indices, scales, None)
        if scales is not None and ctx.needs_input_grad[1]:
            grad_scales = _pair_scale_grad(grad_out, x, indices, scales)
        return (grad_x, grad_scales) + (None,) * len(index_tensors)


class ScatterAdd(torch.autograd.Function):
    """Autograd for :func:`scatter_add`: dy is a gather-mul of dout, dscales a row dot."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        scales: torch.Tensor | None,
        shared: torch.Tensor | None,
        *index_tensors: torch.Tensor,
    ) -> torch.Tensor:
        indices = ShuffledIndices(*index_tensors)
        ctx.save_for_backward(y, scales, *index_tensors)
        ctx.has_shared = shared is not None
        return scatter_add_forward(y, indices, scales, shared)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        y, scales, *index_tensors = ctx.saved_tensors
        indices = ShuffledIndices(*index_tensors)
        grad_y = grad_scales = grad_shared = None
        if ctx.needs_input_grad[0]:
            grad_y = gather_mul_forward(grad_out.to(y.dtype), indices, scales)
        if scales is not None and ctx.needs_input_grad[1]:
            grad_scales = _pair_scale_grad(y, grad_out, indices, scales)
        if ctx.has_shared and ctx.needs_input_grad[2]:
            grad_shared = grad_out
        return (grad_y, grad_scales, grad_shared) + (None,) * len(index_tensors)


def gather_mul(x: torch.Tensor, indices: ShuffledIndices, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable gather-mul; same contract as :func:`posttrain.kernels.reference.gather_mul`."""
    return GatherMul.apply(x, scales, *indices)


def scatter_add(
    y: torch.Tensor,
    indices: ShuffledIndices,
    scales: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable combine; same contract as :func:`posttrain.kernels.reference.scatter_add`."""
    return ScatterAdd.apply(y, scales, shared, *indices)
