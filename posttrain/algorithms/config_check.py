"""Validation of algorithm configs built directly in Python (not through a recipe).

Algorithm configs follow the project convention: ``validate() -> (key, problem, fix) | None``,
which the recipe loader turns into a ``ConfigError`` naming the recipe file and full key. Losses
call ``raise_if_invalid`` too, so a config built in Python fails just as clearly, before any math.
"""

from __future__ import annotations

from typing import Protocol

from posttrain.config.errors import ConfigError


class Validatable(Protocol):
    def validate(self) -> tuple[str, str, str] | None: ...


def raise_if_invalid(cfg: Validatable) -> None:
    """Raise ``ConfigError`` (source: the config class) when ``cfg.validate()`` reports a problem."""
    problem = cfg.validate()
    if problem is not None:
        key, message, fix = problem
        raise ConfigError(key, f"{type(cfg).__name__} (built in Python)", message, fix)
