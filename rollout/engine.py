"""The rollout engine interface: what the controller and the rollout actor may call.

Implementations: ``VLLMEngine`` (vLLM; default) and ``HFEngine`` (transformers ``generate``;
fallback). Both return the shared records of ``posttrain.types`` and take weights in the bucket
format of ``posttrain.weight_sync``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from posttrain.sync.group import GroupInfo
from posttrain.types import Group, PromptRecord
from posttrain.weight_sync import WeightBucket

from .sampling import SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_engine_config(dtype: str, model_path: str) -> None:
    """What every engine config checks at construction: a known dtype and a local HF model dir."""
    if dtype not in DTYPES:
        raise ValueError(f"rollout.engine.dtype={dtype!r}: use one of {sorted(DTYPES)}")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(
            f"rollout.engine.model_path={model_path!r} has no config.json: point it at a local "
            "Hugging Face model directory (or build one with posttrain.models.factory.save_tiny_model)"
        )


@dataclass
class LoadReport:
    """What one weight update cost on the receiving engine (seconds, bytes)."""

    version: int
    num_buckets: int
    bytes: int
    load_s: float  # first bucket received -> new version servable
    digest: int = 0  # fold_digest of the buckets' fingerprints (posttrain.weight_sync)
    # seconds per phase where the engine measures them (collective path: receive, check, load, finish)
    phases: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """A policy that samples completions and takes new weights.

    ``version`` is the policy version the engine serves (0 = the weights it was started with);
    every token it generates carries that version in ``Completion.versions``.
    """

    @property
    def version(self) -> int: ...

    def generate(self, prompts: list[PromptRecord], sampling: SamplingConfig) -> list[Group]:
        """One Group per prompt (same order), ``sampling.n`` completions each."""
        ...

    def load_weights(self, buckets: Iterable[WeightBucket], version: int, restore: bool = False) -> LoadReport:
        """Replace ALL weights with those in ``buckets`` and serve ``version`` from now on.

        ``version`` must be above the served one, unless ``restore`` (the trainer went back to a
        checkpoint and the engine follows it).

        Raises WeightSyncError (and serves nothing until a complete update) if the buckets break
        an invariant of ``posttrain.weight_sync``.
        """
        ...

    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """Per-token logprobs of given sequences under the current weights.

        For a sequence of L tokens returns L-1 values: logprob of token t given tokens < t, t=1..L-1.
        """
        ...

    def join_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        """Join the model-update group (``posttrain.sync.group``) at ranks ``rank_offset``.. (one
        per tensor-parallel rank); blocks until every member has joined."""
        ...

    def receive_weights(self, version: int, restore: bool = False) -> LoadReport:
        """``load_weights`` with the buckets broadcast over the update group by the sender."""
        ...

    def weight_digest(self) -> tuple[int, int]:
        """``(served version, digest of the buckets that made it)``; compared with the sender's."""
        ...

    def close(self) -> None: ...
