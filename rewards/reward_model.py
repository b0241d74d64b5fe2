"""Reward-model node: a transformers sequence-classification model scored in a Ray actor, batched.

``RewardModelScorer`` is the plain class (load a local checkpoint, score texts); the node
``RewardModelReward`` runs one scorer in a Ray actor and sends it each step's batch. The model is
what the reward-model recipe saves (``AutoModelForSequenceClassification`` with one label): the
score of a sample is the logit of ``template.format(prompt=..., completion=...)`` at its last
non-padding token, found from the attention mask (``sequence_scores``), never from
``config.pad_token_id``: a checkpoint without a pad id, or with one that differs from the
tokenizer's, scores the right position.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from posttrain.rewards.errors import RewardConfigError
from posttrain.rewards.remote import check_replacement

from posttrain.types import RewardSample


def last_token_index(attention_mask_BT: Any) -> Any:
    """Position of each row's last attended token (left or right padding). Returns ``index_B``.

    Raises ValueError for a row with no attended token (nothing to score).
    """
    import torch

    attended = attention_mask_BT.to(torch.bool)
    positions_T = torch.arange(attended.shape[1], device=attended.device)
    last_B = torch.where(attended, positions_T, -1).amax(-1)
    if bool((last_B < 0).any()):
        raise ValueError(f"rows {torch.nonzero(last_B < 0).flatten().tolist()} have no attended token to score")
    return last_B


def sequence_scores(model: Any, input_ids_BT: Any, attention_mask_BT: Any) -> Any:
    """Scalar score per sequence of a one-label sequence-classification model. Returns ``scores_B``
    (fp32, differentiable: the reward-model trainer uses it too).

    The model runs its own ``forward`` (so FSDP hooks and the like apply); the per-token logits are
    taken from its ``score`` head with a forward hook and read at ``last_token_index``. The
    model's pad-id pooling is ignored; with no pad id in its config, a temporary -1 (an id no token
    has) keeps transformers from refusing batches > 1 during the call.
    """
    import torch

    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise RewardConfigError(
            f"reward model class {type(model).__name__} has no `score` head: posttrain reads per-token scores from "
            "it; save the reward model as AutoModelForSequenceClassification of a causal LM (Llama, Qwen2, ...)"
        )
    captured: list[Any] = []
    handle = head.register_forward_hook(lambda _mod, _inp, out: captured.append(out))
    text_config = model.config.get_text_config()
    restore_pad = text_config.pad_token_id is None
    if restore_pad:
        text_config.pad_token_id = -1
    try:
        model(input_ids=input_ids_BT, attention_mask=attention_mask_BT)
    finally:
        handle.remove()
        if restore_pad:
            text_config.pad_token_id = None
    logits_BT = captured[-1][..., 0].float()
    rows_B = torch.arange(logits_BT.shape[0], device=logits_BT.device)
    return logits_BT[rows_B, last_token_index(attention_mask_BT).to(logits_BT.device)]


class RewardModelScorer:
    """Loads a sequence-classification checkpoint from ``model_path`` and scores texts on CPU or GPU."""

    def __init__(
        self, model_path: str, max_length: int = 1024, batch_size: int = 16, device: str = "cpu"
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32).to(
            device
        )
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise RewardConfigError(
                f"reward model {model_path} has num_labels={self.model.config.num_labels}; a reward model "
                "has one output (train it with the reward-model recipe or save it with num_labels=1)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    def score(self, texts: list[str]) -> list[float]:
        """One scalar per text (the single logit), in chunks of ``batch_size``."""
        import torch

        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc = self.tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(self.device)
            with torch.inference_mode():
                scores_B = sequence_scores(self.model, enc["input_ids"], enc["attention_mask"])
            out.extend(scores_B.tolist())
        return out


def check_model_dir(model_path: str) -> None:
    """Fail early, naming the path, when it is not a saved Hugging Face model directory."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise RewardConfigError(
            f"reward model path {model_path!r} is not a model directory (no config.json); point model_path "
            "at a checkpoint saved with save_pretrained, e.g. the output dir of the reward-model recipe"
        )


class RewardModelReward:
    """Batch-mode reward node backed by a Ray actor holding a RewardModelScorer.

    The actor starts on first use (``ray.init`` is called for a local instance when Ray is not
    running yet). A node timeout cancels the pending actor call. An actor that dies (killed, out
    of memory) is replaced and the batch scored again, at most ``max_actor_restarts`` times over
    the node's lifetime (``actors_replaced`` counts them); past it the call raises RewardActorError.
    """

    reward_mode = "batch"

    def __init__(
        self,
        model_path: str,
        template: str = "{prompt}{completion}",
        max_length: int = 1024,
        batch_size: int = 16,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_actor_restarts: int = 3,
    ) -> None:
        check_model_dir(model_path)
        self.model_path, self.template = model_path, template
        self._scorer_args = {
            "max_length": max_length,
            "batch_size": batch_size,
            "device": "cuda" if num_gpus else "cpu",
        }
        self._resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.max_actor_restarts = max_actor_restarts
        self.actors_replaced = 0
        self._actor: Any = None

    def _get_actor(self) -> Any:
        import ray

        if self._actor is None:
            if not ray.is_initialized():
                ray.init(include_dashboard=False)
            actor_cls = ray.remote(**self._resources)(RewardModelScorer)
            self._actor = actor_cls.remote(self.model_path, **self._scorer_args)
        return self._actor

    async def __call__(self, samples: list[RewardSample]) -> list[float]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        texts = [self.template.format(prompt=s.prompt, completion=s.completion) for s in samples]
        while True:
            actor = self._get_actor()
            ref = actor.score.remote(texts)
            try:
                return await ref
            except asyncio.CancelledError:
                ray.cancel(ref)
                raise
            except RayTaskError:  # the scorer raised: the batch's error (checked before actor death)
                raise
            except RayActorError as exc:
                if self._actor is actor:  # else close() or a concurrent call already replaced it
                    what = f"reward-model actor ({self.model_path})"
                    check_replacement(what, exc, self.actors_replaced, self.max_actor_restarts, len(texts))
                    self.actors_replaced += 1
                    self._actor = None

    def close(self) -> None:
        """Stop the actor (a new one starts on the next call)."""
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
