"""The MoE benchmark scripts run end to end on CPU (interpreter, tiny shapes): the layer benchmark
and the GPU check's smoke mode, which must produce every step, the benchmark records, and a JSON per
case as soon as the case ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _smoke_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_OUT")}
    return {**env, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable}


def test_bench_moe_layer_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "bench_moe_layer.py", "--smoke"],
        cwd=REPO / "bench" / "moe", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rel err vs loop") == 2  # balanced and skewed rows, each checked vs the loop


@pytest.mark.slow  # every step of the GPU check, interpreted (~2-4 min on 2 busy cores)
def test_gpu_check_smoke_mode(tmp_path: Path) -> None:
    env = {**_smoke_env(), "GPU_CHECK_OUT": str(tmp_path)}  # the output directory through the env var
    proc = subprocess.run(
        ["bash", "bench/moe/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("gemm_balanced", "correctness", "moe_layer", "index_shuffling", "torch_compile", "gemm_rest"):
        record = json.loads((tmp_path / f"step_{step}.json").read_text())
        assert record.get("rc") == 0, record
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["failures"] == []
    correctness = json.loads((tmp_path / "correctness.json").read_text())
    assert correctness["done"] and correctness["ok"]
    assert correctness["all_gemm_ok"] and correctness["all_index_exact"]
    assert correctness["gather_scatter_ok"] and correctness["moe_layer_ok"]
    assert correctness["env"]["autotune_single_config"]  # correctness runs with one config per kernel
    compiled = json.loads((tmp_path / "torch_compile.json").read_text())
    assert compiled["fullgraph_eager_backend"] == "ok" and compiled["fullgraph_matches"]
    cases = sorted(p.name for p in (tmp_path / "cases").glob("*.json"))
    for prefix in ("gemm_bench_first__", "correctness_gemm__", "correctness_index__", "correctness_layer__",
                   "correctness_gather_scatter__", "moe_layer_bench__", "index_shuffling_bench__"):
        assert any(name.startswith(prefix) for name in cases), (prefix, cases)
    fields = {"name", "device", "date", "baseline", "value", "baseline_value", "unit", "ratio", "raw", "ok"}
    for name in ("moe_grouped_gemm", "moe_layer", "moe_index_shuffling"):
        record = json.loads((tmp_path / "bench_results" / f"{name}.json").read_text())
        assert fields <= record.keys(), name
        assert record["ok"], name


@pytest.mark.slow  # starts the smoke run and kills it after its first case (~1-2 min on 2 busy cores)
def test_gpu_check_killed_after_its_first_case_keeps_that_case(tmp_path: Path) -> None:
    """The GPU check is killed (device lease over, cap hit) right after its first case: the case's
    JSON is already on disk, complete. The output directory is the script's first argument."""
    proc = subprocess.Popen(
        ["bash", "bench/moe/gpu_check.sh", str(tmp_path)], cwd=REPO, env=_smoke_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    cases = tmp_path / "cases"
    deadline = time.monotonic() + 600
    try:
        while not list(cases.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: bash, timeout and the Python step
        proc.wait()
    written = sorted(cases.glob("*.json"))
    assert written, "no case JSON before the kill"
    first = json.loads(written[0].read_text())  # complete JSON: written atomically
    assert first["step"] == "gemm_bench_first" and first["case"] == 1
    assert first["ok"] and first["pt_fwd_rel_err"] < 2e-2 and "pt_fwdbwd_us" in first
    assert not (tmp_path / "summary.json").exists()  # it was killed before the end
