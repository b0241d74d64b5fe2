"""Learning result on the tool task: held-out success of the GRPO policy over its SFT start, 3 seeds.

For each seed: recipes/sft_tiny_tool.yaml (run.seed=seed; or one given ``--model`` for all seeds),
then recipes/grpo_tiny_tool.yaml from its export (multi-turn rollouts, the code tool in the
sandbox); success = greedy multi-turn trajectory whose final answer equals the row's
(``eval/accuracy`` on the held-out rows, before and after GRPO).

    python bench/agentic_demo.py [--model runs/sft_tiny_tool/hf] [--steps 20 --seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="one SFT export for every seed (default: SFT per seed)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval", type=int, default=200, help="held-out rows")
    ap.add_argument("--extra", nargs="*", default=[], help="more recipe overrides")
    args = ap.parse_args()

    from common import write_result

    from posttrain.config.loader import load_recipe
    from posttrain.metrics import read_metrics
    from posttrain.rl.controller import run_rl

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out, per_seed = tempfile.mkdtemp(prefix="agentic_demo_"), {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        model = os.path.abspath(args.model) if args.model else train_sft(root, out, seed)
        sft_s = round(time.perf_counter() - t0, 1)
        overrides = [f"model.path={model}", f"run.seed={seed}", f"trainer.max_steps={args.steps}",
                     f"data.eval.num_examples={args.eval}", f"eval.every_steps={args.steps}", f"run.output_dir={out}",
                     f"run.name=seed{seed}", "logging.wandb.enabled=false", "logging.progress=false",
                     "checkpoint.export_hf=false", f"checkpoint.every_steps={args.steps}", *args.extra]  # fmt: skip
        cfg, resolved = load_recipe(os.path.join(root, "recipes/grpo_tiny_tool.yaml"), overrides)
        run_dir = os.path.join(out, f"seed{seed}")
        os.makedirs(run_dir, exist_ok=True)
        t0 = time.perf_counter()
        summary = run_rl(cfg, resolved, run_dir)
        steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
        per_seed[seed] = {
            "sft_accuracy": summary["before"]["eval/accuracy"], "grpo_accuracy": summary["after"]["eval/accuracy"],
            "sft_wall_s": sft_s, "grpo_wall_s": round(time.perf_counter() - t0, 1), "model": model,
            "eval_curve": [[m["step"], m["eval/accuracy"]] for m in read_metrics(run_dir) if "eval/accuracy" in m],
            "reward_mean_per_step": [round(m["reward/mean"], 4) for m in steps],
            "turns_mean_first_last": [steps[0]["agent/turns_mean"], steps[-1]["agent/turns_mean"]],
            "tool_calls_per_step": [m.get("agent/tool_calls", 0.0) for m in steps],
        }  # fmt: skip
        print(seed, json.dumps(per_seed[seed]), flush=True)
    sft = statistics.mean(r["sft_accuracy"] for r in per_seed.values())
    grpo = statistics.mean(r["grpo_accuracy"] for r in per_seed.values())
    raw = {"model": args.model or "recipes/sft_tiny_tool.yaml per seed (run.seed=seed)", "steps": args.steps,
           "held_out": args.eval, "seeds": per_seed, "overrides": args.extra, "recipe": "recipes/grpo_tiny_tool.yaml", "metric": "held-out success (greedy multi-turn, final answer == a*b+c)"}  # fmt: skip
    raw["gain_points"] = {s: round(100 * (r["grpo_accuracy"] - r["sft_accuracy"]), 2) for s, r in per_seed.items()}
    raw["ratio_note"] = "ratio = mean GRPO success / mean SFT success, the SFT's floored at one held-out row (1/eval)"
    write_result("agentic_demo", "the SFT policy (GRPO's start), same held-out rows", grpo, sft, "held-out success",
                 grpo / max(sft, 1 / args.eval), raw)  # fmt: skip


def train_sft(root: str, out: str, seed: int) -> str:
    """The SFT demo recipe at ``seed``; the path of its HF export."""
    from posttrain.cli import main as cli

    code = cli(["run", os.path.join(root, "recipes/sft_tiny_tool.yaml"), f"run.seed={seed}", f"run.output_dir={out}",
                f"run.name=sft_seed{seed}", "logging.wandb.enabled=false", "logging.progress=false"])  # fmt: skip
    if code != 0:
        sys.exit(f"SFT for seed {seed} failed (exit {code})")
    return os.path.join(out, f"sft_seed{seed}", "hf")


if __name__ == "__main__":
    main()
