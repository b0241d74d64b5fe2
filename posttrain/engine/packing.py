"""Sequence packing for the trainer: rows of different lengths share one [1, N] micro-batch.

``plan`` groups rows (by their unpadded lengths) into micro-batches of at most ``max_tokens``
tokens (dynamic batching: the number of rows per micro-batch varies); ``plan_pairs`` does the
same for preference pairs (DPO), each pair whole in one micro-batch. ``pack`` lays one group's
rows out as *pieces* in ``packed_ids_1N``, with ``packed_cu_S1`` (cumulative piece lengths) and
``packed_parent_S`` (the piece a piece continues, -1 for none):

- a row alone is one piece, positions restarting at 0;
- shared prefixes: rows that begin with the same tokens (a GRPO group's samples of one prompt, or
  the turns of trajectories that share their opening) form a *family*: the common prefix is one
  piece, stored and run through the model once, and each row's own tokens are a child piece whose
  positions continue the prefix's and which attends to the prefix and to itself only. With 8
  samples of a 25-token prompt and ~70-token completions that is ~23% fewer tokens trained.
  ``families`` picks them (at least ``min_shared`` tokens in common; 0: no sharing).

``forward`` runs the model on them so that packed rows never attend to each other:

- flash-attention varlen when the model runs ``flash_attention_2/3`` on a GPU (``cu_seq_lens``;
  no shared prefixes there: varlen cannot express a piece attending to its parent);
- otherwise ``row_attention``: SDPA on each piece (with its parent's keys in front), a registered
  transformers attention function selected for the packed forward only, so attention costs
  sum(len^2), not N^2;
- with activation checkpointing, a 4-D boolean mask [1, 1, N, N] of the same structure.

All three verified against per-row forwards for the tiny Llama and Qwen2 models (CPU). Note that
``position_ids`` alone are NOT enough under SDPA: transformers 5.19 ignores the restarts there
and lets rows attend across (max logit error 0.8 on the tiny Llama).

Per-token outputs come back to the unpacked [R, T] layout with ``next_token``, so losses and their
aggregation (with the global token / sequence counts) run on exactly the tensors the padded path
gives them: packing changes the forward, never the loss. A shared prefix's outputs are read by
every row of its family (their gradients sum, as the rows' separate forwards would give them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface


@dataclass
class MicroPlan:
    """One micro-batch: the rows it holds. ``dummy``: a filler so every rank runs the same number of
    forwards (FSDP's all-gathers are collectives); its loss mask is zeroed, it adds nothing."""

    rows: list[int] = field(default_factory=list)
    dummy: bool = False
    min_shared: int = 0  # shared-prefix packing of these rows (``families``); 0: every row alone


def prefix_order(ids_BT: torch.Tensor, lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """The rows in lexicographic order of their tokens (rows that begin alike become neighbours,
    whatever order a shuffled mini-batch put them in), and ``prefixes[j]``: how many leading tokens
    the j-th row of that order shares with the one before it (``prefixes[0] = 0``), capped so that
    both rows keep at least one token of their own."""
    ids = ids_BT.cpu()
    order = sorted(range(ids.shape[0]), key=lambda b: ids[b, : int(lengths[b])].tolist())
    if len(order) < 2:
        return order, [0] * len(order)
    rows = ids[order]
    run = (rows[1:] == rows[:-1]).int().cumprod(dim=1).sum(dim=1).tolist()  # leading equal tokens
    caps = [int(lengths[b]) - 1 for b in order]
    return order, [0] + [max(0, min(int(r), caps[j], caps[j + 1])) for j, r in enumerate(run)]


def families(prefixes: Sequence[int], min_shared: int) -> list[tuple[int, int, int]]:
    """Split consecutive rows into families ``(start, end, shared)`` (rows start..end-1, their common
    prefix of ``shared`` tokens; ``shared = 0`` for a row alone) saving the most tokens: a family of
    k rows saves (k - 1) * shared. Exact dynamic programming over the split points (rows of a GRPO
    group are consecutive; a template all prompts begin with is not worth merging two groups over).
    ``prefixes``: from ``prefix_order``. Families sharing fewer than ``min_shared`` tokens (or
    ``min_shared <= 0``) are rows alone."""
    n = len(prefixes)
    if min_shared <= 0:
        return [(i, i + 1, 0) for i in range(n)]
    best = [0] * (n + 1)  # best[j]: the most tokens saved over rows 0..j-1
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # row j-1 alone
        shared = 1 << 62
        for i in range(j - 2, -1, -1):  # family rows i..j-1
            shared = min(shared, prefixes[i + 1])
            if shared < min_shared:
                break
            if best[i] + (j - 1 - i) * shared > best[j]:
                best[j], cut[j] = best[i] + (j - 1 - i) * shared, i
    out, j = [], n
    while j > 0:
        i = cut[j]
        out.append((i, j, min(prefixes[i + 1 : j]) if j - i > 1 else 0))
        j = i
    return out[::-1]


def _units(
    lengths: Sequence[int], max_tokens: int, ids_BT: torch.Tensor | None, min_shared: int
) -> list[tuple[int, list[int]]]:
    """(tokens, rows) of what ``plan`` must keep together: a family, cut into chunks that fit in
    ``max_tokens`` (each chunk holds the prefix once), or a row alone."""
    if ids_BT is not None and min_shared > 0:
        order, prefixes = prefix_order(ids_BT, lengths)
        fams = families(prefixes, min_shared)
    else:
        order, fams = list(range(len(lengths))), [(i, i + 1, 0) for i in range(len(lengths))]
    units: list[tuple[int, list[int]]] = []
    for start, end, shared in fams:
        used, rows = 0, []
        for i in order[start:end]:
            n = int(lengths[i])
            cost = n - shared if rows else n
            if rows and used + cost > max_tokens:
                units.append((used, rows))
                used, rows, cost = 0, [], n
            used, rows = used + cost, rows + [i]
        units.append((used, rows))
    return units


def plan(
    lengths: Sequence[int], max_tokens: int, ids_BT: torch.Tensor | None = None, min_shared: int = 0
) -> list[MicroPlan]:
    """First-fit decreasing: rows sorted longest first, each into the first micro-batch with room.

    A row longer than ``max_tokens`` gets a micro-batch of its own (a row is never split).
    Rows keep ascending index order inside a micro-batch. With the rows' ids and ``min_shared > 0``,
    a family's rows (``families``) travel together and count their shared prefix once.
    """
    bins: list[tuple[int, list[int]]] = []  # (tokens used, rows)
    for n, unit in sorted(_units(lengths, max_tokens, ids_BT, min_shared), key=lambda u: (-u[0], min(u[1]))):
        for j, (used, rows) in enumerate(bins):
            if used + n <= max_tokens:
                bins[j] = (used + n, rows + unit)
                break
        else:
            bins.append((n, list(unit)))
    shared = min_shared if ids_BT is not None else 0
    return [MicroPlan(sorted(rows), min_shared=shared) for _, rows in bins]


def plan_pairs(
    lengths: Sequence[int], max_tokens: int, ids_BT: torch.Tensor | None = None, min_shared: int = 0
) -> list[MicroPlan]:
    """``plan`` for preference pairs: rows are P chosen then P rejected sequences (row i and row
    P + i are pair i), and a pair never leaves its micro-batch. The plans hold PAIR indices (expand
    them with ``pair_rows``); a pair costs its two lengths less the prompt they share when sharing."""
    P = len(lengths) // 2
    shared = [0] * P
    if ids_BT is not None and min_shared > 0:
        for i in range(P):
            _, (_, common) = prefix_order(ids_BT[[i, P + i]], [lengths[i], lengths[P + i]])
            shared[i] = common if common >= min_shared else 0
    costs = [int(lengths[i]) + int(lengths[P + i]) - shared[i] for i in range(P)]
    return [MicroPlan(p.rows, min_shared=min_shared if ids_BT is not None else 0) for p in plan(costs, max_tokens)]


def pair_rows(plans: list[MicroPlan], num_pairs: int) -> list[MicroPlan]:
    """Pair plans -> row plans: the chosen rows of the pairs, then their rejected rows (the layout
    the pair losses split in halves)."""
    return [MicroPlan(p.rows + [num_pairs + i for i in p.rows], p.dummy, p.min_shared) for p in plans]


def equalize(plans: list[MicroPlan], target: int) -> list[MicroPlan]:
    """Grow to ``target`` micro-batches: split the one with the most rows, else add dummies."""
    plans = list(plans)
    while len(plans) < target:
        j = max(range(len(plans)), key=lambda j: len(plans[j].rows)) if plans else -1
        if j >= 0 and len(plans[j].rows) > 1:
            p = plans[j]
            half = len(p.rows) // 2
            plans[j : j + 1] = [
                MicroPlan(p.rows[:half], min_shared=p.min_shared),
                MicroPlan(p.rows[half:], min_shared=p.min_shared),
            ]
        else:
            plans.append(MicroPlan(plans[0].rows[:1] if plans else [], dummy=True))
    return plans


def row_lengths(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Unpadded lengths [B]; rows must be right-padded (1s then 0s)."""
    lengths = attention_mask_BT.sum(-1)
    cols = torch.arange(attention_mask_BT.shape[-1], device=attention_mask_BT.device)
    if not torch.equal(attention_mask_BT.bool(), cols[None, :] < lengths[:, None]):
        raise ValueError("packing needs right-padded rows (attention_mask 1...1 0...0 on every row)")
    return lengths


def pack(
    input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, min_shared: int = 0
) -> dict[str, torch.Tensor]:
    """The rows of a padded [B, T] batch as one packed row of pieces (module docstring).

    ``packed_ids_1N`` / ``packed_pos_1N`` ids and positions; ``packed_cu_S1`` cumulative piece
    lengths (int32); ``packed_parent_S`` each piece's parent (-1: none); ``packed_tok_BT`` where row
    token (b, t) sits in the packed row (-1 on padding); ``packed_branch_K2`` (prediction position,
    target id) of the next-token pairs that are not neighbours in the packed row (a child piece's
    first token, predicted by the end of its parent); ``packed_src_BT`` for ``next_token``."""
    lengths = row_lengths(attention_mask_BT).cpu().tolist()
    ids_cpu = input_ids_BT.cpu()
    if min_shared > 0:
        order, prefixes = prefix_order(ids_cpu, lengths)
        fams = [(order[start:end], shared) for start, end, shared in families(prefixes, min_shared)]
    else:
        fams = [([b], 0) for b in range(len(lengths))]
    B, T = input_ids_BT.shape
    tok = torch.full((B, T), -1, dtype=torch.long)
    pieces: list[tuple[int, int]] = []  # (length, parent)
    ids, pos, n = [], [], 0

    def add(row: int, lo: int, hi: int, parent: int) -> None:
        nonlocal n
        ids.append(ids_cpu[row, lo:hi])
        pos.append(torch.arange(lo, hi))
        pieces.append((hi - lo, parent))
        n += hi - lo

    for rows, shared in fams:
        if shared:
            first = n
            add(rows[0], 0, shared, -1)
            parent = len(pieces) - 1
            tok[rows, :shared] = torch.arange(first, first + shared)
        for b in rows:
            lo = shared
            tok[b, lo : lengths[b]] = torch.arange(n, n + lengths[b] - lo)
            add(b, lo, lengths[b], parent if shared else -1)
    cu = torch.zeros(len(pieces) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([length for length, _ in pieces], dtype=torch.int32), 0)
    # next-token sources: value index 0 is a zero (position 0 and padding), 1 + j the packed
    # neighbour pair (j, j + 1), 1 + (N - 1) + k the k-th branch pair
    prev, cur = tok[:, :-1], tok[:, 1:]
    valid = cur >= 0
    neighbour = valid & (cur == prev + 1)
    branch = valid & ~neighbour
    src = torch.zeros((B, T), dtype=torch.long)
    src[:, 1:][neighbour] = 1 + prev[neighbour]
    src[:, 1:][branch] = n + torch.arange(int(branch.sum()))
    branch_k2 = (
        torch.stack([prev[branch], ids_cpu[:, 1:][branch]], dim=-1)
        if branch.any()
        else torch.zeros((0, 2), dtype=torch.long)
    )
    dev = input_ids_BT.device
    return {
        "packed_ids_1N": torch.cat(ids)[None].to(dev) if ids else input_ids_BT.new_zeros((1, 0)),
        "packed_pos_1N": torch.cat(pos)[None].to(dev)
        if pos
        else torch.zeros((1, 0), dtype=torch.long, device=dev),
        "packed_cu_S1": cu,
        "packed_parent_S": torch.tensor([parent for _, parent in pieces], dtype=torch.long),
        "packed_tok_BT": tok,
        "packed_src_BT": src,
        "packed_branch_K2": branch_k2,
    }


def piece_mask(
    cu_S1: torch.Tensor, parent_S: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[1, 1, N, N] bool: True where query i may attend to key j: j <= i, in i's piece or its parent."""
    lengths = (cu_S1[1:] - cu_S1[:-1]).long().cpu()
    piece = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    parent = parent_S.to(device)[piece]
    n = piece.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return (((piece[:, None] == piece[None, :]) | (parent[:, None] == piece[None, :])) & causal)[None, None]


def uses_varlen(model: torch.nn.Module, device: torch.device) -> bool:
    """Flash-attention varlen: a GPU and a model loaded with a flash-attention implementation."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return device.type == "cuda" and impl.startswith("flash_attention")


def is_packed(batch: dict[str, Any]) -> bool:
    return "packed_cu_S1" in batch


ROW_ATTENTION = "posttrain_packed_rows"


def row_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  cu_seq_lens_q: torch.Tensor | None = None, **kwargs):  # fmt: skip
    """Varlen attention without flash-attn: SDPA on each packed piece alone, a child piece with its
    parent's keys and values in front (all visible to it), causal within the piece.

    query [1, H, N, D], key / value [1, Hkv, N, D] -> ([1, N, H, D], None), as transformers'
    attention functions. Exact (no cross-row terms) and, unlike one N x N masked SDPA, costs
    sum(len^2) rather than N^2. The pieces' parents come from ``forward`` (``_PARENTS``)."""
    if cu_seq_lens_q is None:
        raise RuntimeError(
            f"attention {ROW_ATTENTION!r} needs cu_seq_lens_q (use posttrain.engine.packing.forward)"
        )
    sizes = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    parents = _PARENTS.get() or [-1] * len(sizes)
    # split, not one slice per row: a slice's backward fills a zero tensor of the whole [1, H, N, D]
    # per row (measured: 13% of a packed train step), split's backward concatenates once
    qs, ks, vs = (x.split(sizes, dim=2) for x in (query, key, value))
    outs = []
    for q, k, v, parent in zip(qs, ks, vs, parents, strict=True):
        if parent < 0:
            outs.append(
                F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=True
                )
            )
            continue
        n, m = q.shape[2], ks[parent].shape[2]
        mask = torch.ones(n, m + n, dtype=torch.bool, device=q.device)
        mask[:, m:] = mask[:, m:].tril()
        k, v = torch.cat([ks[parent], k], dim=2), torch.cat([vs[parent], v], dim=2)
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_PARENTS: ContextVar[list[int] | None] = ContextVar("posttrain_packed_parents", default=None)
AttentionInterface.register(ROW_ATTENTION, row_attention)


@contextmanager
def _attention(model: torch.nn.Module, impl: str, parents: list[int]) -> Iterator[None]:
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = impl
    token = _PARENTS.set(parents)
    try:
        yield
    finally:
        config._attn_implementation = before
        _PARENTS.reset(token)


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
    """The model's output for a padded or a packed micro-batch (``[1, N, ...]`` when packed).

    Packed, in order of preference: flash-attention varlen (GPU, model loaded with flash_attention_*);
    per-row SDPA (``row_attention``, selected for this forward only); the block-diagonal 4-D mask
    when activation checkpointing is on (its recomputation in backward runs outside this call, so
    the attention must not depend on a temporarily selected implementation)."""
    if not is_packed(batch):
        return model(input_ids=batch["input_ids_BT"], attention_mask=batch["attention_mask_BT"])
    ids, pos, cu, parents = (
        batch["packed_ids_1N"],
        batch["packed_pos_1N"],
        batch["packed_cu_S1"],
        batch["packed_parent_S"],
    )
    shared = bool((parents >= 0).any())
    if uses_varlen(model, ids.device) and not shared:
        cu_dev, longest = cu.to(ids.device), int((cu[1:] - cu[:-1]).max())
        return model(
            input_ids=ids,
            position_ids=pos,
            cu_seq_lens_q=cu_dev,
            cu_seq_lens_k=cu_dev,
            max_length_q=longest,
            max_length_k=longest,
        )
    if getattr(model, "is_gradient_checkpointing", False):
        return model(input_ids=ids, position_ids=pos, attention_mask=piece_mask(cu, parents, ids.device))
    with _attention(model, ROW_ATTENTION, parents.tolist()):
        return model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu.cpu())


def token_ids(batch: dict[str, Any]) -> torch.Tensor:
    """The ids the model saw: [1, N] packed or [B, T] padded."""
    return batch["packed_ids_1N"] if is_packed(batch) else batch["input_ids_BT"]


def next_token(
    fn: Callable[[torch.Tensor, torch.Tensor], Any], out: torch.Tensor, batch: dict[str, Any]
) -> Any:
    """Per-token values ``fn(prediction, next id)`` in the unpadded [B, T] layout: position t holds
    the value for token t, computed from the model's output where token t-1 was read; position 0
    and padding hold 0.

    ``out``: the model's per-position output ([B, T, ...] padded, [1, N, ...] packed: logits, or a
    value head's [.., 1] squeezed); ``fn`` maps (out[:, :M], ids [., M]) to one [., M] tensor or a
    tuple of them (logprobs, entropies). Packed, ``fn`` runs on the neighbour pairs of the packed
    row and on the few branch pairs (``pack``), and each row reads its own pairs back."""
    ids = token_ids(batch)
    adjacent = fn(out[:, :-1], ids[:, 1:])
    single = not isinstance(adjacent, tuple)
    adjacent = (adjacent,) if single else adjacent
    if not is_packed(batch):
        result = tuple(F.pad(a, (1, 0)) for a in adjacent)
    else:
        branch_k2 = batch["packed_branch_K2"].to(out.device)
        branch = fn(out[:, branch_k2[:, 0]], branch_k2[:, 1][None]) if len(branch_k2) else None
        branch = ((branch,) if single else branch) if branch is not None else (None,) * len(adjacent)
        src = batch["packed_src_BT"].to(out.device)
        result = tuple(torch.cat([a.new_zeros((1, 1)), a] + ([b] if b is not None else []), dim=1)[0][src]
                       for a, b in zip(adjacent, branch, strict=True))  # fmt: skip
    return result[0] if single else result


def packed_micro_batches(
    rows: dict[str, Any], plans: list[MicroPlan], loss_keys: Sequence[str] = ("loss_mask_BT",)
) -> list[dict[str, Any]]:
    """Micro-batch dicts for ``plans``: every [B, T] tensor of ``rows`` sliced to the group's rows and
    longest length, plus the packed keys; other values (global counts) are copied. A dummy's
    ``loss_keys`` are zeroed."""
    lengths = row_lengths(rows["attention_mask_BT"])
    out = []
    for p in plans:
        idx = torch.tensor(p.rows, dtype=torch.long)
        width = int(lengths[idx].max()) if len(idx) else 0
        mb = {
            k: (v[idx][:, :width] if v.dim() > 1 else v[idx])
            if isinstance(v, torch.Tensor) and v.dim() >= 1
            else v
            for k, v in rows.items()
        }
        if p.dummy:
            for k in loss_keys:
                mb[k] = torch.zeros_like(mb[k])
        mb.update(pack(mb["input_ids_BT"], mb["attention_mask_BT"], p.min_shared))
        out.append(mb)
    return out
