"""Sandbox executions per second vs a bare `python3` subprocess of the same program, side by side.

Both sides run the same number of executions with the same concurrency (one worker per core):
the sandbox through `Sandbox.run` (warm slots, all isolation layers, verdict judged in the
parent), the baseline as `/usr/bin/python3 -c CODE` with no isolation. Writes
bench/results/sandbox_throughput.json; ratio = bare seconds per execution / sandboxed seconds
per execution (below 1: isolation costs time). Needs root and sandboxes/setup.sh.

    python bench/sandbox_throughput.py [--runs 200]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.sandboxes import Sandbox, SandboxConfig, Status

TRIVIAL = "x = sum(range(10))\n"
SOLUTION = "def add(a, b):\n    return a + b\n"
ASSERTS = [f"assert add({i}, {i + 1}) == {2 * i + 1}" for i in range(10)]


def _measure(fn, runs: int, workers: int) -> tuple[float, list[float]]:
    """(total seconds, per-execution latencies) of `runs` calls of fn spread over `workers` threads."""
    latencies: list[float] = []

    def one(_: int) -> None:
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(runs)))
    return time.perf_counter() - t0, latencies


def _bare(code: str) -> None:
    proc = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline program failed: {proc.stderr.decode()}")


def _figures(total: float, lat: list[float], runs: int) -> dict:
    lat = sorted(lat)
    return {
        "total_s": round(total, 4),
        "exec_per_s": round(runs / total, 2),
        "latency_p50_ms": round(1000 * lat[len(lat) // 2], 2),
        "latency_p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox_throughput.json"))
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    programs = {
        "trivial": (TRIVIAL, None, TRIVIAL),
        "ten_asserts": (SOLUTION, ASSERTS, SOLUTION + "\n".join(ASSERTS) + "\n"),
    }
    raw: dict[str, dict] = {}
    with Sandbox(SandboxConfig(slots=workers)) as sb:
        for name, (code, tests, bare_code) in programs.items():
            _bare(bare_code)  # warm page cache for both
            assert sb.run(code, tests=tests).status is Status.PASS

            def sandboxed(code: str = code, tests: list[str] | None = tests) -> None:
                verdict = sb.run(code, tests=tests)
                if verdict.status is not Status.PASS:
                    raise RuntimeError(f"sandboxed run failed: {verdict}")

            s_total, s_lat = _measure(sandboxed, args.runs, workers)
            b_total, b_lat = _measure(lambda c=bare_code: _bare(c), args.runs, workers)
            raw[name] = {
                "sandbox": _figures(s_total, s_lat, args.runs),
                "bare_subprocess": _figures(b_total, b_lat, args.runs),
                "ratio": round(b_total / s_total, 3),
            }
            print(name, json.dumps(raw[name]))
    result = {
        "name": "sandbox_throughput",
        "device": f"cpu {workers} cores",
        "date": datetime.date.today().isoformat(),
        "baseline": "bare `/usr/bin/python3 -c CODE` subprocess, no isolation, same concurrency",
        "metric": "executions per second, program with 10 asserts (headline); trivial program in raw",
        "value": raw["ten_asserts"]["sandbox"]["exec_per_s"],
        "baseline_value": raw["ten_asserts"]["bare_subprocess"]["exec_per_s"],
        "unit": "executions/s",
        "ratio": raw["ten_asserts"]["ratio"],
        "runs_per_program": args.runs,
        "concurrency": workers,
        "raw": raw,
        "note": "ratio = bare seconds / sandboxed seconds for the same runs (< 1: the isolation layers cost time)",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
