"""Checks of a loaded recipe against the machine, run before anything starts (and by ``--dry-run``).

The loader checks the recipe itself (keys, types, ranges, consistency). These check what the
recipe points at: the output directory can be written, the model path holds weights and a
tokenizer, every reward function imports, the data files load (bad rows counted against
``data.max_bad_fraction``). Each failure is one ``PosttrainError`` naming the key, where it was
set, and the fix.
"""

from __future__ import annotations

import os
from typing import Any

from posttrain.config.errors import ConfigError


def key_source(key: str, recipe: str, overrides: list[str]) -> str:
    """Where ``key`` was set: the command-line override that set it, else the recipe file."""
    for text in reversed(overrides):
        name = text.split("=", 1)[0].lstrip("+~")
        if key == name or key.startswith(name + "."):
            return f"command-line override '{text}'"
    return recipe


def check_output_dir(output_dir: str, name: str, source: str) -> None:
    """``<output_dir>/<name>`` can be created and written (nothing is created here)."""
    target = os.path.abspath(os.path.join(output_dir, name))
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(
            "run.output_dir", source, f"'{probe}' is a file, so the run directory {target} cannot be created there",
            "set run.output_dir to a directory (created if missing), e.g. run.output_dir=runs",
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            "run.output_dir", source, f"'{probe}' is not writable, so the run directory {target} cannot be created",
            "set run.output_dir to a directory you can write, e.g. run.output_dir=$HOME/runs",
        )


def check_reward_functions(reward_cfg: Any, recipe: str, overrides: list[str]) -> None:
    """Every reward node's ``fn`` (and an imported ``aggregate``) resolves to a Python object."""
    if reward_cfg is None:
        return
    from posttrain.rewards.errors import RewardConfigError
    from posttrain.rewards.loading import import_object

    for i, node in enumerate(getattr(reward_cfg, "nodes", []) or []):
        key = f"reward.nodes[{i}].fn"
        try:
            import_object(node.fn, what=f"reward node {node.name!r} fn")
        except RewardConfigError as exc:
            raise ConfigError(
                key, key_source(f"reward.nodes.{i}.fn", recipe, overrides), str(exc),
                "give the import path 'package.module.function'; a module in the current directory imports when you "
                "run posttrain from that directory (PYTHONPATH=. posttrain run ...)",
            ) from None


def check_data(cfg: Any, tokenizer: Any) -> None:
    """The data loads and has few enough bad rows: RL prompt rows, or the offline algorithm's own
    examples (tokenised, so over-length rows count too)."""
    from posttrain.data.formatting import rl_row_problem
    from posttrain.data.sources import build_examples, load_rows

    d = cfg.data
    algo = cfg.algorithm.build() if cfg.rollout is None else None
    for key, src in (("data.train", d.train), ("data.eval", d.eval)):
        if src is None:
            continue
        rows = load_rows(src, key)
        if algo is not None and hasattr(algo, "prepare"):
            algo.prepare(rows, tokenizer, d.max_length, d.max_bad_fraction, key)
        else:
            build_examples(rows, lambda r: rl_row_problem(r) or r, d.max_bad_fraction, key)


def check_before_start(cfg: Any, recipe: str, overrides: list[str]) -> None:
    """Everything knowable before training; raises the first problem found."""
    from posttrain.models.loading import load_tokenizer

    check_output_dir(cfg.run.output_dir, cfg.run.name, key_source("run.output_dir", recipe, overrides))
    tokenizer = load_tokenizer(cfg.model)  # model.path: exists, config.json, weights, tokenizer
    check_reward_functions(cfg.reward, recipe, overrides)
    check_data(cfg, tokenizer)
