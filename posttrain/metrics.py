"""Run metrics: a JSONL file (the source of truth), wandb (offline by default), and the console.

The console is a rich progress bar when stdout is a terminal, and one plain line per step (or per
``logging.every_steps``) otherwise (nohup, Slurm, ``ray job logs``, CI), with the step, the
``progress_keys`` and the time split::

    step 12/100 (12%)  reward/mean=0.41 loss=0.012  time generate=1.2s reward=0.05s train=3.4s sync=0.2s  elapsed 1m02s eta 8m35s
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
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
    progress: bool = True  # console progress: a rich bar on a terminal, one line per step otherwise
    progress_keys: list[str] = field(default_factory=lambda: ["loss", "accuracy", "reward/mean", "lr"])
    every_steps: int = 1  # without a terminal: print a line every this many steps (and the last)
    verbose: bool = False  # false: vLLM, Ray and transformers INFO logs are kept off the console
    samples_per_step: int = 4  # RL: completions whose text is kept per step (completions.jsonl, wandb table)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# Libraries whose INFO logs are kept off the console unless logging.verbose is true.
CHATTY_LOGGERS = ("vllm", "ray", "transformers", "datasets", "httpx", "filelock")
# vLLM's layer-wise weight reload warns "<Layer>: Failed to load weights" for layers that hold no
# checkpoint weights (RotaryEmbedding's cos/sin cache) at every weight sync: expected, harmless.
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "warning", "RAY_LOGGER_LEVEL": "warning"}  # read at import
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _NoWeightlessReloadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        weightless = isinstance(record.args, tuple) and record.args and str(record.args[0]).endswith("RotaryEmbedding")
        return not (weightless and "Failed to load weights" in str(record.msg))


def quiet_library_logs(verbose: bool | None = None) -> None:
    """Keep third-party INFO logs off the console (``verbose=False``), in this process and, through
    the environment, in the Ray actors it starts (``VLLM_*``/``POSTTRAIN_*`` variables travel with
    them). ``verbose=None`` reads ``POSTTRAIN_VERBOSE`` (set by the CLI): call it that way at the
    start of an actor, before vLLM is imported. The rotary-embedding reload warning is dropped
    either way."""
    if verbose is None:
        verbose = os.environ.get("POSTTRAIN_VERBOSE") == "1"
    os.environ["POSTTRAIN_VERBOSE"] = "1" if verbose else "0"
    for var, quiet in QUIET_ENV.items():  # a value the user set stays as it is
        if not verbose:
            os.environ.setdefault(var, quiet)
        elif os.environ.get(var) == quiet:
            del os.environ[var]
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    reload_log = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, _NoWeightlessReloadWarning) for f in reload_log.filters):
        reload_log.addFilter(_NoWeightlessReloadWarning())


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
        self._lines, self._last_line_step = False, -1
        self._start = time.time()
        if not enabled:
            return
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb.project, dir=run_dir, mode=cfg.wandb.mode, config=redact(resolved_config),
                name=os.path.basename(run_dir.rstrip("/")), reinit="finish_previous",
                id=wandb_run_id(run_dir), resume="allow",  # a resumed run continues the same wandb run
                settings=wandb.Settings(silent=True, console="off"),  # posttrain prints its own lines
            )
        if cfg.progress and not sys.stdout.isatty():
            self._lines = True
        elif cfg.progress:
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
        if self._lines and step > 0 and (step % self.cfg.every_steps == 0 or step >= self.total):
            line = step_line(step, self.total, clean, self.cfg.progress_keys, record["time_s"])
            if step != self._last_line_step or "=" in line:  # a final eval logged at the last step: only if it shows something
                print(line, flush=True)
            self._last_line_step = step

    def log_samples(self, step: int, samples: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
        """Keep ``logging.samples_per_step`` of this step's completions (see ``log_completion_samples``)."""
        if not self.enabled:
            return []
        run_dir = os.path.dirname(self.path)
        return log_completion_samples(run_dir, step, samples, self.cfg.samples_per_step, seed, self._wandb)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_ID = "wandb_id"


def wandb_run_id(run_dir: str) -> str:
    """The wandb run id of ``run_dir``: made once and kept in ``<run_dir>/wandb_id``, so every
    resume of the run logs to the same wandb run (``resume="allow"``)."""
    path = os.path.join(run_dir, WANDB_ID)
    if os.path.isfile(path):
        with open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def step_line(step: int, total: int, metrics: dict[str, Any], keys: list[str], elapsed_s: float) -> str:
    """One console line for a step, for logs without a terminal: step, progress keys, time split
    (every ``time/<part>_s`` metric but the step total), elapsed and remaining time."""
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float) and math.isfinite(metrics[k]))
    split = " ".join(
        f"{k[len('time/'):-2]}={v:.3g}s" for k, v in metrics.items()
        if k.startswith("time/") and k.endswith("_s") and k != "time/step_s" and isinstance(v, float)
    )
    eta = elapsed_s / step * (total - step) if 0 < step < total else 0.0
    parts = [f"step {step}/{total} ({100 * step // max(1, total)}%)", shown, f"time {split}" if split else "",
             f"elapsed {_duration(elapsed_s)} eta {_duration(eta)}"]
    return "  ".join(p for p in parts if p)


def log_completion_samples(
    run_dir: str, step: int, samples: list[dict[str, Any]], k: int, seed: int = 0, wandb_run: Any = None
) -> list[dict[str, Any]]:
    """Keep the text of ``k`` of a step's rollouts: append them to ``<run_dir>/completions.jsonl``
    and, when a wandb run is given, log them as a table ``completions`` at ``step``.

    ``samples``: one dict per completion, at least ``{"prompt", "completion", "reward"}`` (any
    other JSON-able fields, e.g. per-node rewards or the policy version, are kept). The choice is
    a seeded function of (seed, step), so a resumed run keeps the same samples. Returns the kept rows.
    """
    if k <= 0 or not samples:
        return []
    chosen = sorted(random.Random(seed * 1_000_003 + step).sample(range(len(samples)), min(k, len(samples))))
    rows = [{"step": step, **samples[i]} for i in chosen]
    with open(os.path.join(run_dir, COMPLETIONS), "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    if wandb_run is not None:
        import wandb

        first = ["step", "prompt", "completion", "reward"]
        columns = [c for c in first if any(c in r for r in rows)] + sorted({c for r in rows for c in r} - set(first))
        wandb_run.log({"completions": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step)
    return rows


COMPLETIONS = "completions.jsonl"


def metric_reduction(key: str) -> Literal["max", "min", "mean"]:
    """How a metric combines over micro-batches, mini-batches and ranks: by its name's suffix."""
    if key.endswith("_max"):
        return "max"
    if key.endswith("_min"):
        return "min"
    return "mean"


def aggregate_metrics(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch / per-mini-batch / per-rank metric dicts into one.

    Keys ending ``_max`` take the max, ``_min`` the min, every other key the mean over the records
    that have it: a record may lack keys (a step skipped as non-finite reports no ``lr``), which
    is not an error. Key order: first appearance.
    """
    values: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            values.setdefault(key, []).append(float(value))
    reduce = {"max": max, "min": min, "mean": lambda xs: sum(xs) / len(xs)}
    return {key: reduce[metric_reduction(key)](xs) for key, xs in values.items()}


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
