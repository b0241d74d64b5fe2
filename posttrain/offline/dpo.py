"""Direct preference optimisation (sigmoid / IPO / cDPO) against a frozen reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.algorithms.logprobs import masked_sum
from posttrain.algorithms.offline_losses import DPOLossConfig, dpo_loss
from posttrain.data.formatting import make_pair_example, pad_batch, pair_row_problem
from posttrain.data.sources import build_examples
from posttrain.engine.head_logprobs import model_logprobs
from posttrain.models.loading import load_causal_lm
from posttrain.offline.common import Batch


@dataclass
class DPOConfig:
    """``algorithm: {_target_: posttrain.offline.dpo.DPOConfig, loss: {beta: 0.1, variant: sigmoid}}``."""

    loss: DPOLossConfig = field(default_factory=DPOLossConfig)

    def build(self) -> DPO:
        return DPO(self)


def pair_collate(examples, pad_id: int) -> Batch:
    """Chosen sequences first, then rejected: one forward over 2B sequences."""
    seqs = [e.chosen.input_ids for e in examples] + [e.rejected.input_ids for e in examples]
    masks = [e.chosen.loss_mask for e in examples] + [e.rejected.loss_mask for e in examples]
    return pad_batch(seqs, masks, pad_id)


class PreferencePairs:
    """Data handling shared by DPO and reward-model training: prompt/chosen/rejected rows,
    chosen-then-rejected batches, losses normalised by the global pair count."""

    def prepare(self, rows, tokenizer, max_length: int, max_bad_fraction: float, key: str) -> tuple[list[Any], list[dict]]:
        return build_examples(rows, lambda r: pair_row_problem(r) or make_pair_example(tokenizer, r, max_length), max_bad_fraction, key)

    def collate(self, examples, pad_id: int) -> Batch:
        return pair_collate(examples, pad_id)

    def count(self, batch: Batch) -> float:
        return batch["input_ids_BT"].shape[0] / 2

    pairs = True  # packed micro-batches keep each pair whole (packing.plan_pairs)


class DPO(PreferencePairs):
    needs_reference = True
    packs = True  # trainer.max_tokens_per_micro_batch: pairs packed whole, chosen and rejected share the prompt

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg
        self.reference = None  # a frozen TrainEngine, set by the runner
        self.fused = True  # model.fused_lm_head, read in load_model

    def load_model(self, model_cfg) -> torch.nn.Module:
        self.fused = model_cfg.fused_lm_head
        return load_causal_lm(model_cfg)

    def _seq_logps(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence logprob sums of the chosen and the rejected halves (padded or packed batch)."""
        lp = model_logprobs(model, batch, fused=self.fused)[0]
        sums = masked_sum(lp, batch["loss_mask_BT"], dim=-1)
        B = sums.shape[0] // 2
        return sums[:B], sums[B:]

    def loss(self, model, batch: Batch, global_count: float):
        if "ref_chosen_B" in batch:  # precomputed reference logprobs
            ref_c, ref_r = batch["ref_chosen_B"], batch["ref_rejected_B"]
        else:
            ref_c, ref_r = self.reference.forward(lambda ref: self._seq_logps(ref, batch))
        pol_c, pol_r = self._seq_logps(model, batch)
        mask = batch["loss_mask_BT"]
        B = mask.shape[0] // 2
        live = (mask[:B].sum(-1) > 0) | (mask[B:].sum(-1) > 0)  # a packed filler micro-batch's pairs are not
        if not bool(live.all()):
            if not bool(live.any()):
                return (pol_c.sum() + pol_r.sum()) * 0.0, {}  # the forward ran (FSDP collectives); no loss
            pol_c, pol_r, ref_c, ref_r = pol_c[live], pol_r[live], ref_c[live], ref_r[live]
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, self.cfg.loss, global_count)

    def evaluate(self, model, examples, rows, tokenizer, checker, max_new_tokens: int = 16) -> dict[str, float]:
        """Held-out ``eval/pair_accuracy``: the fraction of held-out pairs whose chosen response the
        policy gives a higher total logprob than the rejected one (``logp(c) > logp(r)``, sums in
        nats), with no reference model. It differs from the training ``rewards/accuracy``
        (:func:`~posttrain.algorithms.offline_losses.dpo_loss`), which compares the implicit rewards
        ``beta * (logp - logp_ref)``, i.e. how the policy moved *relative to the reference*: that one
        starts at 0 (policy = reference, strict ties) and climbs as DPO trains; this one starts at
        the model's prior preference (often not 0.5: shorter responses have higher logprob sums)
        and says whether the policy now ranks the held-out pairs the right way in absolute terms."""
        with torch.no_grad():
            c, r = self._seq_logps(model, self.collate(examples, tokenizer.pad_token_id))
        return {"pair_accuracy": float((c > r).float().mean())}
