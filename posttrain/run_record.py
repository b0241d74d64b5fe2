"""A run's record: ``<run_dir>/config.yaml`` and what may replace it.

A run directory is the record of what was trained: the resolved config next to the metrics, the
checkpoints and the export. Two rules keep it true:

- a resume must be the same run: the same kind of recipe (``algorithm._target_``) and the same
  model (``model.path``, or the same ``model.factory`` spec, and LoRA on or off alike). Anything
  else exits 2 before the directory is touched, naming what differs and the fix;
- a run that fails leaves the record it found: the previous ``config.yaml`` is put back when the
  run raises (a Ctrl-C is not a failure: the resumed run trained under its new config).

Files are replaced atomically (write a sibling, fsync, rename), so a crash never leaves half a
``config.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from posttrain.config.errors import ConfigError

CONFIG = "config.yaml"


def _model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """What makes two model sections the same weights: the path when there is one, else the
    factory spec (architecture, sizes, seed); and whether LoRA adapters are trained."""
    path = model.get("path")
    return {
        "model.path": os.path.normpath(path) if path else None,
        "model.factory": None if path else model.get("factory"),
        "model.lora": "on" if model.get("lora") else "off",
    }


def run_identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """The keys a resume must keep, from a resolved config dict (as written to ``config.yaml``)."""
    algorithm = resolved.get("algorithm") or {}
    return {"algorithm._target_": algorithm.get("_target_"), **_model_identity(resolved.get("model") or {})}


def read_config(run_dir: str) -> dict[str, Any] | None:
    """The resolved config a run wrote, or None when the directory has none (or it is unreadable)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def check_resume_identity(run_dir: str, resolved: dict[str, Any], source: str) -> None:
    """Raise ConfigError (exit 2) when resuming ``run_dir`` with ``resolved`` would train another
    kind of recipe or another model than the one its record holds. No record: nothing to check."""
    old = read_config(run_dir)
    if old is None:
        return
    before, now = run_identity(old), run_identity(resolved)
    differ = [k for k in before if before[k] != now[k]]
    if not differ:
        return
    what = "recipe kind" if differ[0] == "algorithm._target_" else "model"
    lines = "; ".join(f"{k}: the run has {before[k]!r}, this recipe {now[k]!r}" for k in differ)
    name = os.path.basename(os.path.normpath(run_dir))
    raise ConfigError(
        "checkpoint.resume", source,
        f"cannot resume run '{name}' ({run_dir}) with another {what}: {lines}",
        f"give this run its own name (run.name={name}-{_kind_word(now)}) to start it fresh, or resume "
        f"'{name}' with the recipe and model that made it (see {os.path.join(run_dir, CONFIG)})",
    )


def _kind_word(identity: dict[str, Any]) -> str:
    target = identity.get("algorithm._target_") or "new"
    return target.rsplit(".", 1)[-1].removesuffix("Config").lower() or "new"


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: a sibling file is written and fsynced, then renamed over it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir: str, resolved: dict[str, Any]) -> str | None:
    """Write ``resolved`` as the run's ``config.yaml``; returns the text it replaced (None: new)."""
    path = os.path.join(run_dir, CONFIG)
    previous = None
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
    write_atomic(path, yaml.safe_dump(resolved, sort_keys=False))
    return previous


@contextmanager
def restore_on_failure(run_dir: str, previous: str | None) -> Iterator[None]:
    """If the block raises (anything but KeyboardInterrupt), put back the ``config.yaml`` that
    ``write_config`` replaced, so a failed resume leaves the record as it found it. A new run that
    fails keeps its ``config.yaml``: it is the record of that start, and the next attempt reuses
    the directory."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if previous is not None:
            write_atomic(os.path.join(run_dir, CONFIG), previous)
        raise
