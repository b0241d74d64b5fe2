"""Timing and result-file helpers shared by the MoE benchmarks (bench/moe/*.py).

On CUDA, times come from ``triton.testing.do_bench`` (median of repeated runs after warm-up,
L2 flushed between runs). ``--smoke`` runs the same code on CPU under the Triton interpreter with
tiny shapes, to check the script end to end; it never writes a result file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1; no result file"
    )
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    return args


def require_cuda_or_exit(smoke: bool) -> torch.device:
    """The CUDA device, or CPU in smoke mode; without either, say GPU numbers are owed and exit 0."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("no CUDA device: GPU numbers are owed (run on an H100/H200; --smoke checks the script on CPU)")
        sys.exit(0)
    return torch.device("cuda")


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def write_result(name: str, device: torch.device, payload: dict[str, object]) -> Path:
    """Write bench/results/<name>.json with the fields every posttrain benchmark carries."""
    path = RESULTS_DIR / f"{name}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        **payload,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
