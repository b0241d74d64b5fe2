"""Typed ``_target_`` sections: implementations chosen by import path, validated strictly.

A section such as ``{_target_: posttrain.data.tasks.ArithmeticTask, digits: 2}`` names a dataclass
by import path; its other keys are that dataclass's fields. Unknown fields and wrong types are
rejected (no silent aliases), and the result is an instance of the named class.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from posttrain.config.bounds import check_bounds
from posttrain.config.errors import ConfigError

# Keys that moved to another section: named in the error instead of "unknown key".
MOVED = {
    "eval_every_steps": "eval.every_steps",  # was algorithm.eval_every_steps (online RL)
    "eval_max_tokens": "eval.max_new_tokens",  # was rollout.eval_max_tokens
    "eval_max_new_tokens": "eval.max_new_tokens",  # was algorithm.eval_max_new_tokens (SFT)
}


def import_object(path: str, key: str, source: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(key, source, f"cannot import '{path}' ({exc})", "give a full import path 'package.module.Name'") from None


def build_dataclass(cls: type, data: Any, key: str, source: str) -> Any:
    """Construct dataclass ``cls`` from a plain dict, checking every key and type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        on_off = isinstance(data, bool) and any(f.name == "enabled" for f in dataclasses.fields(cls))
        fix = f"{key} is a section; to switch it {'on' if data else 'off'}, set {key}.enabled={str(data).lower()}" if on_off \
            else "write it as a YAML mapping"
        raise ConfigError(key, source, f"expected a mapping for {cls.__name__}, got {type(data).__name__}", fix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        if name == "_target_":
            continue
        if name not in fields and name in MOVED:
            raise ConfigError(sub, source, f"this key moved to '{MOVED[name]}': every runner reads its evaluation settings from the eval section",
                              f"remove it and set {MOVED[name]} instead, e.g. `{MOVED[name]}=20` on the command line or `eval: {{{MOVED[name].split('.')[1]}: 20}}` in the recipe")
        if name not in fields and not fields:  # e.g. DPO's `loss:` under SFTConfig
            other = (f"; if '{name}' is another algorithm's key, that algorithm needs its own config: "
                     "algorithm._target_=posttrain.offline.dpo.DPOConfig for DPO, for example") if key == "algorithm" else ""
            raise ConfigError(sub, source, f"unknown key: {cls.__name__} takes no keys", f"remove it{other}")  # fmt: skip
        if name not in fields:
            close = [f for f in fields if f.startswith(name[:3])] or sorted(fields)
            raise ConfigError(sub, source, f"unknown key for {cls.__name__}", f"remove it or use one of: {', '.join(close)}")
        kwargs[name] = coerce(hints[name], value, sub, source)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}" if key else missing[0], source, "required key is missing", f"set {missing[0]} in the recipe")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    # Ranges first: a section's own validate() may divide by them.
    problem = check_bounds(obj, key) or (check() if callable(check) else None)
    if problem:
        bad_key, message, fix = problem
        raise ConfigError(f"{key}.{bad_key}" if key else bad_key, source, message, fix)
    return obj


def build_target(data: Any, key: str, source: str, base: type | None = None) -> Any:
    """Instantiate the dataclass named by ``data['_target_']`` (optionally a subclass of ``base``)."""
    if isinstance(data, dict) and "_target_" in data:
        cls = import_object(str(data["_target_"]), f"{key}._target_", source)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"{key}._target_", source, f"'{data['_target_']}' is not a config dataclass", "point _target_ at a dataclass")
        if base is not None and not issubclass(cls, base):
            raise ConfigError(f"{key}._target_", source, f"'{data['_target_']}' is not a {base.__name__}", f"use a subclass of {base.__module__}.{base.__name__}")
        return build_dataclass(cls, data, key, source)
    if base is not None and dataclasses.is_dataclass(data) and isinstance(data, base):
        return data
    raise ConfigError(key, source, "needs a '_target_' import path", "add `_target_: package.module.ConfigClass`")


def coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert nested dataclasses. No lossy conversion."""
    origin = get_origin(tp)
    if tp is Any:
        return build_target(value, key, source) if isinstance(value, dict) and "_target_" in value else value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(key, source, f"value {value!r} fits none of {tp}: {'; '.join(errors)}", "fix the value's type")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, source, f"{value!r} is not allowed", f"use one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, source, f"expected a list, got {type(value).__name__} {value!r}", "write a YAML list [a, b]")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, source, f"expected a mapping, got {type(value).__name__}", "write a YAML mapping")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: coerce(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict) and "_target_" in value:
            return build_target(value, key, source, base=tp)
        return build_dataclass(tp, value, key, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, source, f"expected a number, got {type(value).__name__} {value!r}", "write a number, e.g. 1e-4")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, source, f"expected an integer, got {type(value).__name__} {value!r}", "write a whole number")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, source, f"expected true/false, got {type(value).__name__} {value!r}", "write true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, source, f"expected a string, got {type(value).__name__} {value!r}", "quote the value")
        return value
    return value


def to_plain(obj: Any, declared: Any = None) -> Any:
    """A validated config back to plain data (every default filled in); ``_target_`` is written
    wherever the declared type does not already say which class it is."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        hints = typing.get_type_hints(type(obj))
        out: dict[str, Any] = {}
        if declared is not type(obj):
            out["_target_"] = f"{type(obj).__module__}.{type(obj).__qualname__}"
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            args = [a for a in get_args(tp) if a is not type(None)]
            out[f.name] = to_plain(getattr(obj, f.name), args[0] if len(args) == 1 else tp)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
