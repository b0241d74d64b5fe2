"""Recipe form of a reward graph: typed configs naming functions by import path.

YAML (a recipe's ``reward:`` section)::

    reward:
      aggregate: weighted_sum          # or product, min, or an import path
      max_failed_fraction: 0.2
      nodes:
        - {name: fmt, fn: posttrain.rewards.builtins.format_reward, weight: 0.2}
        - {name: correct, fn: posttrain.rewards.builtins.exact_answer, gate: [fmt]}
        - name: judge
          fn: posttrain.rewards.judge.JudgeReward      # a class: built with kwargs
          gate: [correct]
          weight: 0.5
          timeout_s: 60
          kwargs: {base_url: "http://127.0.0.1:8000/v1", model: judge}

``fn`` naming a function binds ``kwargs`` at call time; naming a class builds one instance with
``kwargs`` (judge, reward-model and sandbox nodes are classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from posttrain.rewards.errors import RewardConfigError
from posttrain.rewards.graph import RewardGraph
from posttrain.rewards.loading import import_object
from posttrain.rewards.node import RewardNode


@dataclass
class RewardNodeConfig:
    """One node; fields mean what they mean on :class:`posttrain.rewards.node.RewardNode`."""

    name: str
    fn: str  # import path of a function or a class
    deps: list[str] = field(default_factory=list)
    gate: list[str] = field(default_factory=list)
    weight: float = 1.0
    timeout_s: float = 30.0
    on_error: str = "mask"  # mask | default | fail
    default: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str | None = None  # sample | batch | group; None: what fn declares
    token_level: bool = False
    max_concurrency: int = 64


@dataclass
class RewardGraphConfig:
    """A reward graph: nodes, how their values combine, and the step's failure tolerance."""

    nodes: list[RewardNodeConfig] = field(default_factory=list)
    aggregate: str = "weighted_sum"  # weighted_sum | product | min | import path of agg(values, weights)
    max_failed_fraction: float = 0.2
    max_threads: int = 8

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | DictConfig, source: str = "reward config"
    ) -> RewardGraphConfig:
        """Typed config from a mapping; unknown keys, wrong types and missing fields raise RewardConfigError."""
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), data)
            return OmegaConf.to_object(merged)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            first = str(exc).splitlines()[0]
            key = getattr(exc, "full_key", None)
            raise RewardConfigError(f"{source}: {first} (key: {key}); fix or remove that key") from None


def _node_from_config(cfg: RewardNodeConfig) -> RewardNode:
    target = import_object(cfg.fn, what=f"reward node {cfg.name!r} fn")
    kwargs = dict(cfg.kwargs)
    if isinstance(target, type):  # a class: one instance per graph, built with kwargs
        try:
            target = target(**kwargs)
        except TypeError as exc:
            raise RewardConfigError(
                f"reward node {cfg.name!r}: cannot build {cfg.fn}({kwargs}): {exc}"
            ) from None
        kwargs = {}
    return RewardNode(
        name=cfg.name,
        fn=target,
        deps=list(cfg.deps),
        gate=list(cfg.gate),
        weight=cfg.weight,
        timeout_s=cfg.timeout_s,
        on_error=cfg.on_error,  # type: ignore[arg-type]
        default=cfg.default,
        kwargs=kwargs,
        mode=cfg.mode,  # type: ignore[arg-type]
        token_level=cfg.token_level,
        max_concurrency=cfg.max_concurrency,
    )


def build_reward_graph(cfg: RewardGraphConfig | Mapping[str, Any] | DictConfig) -> RewardGraph:
    """Build (and validate) a RewardGraph from its recipe form."""
    if not isinstance(cfg, RewardGraphConfig):
        cfg = RewardGraphConfig.from_dict(cfg)
    return RewardGraph(
        [_node_from_config(n) for n in cfg.nodes],
        aggregate=cfg.aggregate,
        max_failed_fraction=cfg.max_failed_fraction,
        max_threads=cfg.max_threads,
    )
