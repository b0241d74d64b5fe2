"""From scored groups to a padded train batch, and the advantage step between reward and loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.algorithms.advantages import AdvantageInputs
from posttrain.types import ScoredGroup


@dataclass
class RLBatch:
    """Samples of one step in group-major order: row g*n+i is sample i of group g.

    Token tensors are [B, T] right-padded over prompt+response; position t holds the value for
    predicting token t (so prompt positions and position 0 are masked in loss_mask_BT).
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    behaviour_logprobs_BT: torch.Tensor
    versions_BT: torch.Tensor
    rewards_NG: torch.Tensor  # NaN = masked sample
    sample_mask_NG: torch.Tensor  # 1 = sample used
    response_lengths_B: torch.Tensor
    ordinals_B: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def rows(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return {
            "input_ids_BT": self.input_ids_BT[idx],
            "attention_mask_BT": self.attention_mask_BT[idx],
            "loss_mask_BT": self.loss_mask_BT[idx],
            "behaviour_logprobs_BT": self.behaviour_logprobs_BT[idx],
        }


def build_rl_batch(scored: list[ScoredGroup], pad_id: int, overlong_filter: bool) -> RLBatch:
    seqs, masks, blps, vers, lens, ords = [], [], [], [], [], []
    rewards, smask = [], []
    for sg in scored:
        row_r, row_m = [], []
        for c, r in zip(sg.group.completions, sg.rewards, strict=True):
            p = sg.group.prompt.token_ids
            seqs.append(p + c.token_ids)
            masks.append([0] * len(p) + c.policy_mask)  # observation tokens of a trajectory: 0
            blps.append([0.0] * len(p) + list(c.logprobs))
            vers.append([-1] * len(p) + list(c.versions))
            lens.append(len(c.token_ids))
            ords.append(sg.group.prompt.ordinal)
            ok = r is not None and math.isfinite(r) and any(c.policy_mask) and not (overlong_filter and c.truncated)
            row_r.append(float(r) if ok else float("nan"))
            row_m.append(1.0 if ok else 0.0)
        rewards.append(row_r)
        smask.append(row_m)
    B, T = len(seqs), max(map(len, seqs))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    lmask = torch.zeros((B, T))
    blp = torch.zeros((B, T))
    ver = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        n = len(seqs[b])
        ids[b, :n] = torch.tensor(seqs[b])
        attn[b, :n] = 1
        lmask[b, :n] = torch.tensor(masks[b], dtype=torch.float32)
        blp[b, :n] = torch.tensor(blps[b])
        ver[b, :n] = torch.tensor(vers[b])
    smask_NG = torch.tensor(smask)
    lmask = lmask * smask_NG.reshape(-1, 1)  # masked samples carry no loss
    return RLBatch(ids, attn, lmask, blp, ver, torch.tensor(rewards), smask_NG, torch.tensor(lens), torch.tensor(ords))


def advantage_inputs(batch: RLBatch, token_rewards_BT: torch.Tensor | None, values_BT: torch.Tensor | None) -> AdvantageInputs:
    return AdvantageInputs(
        rewards_NG=batch.rewards_NG,
        sample_mask_NG=batch.sample_mask_NG.bool(),
        loss_mask_BT=batch.loss_mask_BT,
        token_rewards_BT=token_rewards_BT,
        values_BT=values_BT,
    )
