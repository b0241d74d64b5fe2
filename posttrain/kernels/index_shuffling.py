"""Index shuffling: top-k + bincount + stable sort-by-expert in two Triton launches, no host sync.

Design (after MetaShuffling's cooperative kernel, without its grid-wide spin barrier, which would
deadlock when programs do not all run at once, e.g. under the interpreter): histogram, scan,
then placement by every program.

1. Each program takes BLOCK_T tokens. It picks their top-k experts (k rounds of argmax over the
   scores) or reads a given ``top_k_index``, computes each pair's rank among the block's pairs of
   the same expert (a cumulative sum of one-hot rows, so the order is stable), and writes the
   block's per-expert histogram.
2. Programs then bump an atomic counter; the one that arrives last sees every histogram. It turns
   them into per-block exclusive prefixes and per-expert start offsets and writes
   ``token_counts`` (E x blocks integers: a few loads per program-width of work).
3. A second launch (stream order is the barrier) with one program per block places the block's
   pairs in parallel: position = start[e] + prefix[block, e] + rank.

The result is identical to a stable ``argsort`` of the flat (t * k + j) expert ids: deterministic,
so the backward's weight-gradient reductions run in the same order every step. Top-k ties are
broken towards the lower expert index (``tl.argmax`` picks the first maximum), as a stable
descending sort does; see ``reference.index_shuffling``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from posttrain.kernels.launch import LazyKernel, interpreter_enabled, next_pow2
from posttrain.kernels.reference import ShuffledIndices

# Element budget of the [BLOCK_T * K_PAD, BLOCK_E] one-hot tile each program holds.
_ONE_HOT_BUDGET = 8192


def _index_shuffling_kernel(
    scores_ptr,  # [T, E] float, read when FROM_SCORES
    topk_ptr,  # [T, TOP_K] int: written when FROM_SCORES, read otherwise
    rank_ptr,  # [T * TOP_K] int32 scratch: rank of each pair inside its block and expert
    hist_ptr,  # [NUM_BLOCKS, E] int32 scratch: per-block histograms, then exclusive prefixes
    starts_ptr,  # [E] int32 scratch: first shuffled row of each expert
    done_ptr,  # [1] int32, zero on entry: programs that finished phase 1
    counts_ptr,  # [E] int32 out
    num_tokens,
    num_experts,
    stride_st,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    FROM_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_NB: tl.constexpr,
):
    pid = tl.program_id(0)
    num_blocks = tl.num_programs(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, K_PAD)
    offs_e = tl.arange(0, BLOCK_E)
    pair = offs_t[:, None] * TOP_K + offs_j[None, :]  # [BLOCK_T, K_PAD]
    valid = (offs_t[:, None] < num_tokens) & (offs_j[None, :] < TOP_K)

    # Phase 1a: the experts of each pair, best first.
    if FROM_SCORES:
        s_mask = (offs_t[:, None] < num_tokens) & (offs_e[None, :] < num_experts)
        s = tl.load(
            scores_ptr + offs_t[:, None].to(tl.int64) * stride_st + offs_e[None, :], mask=s_mask, other=float("-inf")
        ).to(tl.float32)
        sel = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(s, axis=1).to(tl.int32)  # [BLOCK_T]
            sel = tl.where(offs_j[None, :] == j, best[:, None], sel)
            s = tl.where(offs_e[None, :] == best[:, None], float("-inf"), s)
        tl.store(topk_ptr + pair, sel, mask=valid)
    else:
        sel = tl.load(topk_ptr + pair, mask=valid, other=0).to(tl.int32)

    # Phase 1b: stable rank of each pair among the block's pairs of the same expert.
    flat_e = tl.reshape(sel, [BLOCK_T * K_PAD])
    flat_valid = tl.reshape(valid, [BLOCK_T * K_PAD])
    flat_pair = tl.reshape(pair, [BLOCK_T * K_PAD])
    one_hot = ((flat_e[:, None] == offs_e[None, :]) & flat_valid[:, None]).to(tl.int32)
    inclusive = tl.cumsum(one_hot, axis=0)
    rank = tl.sum(inclusive * one_hot, axis=1) - 1
    tl.store(rank_ptr + flat_pair, rank, mask=flat_valid)
    tl.store(hist_ptr + pid * num_experts + offs_e, tl.sum(one_hot, axis=0), mask=offs_e < num_experts)

    # Phase 2 (scan) runs in the last program to finish phase 1: the barrier orders this
    # program's stores before its release, the acquire makes every other program's stores visible.
    # It only turns histograms into prefixes; every program places its own pairs in phase 3.
    tl.debug_barrier()
    finished_before = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if finished_before == num_blocks - 1:
        offs_b = tl.arange(0, BLOCK_NB)
        e_mask = offs_e < num_experts
        totals = tl.zeros([BLOCK_E], dtype=tl.int32)
        for b0 in range(0, num_blocks, BLOCK_NB):
            b_mask = (b0 + offs_b[:, None] < num_blocks) & e_mask[None, :]
            h_ptrs = hist_ptr + (b0 + offs_b[:, None]) * num_experts + offs_e[None, :]
            h = tl.load(h_ptrs, mask=b_mask, other=0, cache_modifier=".cg")
            prefix = tl.cumsum(h, axis=0) - h + totals[None, :]
            tl.store(h_ptrs, prefix, mask=b_mask)
            totals += tl.sum(h, axis=0)
        tl.store(counts_ptr + offs_e, totals, mask=e_mask)
        tl.store(starts_ptr + offs_e, tl.cumsum(totals, axis=0) - totals, mask=e_mask)


def _place_kernel(
    topk_ptr,  # [T, TOP_K] int: expert of each pair
    rank_ptr,  # [T * TOP_K] int32: rank inside its block and expert (phase 1)
    hist_ptr,  # [NUM_BLOCKS, E] int32: pairs of earlier blocks per expert (phase 2)
    starts_ptr,  # [E] int32: first shuffled row of each expert (phase 2)
    expert_out_ptr,  # [T * TOP_K] int32 out
    token_out_ptr,  # [T * TOP_K] int32 out
    slot_out_ptr,  # [T * TOP_K] int32 out
    num_tokens,
    num_experts,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Phase 3, one program per phase-1 block: position = start[e] + prefix[block, e] + rank."""
    block = tl.program_id(0)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, K_PAD)
    pair = offs_t[:, None] * TOP_K + offs_j[None, :]
    valid = (offs_t[:, None] < num_tokens) & (offs_j[None, :] < TOP_K)
    e = tl.load(topk_ptr + pair, mask=valid, other=0).to(tl.int32)
    r = tl.load(rank_ptr + pair, mask=valid, other=0)
    before = tl.load(hist_ptr + block.to(tl.int64) * num_experts + e, mask=valid, other=0)
    pos = tl.load(starts_ptr + e, mask=valid, other=0) + before + r
    tl.store(expert_out_ptr + pos, e, mask=valid)
    tl.store(token_out_ptr + pos, offs_t[:, None] + tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32), mask=valid)
    tl.store(slot_out_ptr + pair, pos, mask=valid)


