"""The run's records of what was trained: the sample ledger, and rolling records back on resume.

``samples.jsonl`` has one line per sample that enters a step: its prompt ordinal, a digest of its
tokens and its per-token policy versions run-length encoded as ``[[version, count], ...]``. The
staleness bound and exact resume are checked against it, independently of the loops' bookkeeping.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

from posttrain.types import Group, ScoredGroup

LEDGER = "samples.jsonl"
COMPLETIONS = "completions.jsonl"  # a sample of each step's completion texts (MetricsLogger.log_samples)


class Ledger:
    """Appends the samples of each step to ``<run_dir>/samples.jsonl``; hands the scored
    completions (texts, rewards per node) to ``keep_samples`` (which keeps a few per step)."""

    def __init__(self, run_dir: str, keep_samples: Callable[[int, list[dict[str, Any]]], Any] | None = None) -> None:
        self.path = os.path.join(run_dir, LEDGER)
        self.keep_samples = keep_samples

    def scored(self, step: int, scored: list[ScoredGroup]) -> None:
        if self.keep_samples is None:
            return
        rows = []
        for sg in scored:
            for i, c in enumerate(sg.group.completions):
                nodes = {f"reward/{name}": values[i] for name, values in sg.breakdown.items()}
                rows.append({"ordinal": sg.group.prompt.ordinal, "sample": c.sample_index, "prompt": sg.group.prompt.text,
                             "completion": c.text, "reward": sg.rewards[i], "version": c.v_min, **nodes})  # fmt: skip
        self.keep_samples(step, rows)

    def write(self, step: int, groups: list[Group]) -> None:
        with open(self.path, "a") as f:
            for g in groups:
                for c in g.completions:
                    runs = [[v, len(list(same))] for v, same in itertools.groupby(c.versions)]
                    digest = hashlib.sha1(json.dumps(c.token_ids).encode()).hexdigest()[:16]
                    row = {"step": step, "ordinal": g.prompt.ordinal, "sample": c.sample_index, "tokens_sha1": digest, "versions": runs}
                    if c.loss_mask is not None:  # a multi-turn trajectory: its loss mask, run-length encoded
                        row["loss_mask"] = [[m, len(list(same))] for m, same in itertools.groupby(c.loss_mask)]
                    f.write(json.dumps(row) + "\n")


def roll_back_records(run_dir: str, step: int) -> None:
    """Resuming at ``step``: records of later steps (``samples.jsonl``, ``metrics.jsonl``) belong to
    work that was lost with the trainer; they move to ``*.rolledback.jsonl`` (kept for inspection),
    so the run's records read as if it had never been interrupted."""
    for name in (LEDGER, COMPLETIONS, "metrics.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line)["step"] <= step]
        if len(keep) == len(lines):
            continue
        with open(path.replace(".jsonl", ".rolledback.jsonl"), "a") as f:
            f.writelines(line for line in lines if json.loads(line)["step"] > step)
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
