"""The MoE benchmark scripts run end to end on CPU (interpreter, tiny shapes): the layer benchmark
and the GPU check's smoke mode, which must produce every step and the benchmark records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_moe_layer_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "bench_moe_layer.py", "--smoke"],
        cwd=REPO / "bench" / "moe", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rel err vs loop") == 2  # balanced and skewed rows, each checked vs the loop


@pytest.mark.slow  # ~100 s on 2 cores: every step of the GPU check, interpreted
def test_gpu_check_smoke_mode(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/moe/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("correctness", "gemm_balanced", "moe_layer", "index_shuffling", "torch_compile"):
        record = json.loads((tmp_path / f"step_{step}.json").read_text())
        assert record.get("rc") == 0, record
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    assert correctness["all_gemm_ok"] and correctness["all_index_exact"]
    compiled = json.loads((tmp_path / "torch_compile.json").read_text())
    assert compiled["fullgraph_eager_backend"] == "ok" and compiled["fullgraph_matches"]
    fields = {"name", "device", "date", "baseline", "value", "baseline_value", "unit", "ratio", "raw"}
    for name in ("moe_grouped_gemm", "moe_layer", "moe_index_shuffling"):
        record = json.loads((tmp_path / "bench_results" / f"{name}.json").read_text())
        assert fields <= record.keys(), name
