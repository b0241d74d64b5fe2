"""SwiGLU on the output of the fused gate+up grouped GEMM, and the SwiGLU expert MLP.

``gate_up`` [S, 2I] holds the gate in columns [0, I) and up in [I, 2I) (the transformers
``gate_up_proj`` concatenated layout). Forward: silu(gate) * up. Both kernels compute in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from posttrain.kernels.grouped_gemm import grouped_gemm
from posttrain.kernels.launch import LazyKernel, next_pow2

_BLOCK_ROWS = 16
_MAX_BLOCK_I = 256


def _swiglu_fwd_kernel(
    h_ptr,  # [S, 2I]
    out_ptr,  # [S, I]
    num_rows,
    inter,
    stride_h,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < inter)
    base = h_ptr + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + inter, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=mask)


def _swiglu_bwd_kernel(
    h_ptr,  # [S, 2I]
    dout_ptr,  # [S, I]
    dh_ptr,  # [S, 2I]
    scale_ptr,  # [S] float32: dout of row r is scale[r] * dout[r] (HAS_SCALE)
    num_rows,
    inter,
    stride_h,
    stride_do,
    stride_dh,
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < inter)
    base = h_ptr + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + inter, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        dout = dout * tl.load(scale_ptr + rows, mask=rows < num_rows, other=0.0).to(tl.float32)[:, None]
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dout * silu
    dbase = dh_ptr + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dbase, d_gate, mask=mask)
    tl.store(dbase + inter, d_up, mask=mask)


_FWD = LazyKernel(_swiglu_fwd_kernel)
_BWD = LazyKernel(_swiglu_bwd_kernel)


def _grid(num_rows: int, inter: int) -> tuple[tuple[int, int], int]:
    block_i = min(_MAX_BLOCK_I, next_pow2(inter))
    return (triton.cdiv(num_rows, _BLOCK_ROWS), triton.cdiv(inter, block_i)), block_i


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a contiguous [S, 2I] tensor (no autograd)."""
    gate_up = gate_up.contiguous()
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid, block_i = _grid(num_rows, inter)
        _FWD[grid](gate_up, out, num_rows, inter, gate_up.stride(0), out.stride(0), BLOCK_R=_BLOCK_ROWS, BLOCK_I=block_i)
    return out


def swiglu_backward(
    gate_up: torch.Tensor, grad_out: torch.Tensor, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """d gate_up [S, 2I] for the output gradient ``grad_out`` [S, I] (times ``row_scale`` [S] if given)."""
    gate_up, grad_out = gate_up.contiguous(), grad_out.contiguous()
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    grad = torch.empty_like(gate_up)
    if grad.numel():
        grid, block_i = _grid(num_rows, inter)
        _BWD[grid](
            gate_up,
            grad_out,
            grad,
            row_scale if row_scale is not None else grad,
            num_rows,
            inter,
            gate_up.stride(0),
            grad_out.stride(0),
            grad.stride(0),
            HAS_SCALE=row_scale is not None,
            BLOCK_R=_BLOCK_ROWS,
            BLOCK_I=block_i,
        )
    return grad


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up with a fused Triton forward and backward; saves only ``gate_up``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad_out)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Differentiable SwiGLU; same contract as :func:`posttrain.kernels.reference.swiglu`."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: expected [S, 2I], got {tuple(gate_up.shape)}")
    return SwiGLU.apply(gate_up)


def expert_mlp(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    m_sizes: torch.Tensor,
    transposed_w: bool = False,
) -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows; same contract as ``reference.expert_mlp``.

    Gate and up come out of one grouped GEMM over the concatenated ``gate_up_proj``.
    """
    hidden = grouped_gemm(x, gate_up_proj, m_sizes, transposed_w)
    return grouped_gemm(swiglu(hidden), down_proj, m_sizes, transposed_w)
