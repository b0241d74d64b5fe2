"""Resolve import paths ("package.module.attr" or "package.module:attr") to Python objects."""

from __future__ import annotations

import importlib
from typing import Any

from posttrain.rewards.errors import RewardConfigError


def import_object(path: str, *, what: str = "reward function") -> Any:
    """Import ``path`` and return the object it names.

    Accepts ``pkg.mod.attr`` and ``pkg.mod:attr`` (the attribute may be dotted: ``mod:Cls.meth``).
    Raises RewardConfigError naming the path and what failed.
    """
    if not isinstance(path, str) or not path.strip():
        raise RewardConfigError(f"{what} import path must be a non-empty string, got {path!r}")
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardConfigError(
            f"{what} import path {path!r} has no module part; write it as 'package.module.name'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardConfigError(
            f"cannot import module {module_name!r} for {what} {path!r}: {exc}; "
            "check the spelling and that the module is on PYTHONPATH"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardConfigError(
                f"module {module_name!r} has no attribute {attr!r} (from {what} import path {path!r})"
            ) from None
    return obj
