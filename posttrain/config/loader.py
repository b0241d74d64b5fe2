"""Load a recipe: Hydra composes config groups, overrides apply, the schema validates strictly.

``load_recipe("recipes/x.yaml", ["trainer.optim.lr=1e-4", "model=tiny_llama"])``:

1. Hydra composes the recipe with the groups in ``configs/`` (its ``defaults:`` list); an
   override whose key is a group name (``model=tiny_llama``) selects a group option.
2. Other overrides (``a.b.c=value``, Hydra's value grammar) are applied to existing keys only.
3. The result is validated against :class:`RecipeConfig`: unknown keys, wrong types and
   inconsistent values raise :class:`ConfigError` naming the key, the file (or override) and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from posttrain.config.errors import ConfigError
from posttrain.config.schema import RecipeConfig
from posttrain.config.targets import build_dataclass, build_target, to_plain

CONFIGS_DIR = Path(os.environ.get("POSTTRAIN_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


def _groups() -> set[str]:
    return {p.name for p in CONFIGS_DIR.iterdir() if p.is_dir()} if CONFIGS_DIR.is_dir() else set()


def _compose(recipe: Path, group_overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(recipe.parent.resolve()), version_base=None):
            cfg = compose(config_name=recipe.stem, overrides=[*group_overrides, f"hydra.searchpath=[file://{CONFIGS_DIR}]"])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError("defaults", str(recipe), f"cannot compose the recipe: {msg}", f"check the defaults list and the config groups in {CONFIGS_DIR}") from None


def _list_index(items: list[Any], part: str, key: str, source: str) -> int:
    """The index ``part`` names in ``items`` (``reward.nodes.0.fn``: item 0)."""
    if not part.isdigit():
        raise ConfigError(key, source, f"is a list of {len(items)} items, so '{part}' must be an index",
                          f"write {key.rsplit('.', 1)[0]}.0 ... .{len(items) - 1} for an item, or give the whole list")  # fmt: skip
    if int(part) >= len(items):
        raise ConfigError(key, source, f"index {part} is out of range: the list has {len(items)} items",
                          f"use an index from 0 to {len(items) - 1}, or give the whole list (e.g. reward.nodes=[...])")  # fmt: skip
    return int(part)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` in the composed tree; a numeric part indexes a list (``reward.nodes.0.fn``)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            nxt = node[_list_index(node, part, ".".join(parts[: i + 1]), source)]
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(".".join(parts[: i + 1]), source, "is a value, not a section", "override a key that exists in the schema")
        node = nxt
    if isinstance(node, list):
        node[_list_index(node, parts[-1], dotted, source)] = value
    else:
        node[parts[-1]] = value


def _source_of(key: str, recipe: Path, raw: dict[str, Any], overrides: dict[str, str]) -> str:
    for k, text in overrides.items():
        if key == k or key.startswith(k + "."):
            return f"command-line override '{text}'"
    top = key.split(".")[0].split("[")[0]
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, dict) and top in entry and top not in raw:
            return str(CONFIGS_DIR / top / f"{entry[top]}.yaml")
    return str(recipe)


def load_recipe(path: str, overrides: list[str] | None = None) -> tuple[RecipeConfig, dict[str, Any]]:
    """Return (validated config, resolved plain dict). Raises ConfigError (exit code 2)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError("recipe", str(recipe), "file not found", "give the path of a recipe YAML, e.g. recipes/sft_tiny_arith.yaml")
    try:
        raw = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("recipe", str(recipe), f"not valid YAML: {exc}", "fix the YAML syntax") from None
    overrides = overrides or []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError("override", "command line", str(exc).splitlines()[0], "write overrides as key=value, e.g. trainer.max_steps=10") from None
    groups = _groups()
    group_ovr = [text for o, text in zip(parsed, overrides, strict=False) if o.key_or_group in groups]
    value_ovr = [(o, text) for o, text in zip(parsed, overrides, strict=False) if o.key_or_group not in groups]
    tree = _compose(recipe, group_ovr)
    ovr_sources: dict[str, str] = {}
    for o, text in value_ovr:
        if o.is_add() or o.is_delete():
            raise ConfigError(o.key_or_group, f"command-line override '{text}'", "'+' and '~' overrides are not supported", "write key=value for a key in the schema")
        _set_path(tree, o.key_or_group, o.value(), f"command-line override '{text}'")
        ovr_sources[o.key_or_group] = text
    _command_line_alternative_wins(tree, ovr_sources)
    try:
        cfg = _validate(tree)
    except ConfigError as err:
        source = _source_of(err.key, recipe, raw, ovr_sources)
        raise ConfigError(err.key, source, err.problem, err.fix) from None
    resolved = to_plain(cfg, RecipeConfig)
    return cfg, resolved


