"""Per-token logprobs (and entropy) of a causal LM's micro-batch, with the LM head fused into them.

``model_logprobs(model, batch, ...)`` is what every trainer loss and forward verb reads (the RL
loss, old and reference logprobs, SFT, DPO): the logprob of each token under the model's
prediction at the position before it, in the unpadded ``[B, T]`` layout of ``packing.next_token``
(position 0 and padding hold 0), for a padded or a packed micro-batch.

Fused (the default, ``model.fused_lm_head``): the model runs its own forward, FSDP hooks, packing
and all, but its output-embedding module is replaced for that one call by
``posttrain.algorithms.fused_head``: the hidden states it receives (after the final norm) go
through the head and the logprob block by block, and the "logits" the model returns are the
``[.., 2]`` stack of logprob and entropy. No ``[B, T, V]`` tensor (nor its gradient) exists. The
head runs inside the model's forward so that an FSDP2 root's parameters are the gathered ones,
exactly as for the plain head. Exact for the architectures listed in ``FUSABLE_MODEL_TYPES``, whose
forward is ``logits = self.lm_head(hidden_states[:, slice_indices, :])`` with nothing after it
(no soft-capping, no logit scale); any other model, and ``fused=False``, take the unfused path:
the full logits, then the chunked logprob of ``posttrain.algorithms.logprobs``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from posttrain.algorithms.fused_head import DEFAULT_CHUNK_ELEMENTS, fused_head_logprobs
from posttrain.algorithms.logprobs import (
    entropy_from_logits,
    processed_token_logprobs,
    sampled_token_logprobs,
    token_logprobs,
)
from posttrain.engine.packing import forward as packed_forward
from posttrain.engine.packing import next_token

# transformers 5.19 causal LMs whose forward ends ``logits = self.lm_head(hidden[:, keep])`` with no
# transformation after the head (read from their modeling files): the fused head is exact there.
FUSABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral"})

Entropy = Literal["none", "metric", "grad"]


def supports_fused_head(model: torch.nn.Module) -> bool:
    """The model's logits are exactly its output-embedding module applied to the last hidden states."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and getattr(config, "model_type", None) in FUSABLE_MODEL_TYPES


@contextmanager
def _head_replaced(head: torch.nn.Module, forward: Any) -> Iterator[Any]:
    """``head`` runs ``forward`` during the block; yields its own forward (bound, unreplaced)."""
    original = head.forward
    head.forward = forward
    try:
        yield original
    finally:
        del head.forward  # the class's forward again (instance attribute removed)
        if head.forward != original:  # the module had an instance-level forward: put it back
            head.forward = original


def model_logprobs(
    model: torch.nn.Module,
    batch: dict[str, Any],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    entropy: Entropy = "none",
    fused: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs_BT, entropy_BT)`` of the micro-batch's tokens under the sampler's distribution
    (``softmax(filter(logits / temperature))``, top-k then top-p as vLLM; temperature 1 and no
    filter for SFT/DPO), fp32 nats, position t for token t, 0 at position 0 and on padding.

    ``entropy``: "none" (zeros, not computed), "metric" (computed, detached) or "grad" (carries a
    gradient: an entropy bonus). ``fused``: the fused head when the model supports it
    (``supports_fused_head``); False: full logits then the chunked logprob (the earlier path).
    Works with and without grad (old / reference logprobs run under ``torch.no_grad``).
    """
    if fused and supports_fused_head(model):
        return _fused(model, batch, temperature, top_p, top_k, entropy, chunk_elements)
    return _unfused(model, batch, temperature, top_p, top_k, entropy)


def _fused(model, batch, temperature, top_p, top_k, entropy: Entropy, chunk_elements: int):
    head = model.get_output_embeddings()

    def patched(hidden: torch.Tensor) -> torch.Tensor:
        # inside the model's forward: under FSDP2 the head's parameters here are the gathered ones
        params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []

        def fn(h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return fused_head_logprobs(
                h, original, params, ids, temperature, top_k, top_p, entropy != "none", chunk_elements
            )

        lp, ent = next_token(fn, hidden, batch)
        return torch.stack([lp, ent], dim=-1)  # one tensor: the model's output record carries it

    with _head_replaced(head, patched) as original:
        out_BT2 = packed_forward(model, batch).logits
    lp, ent = out_BT2.unbind(-1)
    return lp, (ent if entropy == "grad" else ent.detach())


def _unfused(model, batch, temperature, top_p, top_k, entropy: Entropy):
    """The full logits of the micro-batch, then the chunked logprob (and entropy)."""
    logits = packed_forward(model, batch).logits
    filtered = top_p < 1.0 or top_k > 0
    if not torch.is_grad_enabled() and entropy == "none":  # forward verb: blocks of positions
        if top_k > 0:
            lp = next_token(lambda x, ids: processed_token_logprobs(x, ids, temperature, top_k, top_p)[0], logits, batch)
        else:
            lp = next_token(lambda x, ids: sampled_token_logprobs(x, ids, temperature, top_p), logits, batch)
        return lp, torch.zeros_like(lp)

    def fn(x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if filtered:
            lp, ent = processed_token_logprobs(x, ids, temperature, top_k, top_p)
            return lp, (ent if entropy == "grad" else ent.detach())
        scaled = x if temperature in (0.0, 1.0) else x / temperature
        lp = token_logprobs(scaled, ids)
        if entropy == "none":
            return lp, torch.zeros_like(lp)
        if entropy == "grad":
            return lp, entropy_from_logits(scaled)
        with torch.no_grad():
            return lp, entropy_from_logits(scaled.detach())

    return next_token(fn, logits, batch)
