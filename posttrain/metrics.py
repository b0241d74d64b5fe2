"""Run metrics: a JSONL file (the source of truth), wandb (offline by default), a rich progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

SECRET_MARKERS = ("key", "token", "secret", "password")


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"  # no network here: offline by default
    project: str = "posttrain"


@dataclass
class LoggingConfig:
    progress: bool = True  # rich progress bar with ETA and key metrics
    progress_keys: list[str] = field(default_factory=lambda: ["loss", "accuracy", "reward/mean", "lr"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


def redact(obj: Any) -> Any:
    """Copy of a config dict with secret-looking values replaced (for logs and wandb)."""
    if isinstance(obj, dict):
        return {k: ("***" if any(m in k.lower() for m in SECRET_MARKERS) and isinstance(v, str) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run directory; mirrors to wandb and a progress bar (rank 0)."""

    def __init__(self, run_dir: str, cfg: LoggingConfig, total_steps: int, resolved_config: dict[str, Any], enabled: bool = True) -> None:
        self.enabled, self.cfg, self.total = enabled, cfg, total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = self._progress = None
        self._start = time.time()
        if not enabled:
            return
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project, dir=run_dir, mode=cfg.wandb.mode, config=redact(resolved_config),
                name=os.path.basename(run_dir.rstrip("/")), reinit="finish_previous",
            )
        if cfg.progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), TextColumn("{task.description}"), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=total_steps)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": step, "time_s": round(time.time() - self._start, 3), **clean}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, float)}, step=step)
        if self._progress is not None:
            shown = " ".join(f"{k}={clean[k]:.4g}" for k in self.cfg.progress_keys if isinstance(clean.get(k), float) and math.isfinite(clean[k]))
            self._progress.update(self._task, completed=min(step, self.total), description=shown)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
