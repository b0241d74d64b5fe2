"""Losses and advantage estimators: pure tensor functions plus typed configs.

- ``logprobs``: token logprobs (chunked, fp32), entropy, masked mean / sum / whiten.
- ``offline_losses``: ``sft_loss``, ``dpo_loss`` + ``DPOLossConfig``, ``bradley_terry_loss``.
- ``advantages``: ``GRPOAdvantage`` / ``RLOOAdvantage`` / ``GAEAdvantage`` (``AdvantageEstimator``),
  dynamic sampling, overlong filter / penalty.
- ``policy_loss``: one clipped policy loss (``PolicyLossConfig``; GRPO / Dr.GRPO / DAPO / GSPO
  presets are subclasses with other defaults), ``kl_penalty``, ``value_loss``.

Every loss returns ``(loss, metrics)`` and divides by a global count passed in.
"""
