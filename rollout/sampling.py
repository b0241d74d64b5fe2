"""Sampling parameters of a rollout: the recipe's ``rollout.sampling`` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config.errors import ConfigError


class SamplingError(ConfigError, ValueError):
    """A sampling value out of range (a ConfigError: exit 2 from the CLI)."""


@dataclass
class SamplingConfig:
    """How each prompt is sampled.

    Attributes:
        n: completions per prompt (the group size).
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus mass in (0, 1]; 1 disables nucleus sampling.
        max_tokens: new tokens per completion at most (finish_reason "length" when reached).
        stop: strings that end a completion (finish_reason "stop"; the stop string is not returned).
        seed: base seed; with a seed the same prompts give the same completions on the same engine.
        batch_seed: the engine reseeds its sampler with this before the batch (no per-request
            seeds): the same batch of prompts on the same weights gives the same completions, on
            any engine instance. The RL controller derives it from the run seed and the request's
            content, so a resumed run or a re-dispatched request samples what the first one did.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    batch_seed: int | None = None

    def validate(self) -> tuple[str, str, str] | None:
        """(key, problem, fix) for a value out of range, else None (the recipe loader reports it)."""
        if self.n < 1:
            return ("n", f"{self.n} must be >= 1", "set rollout.sampling.n to the group size, e.g. 8")
        if self.temperature < 0:
            return ("temperature", f"{self.temperature} must be >= 0", "set rollout.sampling.temperature=1.0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            return ("top_p", f"{self.top_p} must be in (0, 1]", "set rollout.sampling.top_p=1.0 (no nucleus filtering)")
        if self.max_tokens < 1:
            return ("max_tokens", f"{self.max_tokens} must be >= 1", "set rollout.sampling.max_tokens to the longest answer")
        return None

    def __post_init__(self) -> None:
        problem = self.validate()
        if problem:  # built in code (the Python API): the same message as from a recipe
            key, message, fix = problem
            raise SamplingError(f"rollout.sampling.{key}", "SamplingConfig", message, fix)
