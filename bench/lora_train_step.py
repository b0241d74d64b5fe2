"""The trainer's share of bench/lora.py without Ray or vLLM: one GRPO-sized optimizer step
(forward + backward + AdamW on 128 rows of 112 tokens, 2 micro-batches of 64, the engine's
``train_step``) on the 23.7M-parameter Llama, LoRA (r 16 on all seven projections) vs full
fine-tuning. Each measurement is a fresh process (its peak RSS is its own), order alternating
(full, lora, lora, full, ...); the first step of each process is a warm-up.

    python bench/lora_train_step.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1408}
ROWS, MICRO, T = 128, 64, 112


def child(lora: bool, steps: int) -> dict:
    import torch

    from posttrain.engine.dist import launch
    from posttrain.engine.trainer import TrainEngine, TrainerConfig
    from posttrain.models.factory import TinyModelSpec, build_tiny_model
    from posttrain.models.lora import LoRAConfig, apply_lora

    out: dict = {}

    def rank(_r: int, _w: int) -> None:
        model = build_tiny_model(TinyModelSpec(**SHAPE))
        if lora:
            apply_lora(model, LoRAConfig(r=16, alpha=32))
        engine = TrainEngine(model, TrainerConfig(global_batch_size=ROWS, micro_batch_size=MICRO, max_steps=steps), torch.device("cpu"))
        ids = torch.randint(4, 100, (ROWS, T), generator=torch.Generator().manual_seed(0))
        micro = [{"ids": ids[i : i + MICRO]} for i in range(0, ROWS, MICRO)]
        loss_fn = lambda m, mb, n: (m(input_ids=mb["ids"], labels=mb["ids"]).loss * mb["ids"].shape[0] / n, {})  # noqa: E731
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.train_step(micro, loss_fn, lambda mb: float(mb["ids"].shape[0]))
            times.append(time.perf_counter() - t0)
        out["step_s"] = times[1:]
        out["trainable_params"] = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)

    launch(rank, 1)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per process (the first is a warm-up)")
    ap.add_argument("--child", choices=["full", "lora"], default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child == "lora", args.steps)), flush=True)
        return
    from common import write_result

    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for r in range(args.rounds):
        for name in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
            load = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            res["loadavg_start"] = load
            runs[name].append(res)
            print(f"[round {r}] {name}: step {statistics.median(res['step_s']):.2f} s, peak rss {res['peak_rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    step = {k: statistics.median(s for run in v for s in run["step_s"]) for k, v in runs.items()}
    rss = {k: statistics.median(run["peak_rss_mb"] for run in v) for k, v in runs.items()}
    raw = {
        "model": f"Llama from config {SHAPE}, vocab 128, float32", "rows": ROWS, "micro_batch": MICRO, "tokens_per_row": T,
        "lora": "r 16, alpha 32, q/k/v/o/gate/up/down", "median_step_s": step, "peak_rss_mb": rss,
        "memory_ratio_full_over_lora": rss["full"] / rss["lora"],
        "trainable_params": {k: v[0]["trainable_params"] for k, v in runs.items()}, "per_run": runs,
        "rounds": args.rounds, "timed_steps_per_run": args.steps - 1,
    }
    write_result("lora_train_step", "full fine-tuning, same engine and batch", step["lora"], step["full"], "s per optimizer step",
                 step["full"] / step["lora"], raw)  # fmt: skip


if __name__ == "__main__":
    main()
