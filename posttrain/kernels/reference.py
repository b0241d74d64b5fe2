"""Plain-torch reference implementations of the MoE kernels.

Every Triton kernel in :mod:`posttrain.kernels` has a function here with the same signature and
semantics; tests compare the two, and CPU runs without the Triton interpreter use these directly.
These functions may synchronise with the host (``.tolist()``); the kernels never do.

Notation: T tokens, E experts, k experts per token, S = T * k routed (token, expert) pairs,
H hidden size, I expert intermediate size, G groups (= experts) of a grouped GEMM.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F


class RouterOutput(NamedTuple):
    """What a top-k router produced for T tokens over E experts."""

    scores: torch.Tensor  # [T, E] float32: softmax or sigmoid of the router logits
    top_k_weights: torch.Tensor  # [T, k] float32: combine weights (renormalised if asked)
    top_k_index: torch.Tensor  # [T, k] int64: chosen experts, best first


class ShuffledIndices(NamedTuple):
    """Routed (token, expert) pairs sorted by expert, stable in flat pair order (t * k + j).

    The first three fields are MetaShuffling's index-shuffling outputs; ``slot_positions`` is the
    inverse permutation, which lets the combine step gather instead of scatter (deterministic,
    no atomics).
    """

    token_counts: torch.Tensor  # [E] int32: pairs routed to each expert (the grouped GEMM m_sizes)
    expert_indices: torch.Tensor  # [S] int32: expert of each shuffled row, non-decreasing
    token_indices: torch.Tensor  # [S] int32: source token of each shuffled row
    slot_positions: torch.Tensor  # [T, k] int32: shuffled row of the pair (token t, j-th choice)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    score_func: Literal["softmax", "sigmoid"] = "softmax",
    renormalize: bool = True,
) -> RouterOutput:
    """Top-k routing. ``router_logits``: [T, E]. Scores are computed in float32.

    ``renormalize`` divides the k chosen scores by their sum (Qwen3-MoE ``norm_topk_prob``).
    There is no Triton kernel for this step: it is a handful of fused-by-torch element-wise ops.
    """
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    top_k_weights, top_k_index = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return RouterOutput(scores, top_k_weights, top_k_index)


def dense_scales(top_k_weights: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter [T, k] combine weights into a dense [T, E] table (zeros elsewhere); differentiable."""
    dense = top_k_weights.new_zeros(top_k_weights.shape[0], num_experts)
    return dense.scatter(1, top_k_index.long(), top_k_weights)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ShuffledIndices:
    """Shuffle the pairs of ``top_k_index`` [T, k] so that rows routed to one expert are contiguous."""
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # [S]: flat pair index of each shuffled row
    counts = torch.bincount(flat, minlength=num_experts)
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=order.device)
    return ShuffledIndices(
        token_counts=counts.to(torch.int32),
        expert_indices=flat[order].to(torch.int32),
        token_indices=(order // top_k).to(torch.int32),
        slot_positions=slots.view(num_tokens, top_k).to(torch.int32),
    )


def index_shuffling(scores: torch.Tensor, top_k: int) -> ShuffledIndices:
    """Top-k over ``scores`` [T, E] (largest first), then :func:`sort_by_expert`.

    Equal scores are taken lower expert index first (a stable descending sort). ``torch.topk``
    picks the same experts with the same values, but its order among ties is unspecified (on CPU
    it is not index order); without ties the two are identical.
    """
    top_k_index = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    return sort_by_expert(top_k_index, scores.shape[1])


def _row_scales(indices: ShuffledIndices, scales: torch.Tensor | None) -> torch.Tensor | None:
    if scales is None:
        return None
    return scales[indices.token_indices.long(), indices.expert_indices.long()].float()  # [S]


def gather_mul(x: torch.Tensor, indices: ShuffledIndices, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Shuffle token rows into expert order: out[p] = x[token[p]] * scales[token[p], expert[p]].

    ``x``: [T, H]; ``scales``: [T, E] or None (plain gather). Returns [S, H] in ``x.dtype``.
    """
    rows = x[indices.token_indices.long()]
    row_scale = _row_scales(indices, scales)
    if row_scale is None:
        return rows
    return (rows.float() * row_scale[:, None]).to(x.dtype)


def scatter_add(
    y: torch.Tensor,
    indices: ShuffledIndices,
    scales: torch.Tensor | None = None,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Un-shuffle and combine: out[t] = shared[t] + sum_j scales[t, e_tj] * y[slot[t, j]].

    ``y``: [S, H] shuffled expert outputs; ``scales``: [T, E] or None (weight 1); ``shared``:
    [T, H] or None (e.g. a shared expert's output). Accumulates in float32, returns [T, H] in
    ``y.dtype``.
    """
    num_tokens, top_k = indices.slot_positions.shape
    row_scale = _row_scales(indices, scales)
    rows = y.float() if row_scale is None else y.float() * row_scale[:, None]
    out = rows[indices.slot_positions.long().reshape(-1)].view(num_tokens, top_k, -1).sum(dim=1)
    if shared is not None:
        out = out + shared.float()
    return out.to(y.dtype)


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool = False
) -> torch.Tensor:
    """Grouped GEMM: rows of ``x`` [M, K] are split into G consecutive groups of ``m_sizes`` [G] rows.

    ``w``: [G, N, K] (``transposed_w=False``, the ``nn.Linear`` layout) or [G, K, N]
    (``transposed_w=True``). out[rows of g] = x[rows of g] @ w[g]^T (resp. @ w[g]), accumulated in
    float32, returned in ``x.dtype``, shape [M, N]. Groups may be empty; rows past
    ``sum(m_sizes)`` (allowed to be < M) are zero in the output.
    """
    w_kn = w if transposed_w else w.transpose(1, 2)  # [G, K, N]
    out = x.new_zeros(x.shape[0], w_kn.shape[2], dtype=torch.float32)
    start = 0
    for g, size in enumerate(m_sizes.tolist()):
        if size:
            out[start : start + size] = x[start : start + size].float() @ w_kn[g].float()
        start += size
    return out.to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a concatenated [S, 2I] projection: silu(gate) * up, computed in float32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def expert_mlp(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    m_sizes: torch.Tensor,
    transposed_w: bool = False,
) -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows ``x`` [S, H].

    ``gate_up_proj``: [G, 2I, H] ([G, H, 2I] if ``transposed_w``), gate rows first;
    ``down_proj``: [G, H, I] ([G, I, H]). Gate and up come out of one grouped GEMM. Returns [S, H].
    """
    hidden = grouped_gemm(x, gate_up_proj, m_sizes, transposed_w)
    return grouped_gemm(swiglu(hidden), down_proj, m_sizes, transposed_w)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _per_group(rows: torch.Tensor, w_kn: torch.Tensor, m_sizes: torch.Tensor) -> torch.Tensor:
    """rows of group g @ w_kn[g] ([G, K, N]) in the accumulation dtype of ``rows``."""
    out = rows.new_zeros(rows.shape[0], w_kn.shape[2])
    start = 0
    for g, size in enumerate(m_sizes.tolist()):
        if size:
            out[start : start + size] = rows[start : start + size] @ w_kn[g]
        start += size
    return out


def _grouped_wgrad(
    x: torch.Tensor, dy: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool, dtype: torch.dtype
) -> torch.Tensor:
    """dW[g] = dy_g^T x_g per group (loop in x's dtype): [G, N, K], or [G, K, N] if ``transposed_w``."""
    dw = x.new_zeros(m_sizes.shape[0], dy.shape[1], x.shape[1])
    start = 0
    for g, size in enumerate(m_sizes.tolist()):
        if size:
            dw[g] = dy[start : start + size].T @ x[start : start + size]
        start += size
    return (dw.transpose(1, 2) if transposed_w else dw).contiguous().to(dtype)


def fused_experts_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    token_counts: torch.Tensor,
    token_indices: torch.Tensor,
    row_scales: torch.Tensor,
    transposed_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed SwiGLU experts on expert-sorted rows, gathered from and combined into tokens.

    ``x`` [T, H]; ``token_counts`` [E] rows per expert; ``token_indices`` [S] token of each
    expert-sorted row; ``row_scales`` [S] its combine weight. Returns (out [T, H] in ``x.dtype``:
    out[t] = sum over rows r of token t of row_scales[r] * MLP_e(x[t]), summed in float32;
    h [S, 2I] in the weights' dtype: the gate/up projection, which the backward needs).
    Like the kernels, h and SwiGLU's output are rounded to the weights' dtype between stages.
    """
    acc = _acc_dtype(x)
    tok = token_indices.long()
    w1 = (gate_up_proj if transposed_w else gate_up_proj.transpose(1, 2)).to(acc)  # [E, H, 2I]
    w2 = (down_proj if transposed_w else down_proj.transpose(1, 2)).to(acc)  # [E, I, H]
    h = _per_group(x.to(acc)[tok], w1, token_counts).to(gate_up_proj.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    a = (F.silu(gate) * up).to(down_proj.dtype).to(acc)
    y = _per_group(a, w2, token_counts)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    out.index_add_(0, tok, y * row_scales.to(acc)[:, None])
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
    """Gradients of :func:`fused_experts_forward`: (dx, d gate_up_proj, d down_proj, d row_scales).

    Written out by hand in float32 (this runs inside a custom op, where autograd is off); the
    tests check it against autograd through the unfused reference ops and finite differences.
    """
    acc = _acc_dtype(x)
    tok = token_indices.long()
    scales = row_scales.to(acc)
    dout = grad_out.to(acc)[tok]  # [S, H]
    w1 = (gate_up_proj if transposed_w else gate_up_proj.transpose(1, 2)).to(acc)  # [E, H, 2I]
    w2 = (down_proj if transposed_w else down_proj.transpose(1, 2)).to(acc)  # [E, I, H]
    gate, up = h.to(acc).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    a = gate * sig * up  # [S, I]
    g = _per_group(dout, w2.transpose(1, 2), token_counts)  # [S, I]
    d_scales = (g * a).sum(dim=1)
    da = g * scales[:, None]
    dh = torch.cat([da * up * sig * (1 + gate * (1 - sig)), da * gate * sig], dim=1)  # [S, 2I]
    d_rows = _per_group(dh, w1.transpose(1, 2), token_counts)  # [S, H]
    dx = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, tok, d_rows)
    d_down = _grouped_wgrad(a, dout * scales[:, None], token_counts, transposed_w, down_proj.dtype)
    d_gate_up = _grouped_wgrad(x.to(acc)[tok], dh, token_counts, transposed_w, gate_up_proj.dtype)
    return dx.to(x.dtype), d_gate_up, d_down, d_scales.to(row_scales.dtype)
