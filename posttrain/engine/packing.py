"""Sequence packing for the trainer: rows of different lengths share one [1, N] micro-batch.

``plan`` groups rows (by their unpadded lengths) into micro-batches of at most ``max_tokens``
tokens (dynamic batching: the number of rows per micro-batch varies). ``pack`` concatenates one
group's rows into ``packed_ids_1N`` with ``packed_pos_1N`` restarting at 0 for every row and
``packed_cu_R1`` (cumulative row lengths, R+1 entries). ``forward`` runs the model on them so that
packed rows never attend to each other:

- flash-attention varlen when the model runs ``flash_attention_2/3`` on a GPU (``cu_seq_lens``);
- otherwise ``row_attention``: causal SDPA on each row alone (a registered transformers attention
  function, selected for the packed forward only), so attention costs sum(len^2), not N^2;
- with activation checkpointing, a block-diagonal causal 4-D boolean mask [1, 1, N, N].

All three verified against per-row forwards for the tiny Llama and Qwen2 models (CPU). Note that
``position_ids`` alone are NOT enough under SDPA: transformers 5.19 ignores the restarts there
and lets rows attend across (max logit error 0.8 on the tiny Llama).

Per-token outputs come back to the unpacked [R, T] layout with ``per_row``, so losses and their
aggregation (with the global token / sequence counts) run on exactly the tensors the padded path
gives them: packing changes the forward, never the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_KEYS = ("packed_ids_1N", "packed_pos_1N", "packed_cu_R1")


@dataclass
class MicroPlan:
    """One micro-batch: the rows it holds. ``dummy``: a filler so every rank runs the same number of
    forwards (FSDP's all-gathers are collectives); its loss mask is zeroed, it adds nothing."""

    rows: list[int] = field(default_factory=list)
    dummy: bool = False


def plan(lengths: Sequence[int], max_tokens: int) -> list[MicroPlan]:
    """First-fit decreasing: rows sorted longest first, each into the first micro-batch with room.

    A row longer than ``max_tokens`` gets a micro-batch of its own (a row is never split).
    Rows keep ascending index order inside a micro-batch.
    """
    bins: list[tuple[int, list[int]]] = []  # (tokens used, rows)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        for j, (used, rows) in enumerate(bins):
            if used + n <= max_tokens:
                bins[j] = (used + n, rows + [i])
                break
        else:
            bins.append((n, [i]))
    return [MicroPlan(sorted(rows)) for _, rows in bins]


def equalize(plans: list[MicroPlan], target: int) -> list[MicroPlan]:
    """Grow to ``target`` micro-batches: split the one with the most rows, else add dummies."""
    plans = list(plans)
    while len(plans) < target:
        j = max(range(len(plans)), key=lambda j: len(plans[j].rows)) if plans else -1
        if j >= 0 and len(plans[j].rows) > 1:
            rows = plans[j].rows
            plans[j : j + 1] = [MicroPlan(rows[: len(rows) // 2]), MicroPlan(rows[len(rows) // 2 :])]
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


def pack(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of a padded [B, T] batch as one packed row: ids and restarting positions [1, N],
    cumulative lengths [B+1] (int32)."""
    lengths = row_lengths(attention_mask_BT)
    keep = attention_mask_BT.bool()
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths.cpu(), 0)
    pos = torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1].long(), lengths.cpu())
    return {"packed_ids_1N": input_ids_BT[keep][None], "packed_pos_1N": pos[None].to(input_ids_BT.device), "packed_cu_R1": cu}


def block_causal_mask(cu_R1: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, N, N] bool: True where query i may attend to key j (same row, j <= i)."""
    lengths = (cu_R1[1:] - cu_R1[:-1]).long().cpu()
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    n = seg.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return ((seg[:, None] == seg[None, :]) & causal)[None, None]


def uses_varlen(model: torch.nn.Module, device: torch.device) -> bool:
    """Flash-attention varlen: a GPU and a model loaded with a flash-attention implementation."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return device.type == "cuda" and impl.startswith("flash_attention")


def is_packed(batch: dict[str, Any]) -> bool:
    return "packed_cu_R1" in batch


ROW_ATTENTION = "posttrain_packed_rows"


def row_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  cu_seq_lens_q: torch.Tensor | None = None, **kwargs):  # fmt: skip
    """Varlen attention without flash-attn: causal SDPA on each packed row alone.

    query [1, H, N, D], key / value [1, Hkv, N, D] -> ([1, N, H, D], None), as transformers'
    attention functions. Exact (no cross-row terms) and, unlike one N x N masked SDPA, costs
    sum(len^2) rather than N^2."""
    if cu_seq_lens_q is None:
        raise RuntimeError(f"attention {ROW_ATTENTION!r} needs cu_seq_lens_q (use posttrain.engine.packing.forward)")
    sizes = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    # split, not one slice per row: a slice's backward fills a zero tensor of the whole [1, H, N, D]
    # per row (measured: 13% of a packed train step), split's backward concatenates once
    rows = zip(*(x.split(sizes, dim=2) for x in (query, key, value)), strict=True)
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=True)
            for q, k, v in rows]  # fmt: skip
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ROW_ATTENTION, row_attention)


@contextmanager
def _attention(model: torch.nn.Module, impl: str) -> Iterator[None]:
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = before


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
    """The model's output for a padded or a packed micro-batch (``[1, N, ...]`` when packed).

    Packed, in order of preference: flash-attention varlen (GPU, model loaded with flash_attention_*);
    per-row SDPA (``row_attention``, selected for this forward only); the block-diagonal 4-D mask
    when activation checkpointing is on (its recomputation in backward runs outside this call, so
    the attention must not depend on a temporarily selected implementation)."""
    if not is_packed(batch):
        return model(input_ids=batch["input_ids_BT"], attention_mask=batch["attention_mask_BT"])
    ids, pos, cu = batch["packed_ids_1N"], batch["packed_pos_1N"], batch["packed_cu_R1"]
    if uses_varlen(model, ids.device):
        cu_dev, longest = cu.to(ids.device), int((cu[1:] - cu[:-1]).max())
        return model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu_dev, cu_seq_lens_k=cu_dev, max_length_q=longest, max_length_k=longest)
    if getattr(model, "is_gradient_checkpointing", False):
        return model(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(cu, ids.device))
    with _attention(model, ROW_ATTENTION):
        return model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu.cpu())


def token_ids(batch: dict[str, Any]) -> torch.Tensor:
    """The ids the model saw: [1, N] packed or [B, T] padded."""
    return batch["packed_ids_1N"] if is_packed(batch) else batch["input_ids_BT"]


def unpack(x_1N: torch.Tensor, cu_R1: torch.Tensor, width: int) -> torch.Tensor:
    """[1, N, ...] packed per-token values -> [R, width, ...], zeros on padding (differentiable)."""
    lengths = (cu_R1[1:] - cu_R1[:-1]).long().cpu()
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    cols = torch.arange(int(lengths.sum())) - torch.repeat_interleave(cu_R1[:-1].long().cpu(), lengths)
    x = x_1N[0]
    out = x.new_zeros((len(lengths), width, *x.shape[1:]))
    return out.index_put((rows.to(x.device), cols.to(x.device)), x)


def per_row(shifted: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token outputs already shifted right by one (``F.pad(y[:, :-1], (1, 0))``: position t
    holds the value for predicting token t) in the unpacked [B, T] layout. Packed: each row's first
    position read the previous row's last token, so it is set to 0, as the padded path has it."""
    if not is_packed(batch):
        return shifted
    out = unpack(shifted, batch["packed_cu_R1"], batch["input_ids_BT"].shape[1])
    first = torch.zeros_like(out, dtype=torch.bool)
    first[:, 0] = True
    return torch.where(first, torch.zeros_like(out), out)


def packed_micro_batches(rows: dict[str, Any], plans: list[MicroPlan], loss_keys: Sequence[str] = ("loss_mask_BT",)) -> list[dict[str, Any]]:
    """Micro-batch dicts for ``plans``: every [B, T] tensor of ``rows`` sliced to the group's rows and
    longest length, plus the packed keys; other values (global counts) are copied. A dummy's
    ``loss_keys`` are zeroed."""
    lengths = row_lengths(rows["attention_mask_BT"])
    out = []
    for p in plans:
        idx = torch.tensor(p.rows, dtype=torch.long)
        width = int(lengths[idx].max()) if len(idx) else 0
        mb = {k: (v[idx][:, :width] if v.dim() > 1 else v[idx]) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in rows.items()}
        if p.dummy:
            for k in loss_keys:
                mb[k] = torch.zeros_like(mb[k])
        mb.update(pack(mb["input_ids_BT"], mb["attention_mask_BT"]))
        out.append(mb)
    return out
