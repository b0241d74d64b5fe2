"""``posttrain plot RUN_DIR``: PNG curves of a run's metrics (loss, accuracy/reward, lr, ...)."""

from __future__ import annotations

import math
import os

from posttrain.config.errors import PosttrainError
from posttrain.metrics import read_metrics

PREFERRED = ["loss", "accuracy", "eval/accuracy", "eval/pair_accuracy", "reward/mean", "kl", "entropy", "lr", "grad_norm"]


def plot_run(run_dir: str, out: str | None = None, keys: list[str] | None = None) -> str:
    """Write one PNG with a panel per metric; returns its path."""
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise PosttrainError(f"no metrics.jsonl in '{run_dir}'.\n  fix: pass a run directory written by `posttrain run`")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    present = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time_s")}
    if not present:
        raise PosttrainError(f"'{run_dir}' has no metrics yet (metrics.jsonl holds no values).\n"
                             "  fix: plot again once the run has logged its first step")
    keys = keys or [k for k in PREFERRED if k in present] + sorted(k for k in present if k.startswith("eval/") and k not in PREFERRED)
    keys = keys[:9] or sorted(present)[:9]
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4.5 * cols, 3.2 * math.ceil(len(keys) / cols)), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=False)
            ax.plot(xs, ys, marker="." if len(pts) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