# Sections holding two alternatives of which exactly one is set.
ALTERNATIVES = (("model", "path", "factory"), ("data.train", "path", "synthetic"), ("data.eval", "path", "synthetic"))


def _command_line_alternative_wins(tree: dict[str, Any], ovr_sources: dict[str, str]) -> None:
    """``model.path``/``model.factory`` (and a data source's ``path``/``synthetic``) are
    alternatives: the one set on the command line replaces the recipe's other one
    (``posttrain run dpo.yaml model.path=runs/sft/hf`` trains the exported model instead of the
    recipe's factory model; ``data.train.path=my.jsonl`` reads all the file's rows instead of the
    recipe's synthetic task). Both set on the command line stays an error."""
    for section, a, b in ALTERNATIVES:
        node: Any = tree
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        given = {k for k in (a, b) if any(o == f"{section}.{k}" or o.startswith(f"{section}.{k}.") for o in ovr_sources)}
        if len(given) == 1:
            (mine,) = given
            if node.get(mine) is not None:
                node[b if mine == a else a] = None
                if mine == "path" and b == "synthetic" and f"{section}.num_examples" not in ovr_sources:
                    node.pop("num_examples", None)  # it sized the synthetic task; a file gives all its rows


def _validate(tree: dict[str, Any]) -> RecipeConfig:
    if "algorithm" not in tree:
        raise ConfigError("algorithm", "", "required section is missing", "add `algorithm: {_target_: posttrain.offline.sft.SFTConfig}`")
    body = {k: v for k, v in tree.items() if k != "algorithm"}
    cfg = build_dataclass(RecipeConfig, {**body, "algorithm": None}, "", "")
    cfg.algorithm = build_target(tree["algorithm"], "algorithm", "")
    if not callable(getattr(cfg.algorithm, "build", None)):
        raise ConfigError("algorithm._target_", "", f"{type(cfg.algorithm).__name__} has no build() method", "point _target_ at an algorithm config")
    _instantiate_synthetic(cfg)
    extra = cfg.algorithm.sections() if hasattr(cfg.algorithm, "sections") else {}
    for name in ("rollout", "reward", "cluster", "sync"):
        if name in extra:
            setattr(cfg, name, build_dataclass(extra[name], tree.get(name) or {}, name, ""))
        elif tree.get(name) is not None:
            algo = type(cfg.algorithm).__name__
            raise ConfigError(name, "", f"section '{name}' is not used by {algo}", "remove it, or use an online-RL algorithm")
    if cfg.eval.scorer is not None and "reward" not in extra:
        raise ConfigError("eval.scorer", "", f"eval.scorer is read by online-RL recipes only, not by {type(cfg.algorithm).__name__}",
                          "remove it (offline eval uses the task's checker or exact match)")  # fmt: skip
    problem = cfg.algorithm.check_recipe(cfg) if hasattr(cfg.algorithm, "check_recipe") else None
    if problem:
        raise ConfigError(problem[0], "", problem[1], problem[2])
    return cfg


def _instantiate_synthetic(cfg: RecipeConfig) -> None:
    for name in ("train", "eval"):
        src = getattr(cfg.data, name)
        if src is not None and isinstance(src.synthetic, dict):
            src.synthetic = build_target(src.synthetic, f"data.{name}.synthetic", "")
