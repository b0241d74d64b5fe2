"""Reward-DAG overhead per sample against calling the same reward functions in a plain loop.

Workload: arithmetic prompts ("What is a+b?"), n completions each (distinct texts, so the DAG's
cache does not help), scored by format -> (gated) exact answer, length and repetition penalties
(batch built-ins) plus one custom per-sample sync function and one async one. The plain loop calls
the same functions directly and aggregates with the same weighted sum, with no timeouts, gates
checked inline, no error handling and no metrics: the floor any framework adds to.

Writes bench/results/reward_dag_overhead.json; ratio = plain loop time / DAG time.

    python bench/reward_dag_overhead.py [--prompts 64] [--n 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import time
from pathlib import Path

from posttrain.rewards import RewardGraph, RewardNode
from posttrain.rewards.builtins import exact_answer, format_reward, length_penalty, repetition_penalty

from posttrain.types import Completion, Group, PromptRecord, RewardSample

WEIGHTS = {"fmt": 0.1, "correct": 1.0, "length": 0.5, "repeat": 0.2, "digits": 0.1, "polite": 0.1}


def digits_share(sample: RewardSample) -> float:
    """Custom sync per-sample node: fraction of digit characters in the completion."""
    text = sample.completion
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


async def polite(sample: RewardSample) -> float:
    """Custom async per-sample node."""
    return 0.0 if "!" in sample.completion else 1.0


def make_groups(prompts: int, n: int, seed: int = 0) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for p in range(prompts):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        text = f"What is {a}+{b}?"
        record = PromptRecord(ordinal=p, text=text, token_ids=[], fields={"answer": str(a + b)})
        comps = []
        for i in range(n):
            guess = a + b + rng.choice([0, 0, 1, -1])
            body = (
                f"<think>{a} plus {b} step {i}</think><answer>{guess}</answer>"
                if i % 3
                else f"{guess}<|im_end|>"
            )
            comps.append(
                Completion(record, i, [1] * len(body), body, [0.0] * len(body), [0] * len(body), "stop")
            )
        groups.append(Group(record, comps))
    return groups


def build_graph() -> RewardGraph:
    return RewardGraph(
        [
            RewardNode("fmt", format_reward, weight=WEIGHTS["fmt"]),
            RewardNode("correct", exact_answer, gate="fmt", weight=WEIGHTS["correct"]),
            RewardNode(
                "length", length_penalty, kwargs={"max_length": 64, "buffer": 16}, weight=WEIGHTS["length"]
            ),
            RewardNode("repeat", repetition_penalty, weight=WEIGHTS["repeat"]),
            RewardNode("digits", digits_share, weight=WEIGHTS["digits"]),
            RewardNode("polite", polite, weight=WEIGHTS["polite"]),
        ]
    )


async def _gather_polite(samples: list[RewardSample]) -> list[float]:
    return list(await asyncio.gather(*(polite(s) for s in samples)))


def plain_loop(groups: list[Group]) -> list[float]:
    """The same functions called directly: batch built-ins once, per-sample ones in a loop."""
    samples = [RewardSample(g.prompt.text, c.text, g.prompt.fields) for g in groups for c in g.completions]
    fmt = format_reward(samples)
    gated = [s for s, f in zip(samples, fmt, strict=True) if f > 0]
    correct_gated = iter(exact_answer(gated))
    correct = [next(correct_gated) if f > 0 else None for f in fmt]
    length = length_penalty(samples, max_length=64, buffer=16)
    repeat = repetition_penalty(samples)
    digits = [digits_share(s) for s in samples]
    pol = asyncio.run(_gather_polite(samples))
    out = []
    for i in range(len(samples)):
        values = {
            "fmt": fmt[i],
            "correct": correct[i],
            "length": length[i],
            "repeat": repeat[i],
            "digits": digits[i],
            "polite": pol[i],
        }
        out.append(sum(WEIGHTS[k] * v for k, v in values.items() if v is not None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_dag_overhead.json"))
    args = ap.parse_args()
    load_before = round(os.getloadavg()[0], 2)  # the machine is shared: record how busy it was
    groups = make_groups(args.prompts, args.n)
    samples = args.prompts * args.n
    graph = build_graph()

    dag_rewards = [r for sg in graph.score_groups_sync(groups)[0] for r in sg.rewards]  # warm-up + check
    plain_rewards = plain_loop(groups)
    assert all(abs(a - b) < 1e-9 for a, b in zip(dag_rewards, plain_rewards, strict=True)), (
        "DAG and loop disagree"
    )

    plain_s, dag_s = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        plain_loop(groups)
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        graph.score_groups_sync(groups)
        dag_s.append(time.perf_counter() - t)
    plain_us = 1e6 * statistics.median(plain_s) / samples
    dag_us = 1e6 * statistics.median(dag_s) / samples
    result = {
        "name": "reward_dag_overhead",
        "device": "cpu 2 cores",
        "date": datetime.date.today().isoformat(),
        "baseline": "plain Python loop calling the same reward functions (no timeouts, error policy, cache, metrics)",
        "value": round(dag_us, 2),
        "baseline_value": round(plain_us, 2),
        "unit": "us/sample",
        "ratio": round(plain_us / dag_us, 3),
        "ratio_definition": "plain loop time / DAG time (1.0 = no overhead)",
        "overhead_us_per_sample": round(dag_us - plain_us, 2),
        "best_of_repeats_us_per_sample": {
            "dag": round(1e6 * min(dag_s) / samples, 2),
            "plain": round(1e6 * min(plain_s) / samples, 2),
        },
        "raw": {
            "samples": samples,
            "prompts": args.prompts,
            "n": args.n,
            "nodes": list(graph.order),
            "repeats": args.repeats,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "plain_s": [round(x, 5) for x in plain_s],
            "dag_s": [round(x, 5) for x in dag_s],
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
