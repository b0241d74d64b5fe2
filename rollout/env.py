"""Environments for multi-turn rollouts: the interface a user implements, and the turn limits.

One trajectory, as the agent loop (``posttrain.rl.agent``) drives it::

    prompt tokens ─► env.reset(row) ─► observation tokens (mask 0; often none)
      ─► policy turn (sampled on a rollout worker, stops at a tool-call marker or EOS; mask 1)
      ─► env.step(action text) ─► StepResult(observation, rewards, done)
      ─► observation tokens (mask 0) ─► next policy turn on the same worker ... until done,
         ``max_turns`` policy turns or ``max_total_tokens`` completion tokens

An environment is one class with two async methods; the recipe names it by import path and passes
its keyword arguments (``rollout.agent.env: {_target_: my_module.MyEnv, some_arg: 3}``); the loop makes
one instance per trajectory, so an instance may keep the trajectory's state. Shared, costly
resources (a sandbox) belong in a module-level cache the instances share (see ``env_tools``).

Reward parts returned by ``step`` are per turn: each reaches the advantages on the last token of
the policy turn that earned it (group estimators sum them with the reward graph's score; GAE
sees them per token). An ``env.step`` that raises masks the trajectory (counted), never the step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.config.errors import ConfigError


@dataclass
class StepResult:
    """What the environment answers to one policy turn.

    observation: text appended as environment tokens (loss mask 0) before the next policy turn;
        "" for none. rewards: reward parts for the action just taken (name -> value; empty: none).
    done: the trajectory ends here. info: counters for metrics (e.g. ``{"tool_calls": 1}``).
    """

    observation: str = ""
    rewards: dict[str, float] = field(default_factory=dict)
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One trajectory's environment (async; one instance per trajectory)."""

    async def reset(self, row: dict[str, Any]) -> str:
        """The first observation, appended after the prompt's tokens ("" for none). ``row``: the
        dataset row's fields (answer, numbers, tests, ...)."""
        ...

    async def step(self, action: str) -> StepResult:
        """React to the policy's last turn (its decoded text, stop marker included)."""
        ...


@dataclass
class AgentConfig:
    """``rollout.agent:`` — multi-turn rollouts: the environment and the turn limits.

    Attributes:
        env: the environment class (``_target_``, an import path) and its keyword arguments; one
            instance per trajectory. null (default): one completion per sample, no environment.
        max_turns: policy turns per trajectory at most (then finish_reason "length").
        max_total_tokens: completion tokens (policy + observation) per trajectory at most.
        tool_timeout_s: one ``env.step`` at most this long; past it the observation says so and
            the trajectory goes on (the sandbox's own wall clock should be shorter).
        stop: strings that end a policy turn (the tool-call marker); the marker stays in the
            sampled tokens, so the trainer sees exactly what was sampled.
        max_observation_tokens: an observation longer than this is cut (a flood), saying so.
        trajectories_file: trajectories of every step written to the run dir (for
            ``posttrain rollouts show``); "" writes none.
        turn_linger_s: a free worker holds its waiting turns up to this long while fewer than half
            of its live trajectories wait (the others still in their tool calls), so that turns
            returning close together go out as one engine batch; 0 sends them at once.
    """

    env: dict[str, Any] | None = None
    max_turns: int = 4
    max_total_tokens: int = 256
    tool_timeout_s: float = 10.0
    stop: list[str] = field(default_factory=lambda: ["</tool>"])
    max_observation_tokens: int = 96
    trajectories_file: str = "trajectories.jsonl"
    turn_linger_s: float = 0.0

    def validate(self) -> tuple[str, str, str] | None:
        if self.max_turns < 1:
            return ("max_turns", f"{self.max_turns} must be >= 1", "set rollout.agent.max_turns=4")
        if self.max_total_tokens < 1:
            return ("max_total_tokens", f"{self.max_total_tokens} must be >= 1", "set rollout.agent.max_total_tokens=256")
        if self.tool_timeout_s <= 0:
            return ("tool_timeout_s", f"{self.tool_timeout_s} must be > 0", "set rollout.agent.tool_timeout_s=10")
        if self.max_observation_tokens < 1:
            return ("max_observation_tokens", f"{self.max_observation_tokens} must be >= 1", "e.g. 64")
        if self.turn_linger_s < 0:
            return ("turn_linger_s", f"{self.turn_linger_s} must be >= 0", "set rollout.agent.turn_linger_s=0 (no lingering)")
        return None


SYNC_ONLY = ("multi-turn rollouts (rollout.agent.env) are chunked by their turns and re-run a turn batch whose worker "
             "misses cluster.call_timeout_s: rollout.chunk_tokens and rollout.request_timeout_s are single-turn only")
MASK_POLICY = "policy tokens: loss mask 1, behaviour logprobs, version per token; observation tokens: mask 0"


def env_class(spec: dict[str, Any], source: str = "recipe") -> tuple[type, dict[str, Any]]:
    """The environment class named by ``spec["_target_"]`` and its checked keyword arguments.

    Raises ConfigError (exit 2) naming ``rollout.agent.env`` for a missing or wrong class or arguments."""
    from posttrain.config.targets import import_object

    if "_target_" not in spec:
        raise ConfigError("rollout.agent.env._target_", source, "missing", "rollout.agent.env: {_target_: posttrain.rollout.env_tools.CodeToolEnv}")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    cls = import_object(spec["_target_"], "rollout.agent.env._target_", source)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ConfigError("rollout.agent.env._target_", source, f"{spec['_target_']!r} is not an environment class",
                          "point it at a class with async reset(row) and step(action) (posttrain.rollout.env.Env)")  # fmt: skip
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ConfigError("rollout.agent.env", source, f"{cls.__name__}({', '.join(kwargs)}): {err}",
                          f"pass only the keyword arguments of {cls.__name__}{inspect.signature(cls)}") from None  # fmt: skip
    return cls, kwargs


def describe(limits: AgentConfig) -> dict[str, Any] | None:
    """What ``--dry-run`` prints about the environment: class, arguments, limits, mask policy."""
    spec = limits.env
    if not spec:
        return None
    return {
        "env": spec["_target_"],
        "env_kwargs": {k: v for k, v in spec.items() if k != "_target_"},
        "turn_limits": {"max_turns": limits.max_turns, "max_total_tokens": limits.max_total_tokens,
                        "tool_timeout_s": limits.tool_timeout_s, "stop": list(limits.stop)},  # fmt: skip
        "mask_policy": MASK_POLICY,
    }


class SingleTurnEnv:
    """One policy turn, no observation: today's single-completion path as an environment.

    With it, a trajectory is one completion whose loss mask is all ones, so its train batch equals
    that of ``WorkerFleet.generate`` on the same tokens. Rewards come from the reward graph only.
    """

    async def reset(self, row: dict[str, Any]) -> str:
        return ""

    async def step(self, action: str) -> StepResult:
        return StepResult(done=True)
