"""Losses and advantage estimators: pure tensor functions plus typed configs.

- ``logprobs``: token logprobs (chunked, fp32), entropy, masked mean / sum / whiten;
  ``processed_token_logprobs``: logprobs and entropy of the sampler's distribution (logits / T,
  vLLM's top-k / top-p).
- ``offline_losses``: ``sft_loss``, ``dpo_loss`` + ``DPOLossConfig``, ``bradley_terry_loss``.
- ``advantages``: ``GRPOAdvantage`` / ``RLOOAdvantage`` / ``GAEAdvantage`` /
  ``ReinforcePlusPlusAdvantage`` / ``ReinforcePlusPlusBaselineAdvantage`` (``AdvantageEstimator``),
  token-level rewards in every estimator, dynamic sampling, overlong filter. (The soft overlong
  penalty is a reward node: ``posttrain.rewards.overlong.OverlongPenalty``.)
- ``kl``: clamped KL estimators, the KL-in-reward penalty, fixed / adaptive KL controllers.
- ``policy_loss``: one clipped policy loss (``PolicyLossConfig``; GRPO / Dr.GRPO / DAPO / GSPO
  presets are subclasses with other defaults), ``value_loss``.

Every loss returns ``(loss, metrics)`` and divides by a global count passed in.
"""
