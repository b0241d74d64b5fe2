"""See and try a reward graph without training: text rendering, a picture, and scoring of hand-written rows.

The CLI wires these in (``posttrain reward show|draw|try recipe.yaml``); each takes the recipe
form (RewardGraphConfig or a mapping) or an already-built RewardGraph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from posttrain.rewards.config import RewardGraphConfig, build_reward_graph
from posttrain.rewards.graph import RewardGraph

from posttrain.types import RewardSample

GraphLike = RewardGraph | RewardGraphConfig | Mapping[str, Any] | DictConfig


def _graph(cfg: GraphLike) -> RewardGraph:
    return cfg if isinstance(cfg, RewardGraph) else build_reward_graph(cfg)


def _fn_name(fn: Any) -> str:
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{target.__module__}.{target.__qualname__}"


def _levels(graph: RewardGraph) -> dict[str, int]:
    """Longest distance from a source node (the column a node is drawn in)."""
    level: dict[str, int] = {}
    for name in graph.order:
        level[name] = 1 + max((level[u] for u in graph.nodes[name].upstream), default=-1)
    return level


def show_graph(cfg: GraphLike) -> str:
    """Text rendering: one line per node (function, mode, inputs, gates, weight, timeout, policy) + the aggregation."""
    graph = _graph(cfg)
    lines = [
        f"reward graph: {len(graph.nodes)} nodes, aggregate={graph.aggregate_name}, "
        f"max_failed_fraction={graph.max_failed_fraction}"
    ]
    width = max(len(n) for n in graph.nodes)
    for name in graph.order:
        node = graph.nodes[name]
        parts = [f"{_fn_name(node.fn)} [{node.mode}{', token-level' if node.token_level else ''}]"]
        if node.deps:
            parts.append(f"inputs: {', '.join(node.deps)}")
        if node.gate:
            parts.append(f"runs if {' and '.join(node.gate)} pass")
        parts.append(f"weight {node.weight:g}" if node.weight else "not aggregated")
        on_error = f"default {node.default:g}" if node.on_error == "default" else node.on_error
        parts.append(f"timeout {node.timeout_s:g}s, on error: {on_error}")
        if node.kwargs:
            parts.append(f"kwargs {node.kwargs}")
        lines.append(f"  {name:<{width}}  " + "; ".join(parts))
    terms = [f"{n.weight:g}*{name}" for name, n in graph.nodes.items() if n.weight and not n.token_level]
    lines.append(f"reward = {graph.aggregate_name}({', '.join(terms)})")
    tokens = [f"{n.weight:g}*{name}" for name, n in graph.nodes.items() if n.weight and n.token_level]
    if tokens:
        lines.append(f"token_rewards = {' + '.join(tokens)}")
    return "\n".join(lines)


def graph_dot(cfg: GraphLike) -> str:
    """Graphviz dot text: solid edges are inputs, dashed edges gates."""
    graph = _graph(cfg)
    out = ["digraph reward {", "  rankdir=LR; node [shape=box];"]
    for name, node in graph.nodes.items():
        out.append(f'  {name} [label="{name}\\nw={node.weight:g}"];')
        out += [f"  {d} -> {name};" for d in node.deps]
        out += [f'  {g} -> {name} [style=dashed, label="gate"];' for g in node.gate]
    out.append(f'  label="reward = {graph.aggregate_name}";')
    return "\n".join([*out, "}"]) + "\n"


def write_graph_picture(cfg: GraphLike, path: str | Path) -> Path:
    """Draw the graph to ``path``: PNG/SVG/PDF via matplotlib, or dot text when the suffix is ``.dot``."""
    graph, path = _graph(cfg), Path(path)
    if path.suffix == ".dot":
        path.write_text(graph_dot(graph))
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = _levels(graph)
    columns: dict[int, list[str]] = {}
    for name in graph.order:
        columns.setdefault(level[name], []).append(name)
    pos = {n: (3.0 * lv, -1.5 * row) for lv, names in columns.items() for row, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(3 + 2.5 * len(columns), 2 + 1.2 * max(len(c) for c in columns.values())))
    for name, node in graph.nodes.items():
        for up in node.upstream:
            (xs, ys), (xt, yt) = pos[up], pos[name]
            ax.annotate(  # from the right edge of the input's box to the left edge of this one
                "",
                xy=(xt - 0.75, yt),
                xytext=(xs + 0.75, ys),
                arrowprops={
                    "arrowstyle": "-|>",
                    "linestyle": "--" if up in node.gate else "-",
                    "color": "#333",
                },
            )
        ax.text(
            *pos[name],
            f"{name}\n{node.mode}, w={node.weight:g}",
            ha="center",
            va="center",
            bbox={"boxstyle": "round", "facecolor": "#dde8f5" if node.weight else "#eeeeee"},
        )
    ax.set_title(f"reward = {graph.aggregate_name}  (dashed: gate, solid: input)")
    xs, ys = zip(*pos.values(), strict=True)
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(fig)
    return path


def try_graph(cfg: GraphLike, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score ``{"prompt", "completion", **fields}`` rows and return a per-node breakdown per row.

    Consecutive rows with the same prompt form one group (what group nodes see). Failures are
    reported per node rather than raised (the step's max_failed_fraction is not applied here).
    Each result: ``{"prompt", "completion", "reward", "masked", "nodes": {name: {"value",
    "status", "error"}}}``.
    """
    graph = _graph(cfg)
    samples, sizes = [], []
    for i, row in enumerate(rows):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"row {i} needs 'prompt' and 'completion' keys, got {sorted(row)}")
        fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        samples.append(
            RewardSample(prompt=str(row["prompt"]), completion=str(row["completion"]), fields=fields)
        )
        if sizes and rows[i - 1]["prompt"] == row["prompt"]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    limit, graph.max_failed_fraction = graph.max_failed_fraction, 1.0
    try:
        report = graph.run_sync(graph.score_samples(samples, sizes))
    finally:
        graph.max_failed_fraction = limit
    return [
        {
            "prompt": s.prompt,
            "completion": s.completion,
            "reward": report.rewards[i],
            "masked": report.masked[i],
            "nodes": {
                name: {"value": c.value, "status": c.status, "error": c.error}
                for name in graph.order
                for c in [report.cells[name][i]]
            },
        }
        for i, s in enumerate(samples)
    ]
