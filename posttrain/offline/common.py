"""Pieces the offline algorithms share: sequence logprobs, greedy evaluation, the algorithm Protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from posttrain.data.formatting import encode, prompt_text
from posttrain.engine.head_logprobs import model_logprobs

Batch = dict[str, torch.Tensor]


class OfflineAlgorithm(Protocol):
    """What the offline runner needs from SFT, DPO or reward-model training."""

    needs_reference: bool

    def load_model(self, model_cfg) -> torch.nn.Module: ...
    def prepare(self, rows: list[dict[str, Any]], tokenizer, max_length: int, max_bad_fraction: float, key: str) -> tuple[list[Any], list[dict[str, Any]]]: ...
    """(examples, the good rows they came from); bad rows are skipped and counted."""
    def collate(self, examples: list[Any], pad_id: int) -> Batch: ...
    def count(self, batch: Batch) -> float: ...
    def loss(self, model: torch.nn.Module, batch: Batch, global_count: float) -> tuple[torch.Tensor, dict[str, Any]]: ...
    def evaluate(
        self, model: torch.nn.Module, examples: list[Any], rows: list[dict[str, Any]], tokenizer, checker, max_new_tokens: int = 16
    ) -> dict[str, float]: ...


def sequence_token_logprobs(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, fused: bool = True
) -> torch.Tensor:
    """logprobs_BT[b, t] = log p(token t | tokens < t); position 0 is 0 (and padding: 0 after the
    mask, garbage before). ``fused``: the LM head fused with the logprob (no [B, T, V] logits)."""
    batch = {"input_ids_BT": input_ids_BT, "attention_mask_BT": attention_mask_BT}
    return model_logprobs(model, batch, fused=fused)[0]


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module,
    rows: list[dict[str, Any]],
    tokenizer,
    checker: Callable[[dict[str, Any], str], bool],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact-match accuracy of greedy completions on ``rows`` (checked by ``checker``)."""
    model.eval()
    correct = 0
    pad = tokenizer.pad_token_id
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [encode(tokenizer, prompt_text(tokenizer, r)) for r in chunk]
        T = max(map(len, prompts))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding for generation
            ids[b, T - len(p) :] = torch.tensor(p)
            attn[b, T - len(p) :] = 1
        device = next(model.parameters()).device
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, T:], skip_special_tokens=False)
        correct += sum(bool(checker(r, t)) for r, t in zip(chunk, texts, strict=False))
    return {"accuracy": correct / max(1, len(rows))}
