"""Supervised fine-tuning: cross-entropy on response tokens only (the prompt is masked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.algorithms.offline_losses import sft_loss
from posttrain.data.formatting import make_sft_example, pad_batch, sft_row_problem
from posttrain.data.sources import build_examples
from posttrain.engine.head_logprobs import model_logprobs
from posttrain.models.loading import load_causal_lm
from posttrain.offline.common import Batch, greedy_accuracy, sequence_token_logprobs


@dataclass
class SFTConfig:
    """``algorithm: {_target_: posttrain.offline.sft.SFTConfig}``. Evaluation settings live in the
    recipe's ``eval`` section (``eval.every_steps``, ``eval.max_new_tokens``), as for every runner."""

    def build(self) -> SFT:
        return SFT(self)


class SFT:
    needs_reference = False
    packs = True  # rows are independent: trainer.max_tokens_per_micro_batch may pack them

    def __init__(self, cfg: SFTConfig) -> None:
        self.cfg = cfg
        self.fused = True  # model.fused_lm_head, read in load_model

    def load_model(self, model_cfg) -> torch.nn.Module:
        self.fused = model_cfg.fused_lm_head
        return load_causal_lm(model_cfg)

    def prepare(self, rows, tokenizer, max_length: int, max_bad_fraction: float, key: str) -> tuple[list[Any], list[dict]]:
        return build_examples(rows, lambda r: sft_row_problem(r) or make_sft_example(tokenizer, r, max_length), max_bad_fraction, key)

    def collate(self, examples, pad_id: int) -> Batch:
        return pad_batch([e.input_ids for e in examples], [e.loss_mask for e in examples], pad_id)

    def count(self, batch: Batch) -> float:
        return float(batch["loss_mask_BT"].sum())

    def loss(self, model, batch: Batch, global_count: float):
        """Padded or packed (``posttrain.engine.packing``) micro-batch; the loss sees [B, T] either way."""
        lp = model_logprobs(model, batch, fused=self.fused)[0]
        return sft_loss(lp, batch["loss_mask_BT"], global_count)

    def evaluate(self, model, examples, rows, tokenizer, checker, max_new_tokens: int = 16) -> dict[str, float]:
        with torch.no_grad():
            batch = self.collate(examples, tokenizer.pad_token_id)
            lp = sequence_token_logprobs(model, batch["input_ids_BT"], batch["attention_mask_BT"], self.fused)
            nll = float(-(lp * batch["loss_mask_BT"]).sum() / batch["loss_mask_BT"].sum())
        out = {"nll": nll}
        if checker is not None:
            out.update(greedy_accuracy(model, rows, tokenizer, checker, max_new_tokens))
        return out
