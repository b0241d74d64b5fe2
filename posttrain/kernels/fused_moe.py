"""Routed SwiGLU experts with the gather fused into the first GEMM and the combine into the second.

Forward (S = T * k routed rows in expert order, ``token_indices`` [S] the token of each row,
``row_scales`` [S] its routing weight):

    h   = GEMM1(x[token_indices])                     # gather in the A loads: no [S, H] copy
    a   = silu(h[:, :I]) * h[:, I:]
    out = zeros[T, H];  out[token[r]] += row_scales[r] * GEMM2(a)[r]   # epilogue scatter-add

Backward, with g = dout[token] @ W2 (gathered A loads again):

    d row_scales[r] = <g[r], a[r]>                    # over I, not H: y = GEMM2(a) is never needed
    dh   = swiglu'(h) * (row_scales * g)              # the scale is applied inside the SwiGLU kernel
    dW2  = (row_scales * dout[token])^T a             # gathered, scaled dy loads in the dW kernel
    dW1  = dh^T x[token]                              # gathered x loads in the dW kernel
    dx   = scatter-add of dh @ W1                     # epilogue scatter-add, weight 1

Saved for backward: ``h`` [S, 2I] (what SwiGLU's backward needs; ``a`` is recomputed from it) and
the inputs. Nothing of shape [S, H] is materialised in either direction. The scatter-adds use
float32 atomics: with k <= 2 the sum is exact-order independent (a + b == b + a); with k > 2 the
order of k float32 additions per element may vary between runs (~1 ulp of float32).
"""

from __future__ import annotations

import torch

from posttrain.kernels.grouped_gemm import grouped_gemm_forward, grouped_gemm_wgrad
from posttrain.kernels.swiglu import swiglu_backward, swiglu_forward


def fused_experts_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    token_counts: torch.Tensor,
    token_indices: torch.Tensor,
    row_scales: torch.Tensor,
    transposed_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H] in ``x.dtype``, h [S, 2I]); same contract as ``reference.fused_experts_forward``."""
    num_rows = token_indices.shape[0]
    x = x.contiguous()
    h = grouped_gemm_forward(x, gate_up_proj, token_counts, transposed_w, a_idx=token_indices, num_rows=num_rows)
    a = swiglu_forward(h)
    hidden = down_proj.shape[2] if transposed_w else down_proj.shape[1]
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)
    grouped_gemm_forward(
        a, down_proj, token_counts, transposed_w, out=out, scatter_idx=token_indices, scatter_scale=row_scales.float()
    )
    return out.to(x.dtype), h


def fused_experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    token_counts: torch.Tensor,
    token_indices: torch.Tensor,
    row_scales: torch.Tensor,
    h: torch.Tensor,
    transposed_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d gate_up_proj, d down_proj, d row_scales); same contract as the reference."""
    num_rows = token_indices.shape[0]
    scales = row_scales.float().contiguous()
    dout = grad_out.to(down_proj.dtype).contiguous()
    x = x.contiguous()
    a = swiglu_forward(h)
    g = grouped_gemm_forward(dout, down_proj, token_counts, not transposed_w, a_idx=token_indices, num_rows=num_rows)
    d_scales = (g.float() * a.float()).sum(dim=1)
    dh = swiglu_backward(h, g, scales)
    d_down = grouped_gemm_wgrad(
        a, dout, token_counts, transposed_w, dy_idx=token_indices, dy_scale=scales, num_rows=num_rows
    )
    d_gate_up = grouped_gemm_wgrad(x, dh, token_counts, transposed_w, x_idx=token_indices, num_rows=num_rows)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grouped_gemm_forward(dh, gate_up_proj, token_counts, not transposed_w, out=dx, scatter_idx=token_indices)
    return dx.to(x.dtype), d_gate_up, d_down, d_scales.to(row_scales.dtype)