_KERNEL = LazyKernel(_index_shuffling_kernel)
_PLACE = LazyKernel(_place_kernel)


def _launch(
    scores: torch.Tensor | None,
    top_k_index: torch.Tensor | None,
    num_tokens: int,
    num_experts: int,
    top_k: int,
) -> ShuffledIndices:
    device = (scores if scores is not None else top_k_index).device
    num_pairs = num_tokens * top_k
    i32 = {"dtype": torch.int32, "device": device}
    counts = torch.zeros(num_experts, **i32)
    expert_out = torch.empty(num_pairs, **i32)
    token_out = torch.empty(num_pairs, **i32)
    slot_out = torch.empty(num_pairs, **i32)
    if num_tokens == 0:
        return ShuffledIndices(counts, expert_out, token_out, slot_out.view(0, top_k))
    block_e = next_pow2(num_experts)
    k_pad = next_pow2(top_k)
    block_t = max(1, min(next_pow2(num_tokens), _ONE_HOT_BUDGET // (k_pad * block_e)))
    num_blocks = triton.cdiv(num_tokens, block_t)
    from_scores = scores is not None
    topk = torch.empty(num_tokens, top_k, **i32) if from_scores else top_k_index.contiguous()
    scores_arg = scores.contiguous() if from_scores else topk
    extra = {} if interpreter_enabled() else {"num_warps": 8}
    rank = torch.empty(num_pairs, **i32)
    hist = torch.empty(num_blocks, num_experts, **i32)
    starts = torch.empty(num_experts, **i32)
    _KERNEL[(num_blocks,)](
        scores_arg,
        topk,
        rank,
        hist,
        starts,
        torch.zeros(1, **i32),
        counts,
        num_tokens,
        num_experts,
        scores_arg.stride(0),
        TOP_K=top_k,
        K_PAD=k_pad,
        FROM_SCORES=from_scores,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_NB=max(1, min(next_pow2(num_blocks), _ONE_HOT_BUDGET // block_e)),
        **extra,
    )
    _PLACE[(num_blocks,)](
        topk, rank, hist, starts, expert_out, token_out, slot_out, num_tokens, num_experts,
        TOP_K=top_k, K_PAD=k_pad, BLOCK_T=block_t,
    )
    return ShuffledIndices(counts, expert_out, token_out, slot_out.view(num_tokens, top_k))


def index_shuffling(scores: torch.Tensor, top_k: int) -> ShuffledIndices:
    """Top-k of ``scores`` [T, E] (largest first) and the expert-sorted pairs; see the reference."""
    if scores.dim() != 2 or not 1 <= top_k <= scores.shape[1]:
        raise ValueError(
            f"index_shuffling: scores must be [T, E] with 1 <= top_k <= E, got {tuple(scores.shape)}"
        )
    return _launch(scores, None, scores.shape[0], scores.shape[1], top_k)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ShuffledIndices:
    """Expert-sorted pairs for a router's ``top_k_index`` [T, k] (values in [0, num_experts))."""
    if top_k_index.dim() != 2:
        raise ValueError(f"sort_by_expert: top_k_index must be [T, k], got {tuple(top_k_index.shape)}")
    return _launch(None, top_k_index, top_k_index.shape[0], num_experts, top_k_index.shape[1])
