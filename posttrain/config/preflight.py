"""Checks of a loaded recipe against the machine, run before anything starts (and by ``--dry-run``).

The loader checks the recipe itself (keys, types, ranges, consistency). These check what the
recipe points at: the output directory can be written, the model path holds weights and a
tokenizer, the rollout engine can serve the model and fit a completion in its context
(:mod:`posttrain.config.engine_support`), every reward function imports, the data files load
(bad rows counted against ``data.max_bad_fraction``). Each failure is one ``PosttrainError`` naming the key, where it was
set, and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from posttrain.config.engine_support import check_engine_serves
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


def engine_setting(engine: dict[str, Any] | None, name: str) -> Any:
    """``rollout.engine.<name>`` as the engine will see it: the recipe's value, else the default of
    the engine config class named by ``_target_`` (None when neither has it)."""
    engine = engine or {}
    if name in engine:
        return engine[name]
    target = engine.get("_target_")
    if not target:
        return None
    from posttrain.config.targets import import_object

    cls = import_object(str(target), "rollout.engine._target_", "recipe")
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return None


def rl_prompt_limit(cfg: Any, evaluation: bool = False) -> int | None:
    """Tokens a prompt may have so the engine can also generate: ``max_model_len - max_tokens``
    (eval prompts: ``eval.max_new_tokens`` when larger). None when the engine declares no limit."""
    max_model_len = engine_setting(cfg.rollout.engine, "max_model_len")
    if not max_model_len:
        return None
    new = cfg.rollout.sampling.max_tokens
    if evaluation:
        new = max(new, cfg.eval.max_new_tokens)
    return int(max_model_len) - new


def check_engine_limits(cfg: Any, recipe: str, overrides: list[str]) -> None:
    """Online RL: a completion of ``rollout.sampling.max_tokens`` fits the engine's context.

    ``max_model_len`` counts prompt + completion tokens; vLLM would otherwise cut every
    completion short of ``max_tokens`` without a word.
    """
    if cfg.rollout is None:
        return
    max_model_len = engine_setting(cfg.rollout.engine, "max_model_len")
    max_tokens = cfg.rollout.sampling.max_tokens
    if max_model_len and max_tokens >= int(max_model_len):
        key = "rollout.sampling.max_tokens"
        raise ConfigError(
            key, key_source(key, recipe, overrides),
            f"{max_tokens} new tokens do not fit rollout.engine.max_model_len={max_model_len}, which counts the "
            "prompt and the completion together: no room is left for a prompt, and completions would be cut short",
            f"lower rollout.sampling.max_tokens below {max_model_len} minus the longest prompt, or raise "
            f"rollout.engine.max_model_len (e.g. rollout.engine.max_model_len={max_tokens + 256})",
        )


def check_data(cfg: Any, tokenizer: Any) -> None:
    """The data loads and has few enough bad rows: RL prompt rows (tokenised, so prompts the
    engine has no room for count too), or the offline algorithm's own examples (tokenised, so
    over-length rows count too)."""
    from posttrain.data.formatting import make_rl_prompt
    from posttrain.data.sources import build_examples, load_rows

    d = cfg.data
    algo = cfg.algorithm.build() if cfg.rollout is None else None
    for key, src in (("data.train", d.train), ("data.eval", d.eval)):
        if src is None:
            continue
        rows = load_rows(src, key, d.fields)
        if algo is not None and hasattr(algo, "prepare"):
            algo.prepare(rows, tokenizer, d.max_length, d.max_bad_fraction, key)
        else:
            limit = rl_prompt_limit(cfg, evaluation=key == "data.eval")
            build_examples(rows, lambda r, lim=limit: make_rl_prompt(tokenizer, r, lim), d.max_bad_fraction, key)


def check_before_start(cfg: Any, recipe: str, overrides: list[str]) -> None:
    """Everything knowable before training; raises the first problem found."""
    from posttrain.data.templates import apply_templates
    from posttrain.models.loading import load_tokenizer

    check_output_dir(cfg.run.output_dir, cfg.run.name, key_source("run.output_dir", recipe, overrides))
    check_engine_limits(cfg, recipe, overrides)
    tokenizer = load_tokenizer(cfg.model)  # model.path: exists, config.json, weights, tokenizer
    where = f"model.path '{cfg.model.path}'" if cfg.model.path else "model.factory"
    tokenizer = apply_templates(tokenizer, cfg.data, where)  # a chat template, or the recipe's format
    if cfg.rollout is not None:  # the rollout engine serves this model (architecture, head size, dtype)
        check_engine_serves(cfg.model, cfg.rollout.engine, engine_setting(cfg.rollout.engine, "dtype"))
    check_reward_functions(cfg.reward, recipe, overrides)
    check_data(cfg, tokenizer)
