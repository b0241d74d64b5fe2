"""The README's custom-pipeline snippet runs as written, and the inspection helpers work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from posttrain.rewards import RewardGraph, RewardNode, build_reward_graph
from posttrain.rewards.builtins import exact_answer, format_reward
from posttrain.rewards.inspect import graph_dot, show_graph, try_graph, write_graph_picture

README = Path(__file__).resolve().parents[2] / "rewards" / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_snippet_runs_and_is_short(tmp_path: Path) -> None:
    snippet = _blocks("python")[0]
    assert len(snippet.strip().splitlines()) < 30
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1.6"
    assert "reward = weighted_sum(0.1*fmt, 1*correct, 1*bonus, 0.5*length)" in out.stdout


def test_readme_recipe_builds() -> None:
    cfg = yaml.safe_load(_blocks("yaml")[0])["reward"]
    cfg["nodes"] = [
        n for n in cfg["nodes"] if n["name"] in ("fmt", "correct", "judge")
    ]  # the RM needs a checkpoint
    graph = build_reward_graph(cfg)
    assert graph.order == ["fmt", "correct", "judge"]
    assert "runs if correct pass" in show_graph(cfg)


def test_show_draw_and_try(tmp_path: Path) -> None:
    def crash(sample, correct):  # noqa: ANN001, ANN202
        raise RuntimeError("broken node")

    graph = RewardGraph(
        [
            RewardNode("fmt", format_reward, weight=0.5),
            RewardNode("correct", exact_answer, gate="fmt"),
            RewardNode("crash", crash, deps=["correct"], weight=0),
        ]
    )
    text = show_graph(graph)
    assert "correct" in text and "runs if fmt pass" in text and "inputs: correct" in text
    assert "fmt -> correct [style=dashed" in graph_dot(graph) and "correct -> crash;" in graph_dot(graph)
    png = write_graph_picture(graph, tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "digraph" in write_graph_picture(graph, tmp_path / "g.dot").read_text()
    rows = [
        {"prompt": "37+58?", "completion": "<answer>95</answer>", "answer": "95"},
        {"prompt": "37+58?", "completion": "95", "answer": "95"},
    ]
    out = try_graph(graph, rows)  # every row masked by `crash`: reported, not raised
    assert out[0]["masked"] and out[0]["reward"] is None
    assert out[0]["nodes"]["correct"] == {"value": 1.0, "status": "ok", "error": ""}
    assert out[1]["nodes"]["correct"]["status"] == "gated"
    assert out[0]["nodes"]["crash"]["error"] == "RuntimeError: broken node"
