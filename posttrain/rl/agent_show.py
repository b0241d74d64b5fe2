"""``posttrain rollouts show RUN_DIR``: a run's multi-turn trajectories, turns and loss masks coloured.

Reads ``<run_dir>/trajectories.jsonl`` (written by :class:`~posttrain.rl.agent_scoring.TrajectoryScorer`):
policy turns (loss mask 1, trained) in green with their policy version, observation turns (mask 0,
never trained) in dim blue, the reward parts each turn earned, and the sample's reward.
"""

from __future__ import annotations

import json
import os
from typing import Any

from posttrain.config.errors import DataError

FILE = "trajectories.jsonl"


def read_trajectories(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{path} does not exist: no multi-turn trajectories were recorded in {run_dir!r}.\n  fix: pass the run "
            "directory of a recipe with rollout.agent.env (e.g. runs/grpo_tiny_tool), with rollout.agent.trajectories_file set"
        )
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def render(rows: list[dict[str, Any]], limit: int, version: int | None, color: bool) -> str:
    """The last ``limit`` trajectories (of policy ``version`` if given) as text, ANSI-coloured if ``color``."""
    from rich.console import Console
    from rich.text import Text

    if version is not None:
        rows = [r for r in rows if r["version"] == version]
    console = Console(record=True, force_terminal=color, no_color=not color, width=120, file=open(os.devnull, "w"))  # noqa: SIM115
    versions = sorted({r["version"] for r in rows})
    console.print(f"{len(rows)} trajectories, policy versions {versions[:1] + versions[-1:]}; showing {min(limit, len(rows))}")
    console.print(Text("policy tokens (loss mask 1)", style="green") + Text("  ") + Text("observation tokens (mask 0)", style="dim blue"))
    for r in rows[-limit:]:
        head = f"ordinal {r['ordinal']} sample {r['sample']}  version {r['version']}  reward {r['reward']}  finish {r['finish_reason']}"
        console.print(Text(head + (f"  env error: {r['env_error']}" if r["env_error"] else ""), style="bold"))
        mask = r["loss_mask"]
        for turn in r["turns"]:
            start, end, role, rewards = turn[:4]
            text = turn[4] if len(turn) > 4 else f"<{end - start} tokens>"
            ok = all(m == (1 if role == "policy" else 0) for m in mask[start:end])
            label = Text(f"  {role:6} [{start:3},{end:3}) mask {'1' if role == 'policy' else '0'}{'' if ok else ' (MISMATCH)'}  ")
            body = Text(text, style="green" if role == "policy" else "dim blue")
            console.print(label + body + (Text(f"  {rewards}", style="yellow") if rewards else Text("")))
    return console.export_text(styles=color)
