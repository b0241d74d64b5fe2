"""Sandbox executions/s and p50 latency: the new judge vs the previous one vs a bare `python3`.

Honest programs only, same number of executions, same concurrency (one worker per core):
* new: `posttrain.sandboxes.Sandbox.run` (candidate and tests in separate processes, plain-data
  channel, leased uids, per-slot CPU quota, streamed results);
* previous: the sandboxes/ package at git revision --baseline-rev (default: the judge before
  issue 25's hardening), extracted with `git archive` and imported under another name;
* bare: `/usr/bin/python3 -c CODE`, no isolation, no judging.
The three are measured in interleaved rounds so that load drift on a shared host hits all alike.
Writes bench/results/sandbox_throughput.json; ratio = new exec/s / previous exec/s (>1: new is
faster). Needs root and sandboxes/setup.sh.

    python bench/sandbox_throughput.py [--runs 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from posttrain.sandboxes import Sandbox, SandboxConfig, Status

REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "af71805"  # the judge before issue 25 (issue 13's was e0cb19b)
TRIVIAL = "x = sum(range(10))\n"
SOLUTION = "def add(a, b):\n    return a + b\n"
ASSERTS = [f"assert add({i}, {i + 1}) == {2 * i + 1}" for i in range(10)]
CHECK = [
    "def check(candidate):\n"
    + "".join(f"    assert candidate({i}, 1) == {i + 1}\n" for i in range(10))
    + "check(add)"
]


def _baseline_package(rev: str, into: str):
    """Import sandboxes/ at `rev` as the package `baseline_sandboxes`."""
    pkg = Path(into) / "baseline_sandboxes"
    pkg.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "sandboxes"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(pkg), "--strip-components=1"], input=archive.stdout, check=True)
    sys.path.insert(0, into)
    return importlib.import_module("baseline_sandboxes")


def _bare(code: str) -> None:
    proc = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline program failed: {proc.stderr.decode()}")


def _measure(fn, runs: int, workers: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    def one(_: int) -> None:
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(runs)))
    return time.perf_counter() - t0, latencies


def _figures(total: float, lat: list[float], runs: int) -> dict:
    lat = sorted(lat)
    return {
        "total_s": round(total, 4),
        "exec_per_s": round(runs / total, 2),
        "latency_p50_ms": round(1000 * lat[len(lat) // 2], 2),
        "latency_p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2),
    }


def _runner(sb, pass_status, code: str, tests: list[str] | None):
    def run() -> None:
        verdict = sb.run(code, tests=tests)
        if verdict.status.value != pass_status:
            raise RuntimeError(f"honest run did not pass: {verdict}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="executions per program and judge")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the runs are split into")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox_throughput.json"))
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    programs = {
        "trivial": (TRIVIAL, None),
        "ten_asserts": (SOLUTION, ASSERTS),
        "check_function": (SOLUTION, CHECK),
    }
    per_round = max(1, args.runs // args.rounds)
    load_start = round(os.getloadavg()[0], 2)  # the host is shared: say how loaded it was
    runs = per_round * args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        old = _baseline_package(args.baseline_rev, tmp)
        new_cfg = SandboxConfig(slots=workers)
        # the previous judge knows no uid leases: give it a range far from the leased ones
        old_cfg = old.SandboxConfig(slots=workers, uid_base=64600, cgroup_name="posttrain-bench-previous")
        with Sandbox(new_cfg) as new_sb, old.Sandbox(old_cfg) as old_sb:
            raw: dict[str, dict] = {}
            for name, (code, tests) in programs.items():
                bare_code = code + ("\n".join(tests) + "\n" if tests else "")
                judges = {
                    "new": _runner(new_sb, Status.PASS.value, code, tests),
                    "previous": _runner(old_sb, "PASS", code, tests),
                    "bare_subprocess": lambda c=bare_code: _bare(c),
                }
                for fn in judges.values():
                    fn()  # warm-up
                totals = {k: 0.0 for k in judges}
                lats: dict[str, list[float]] = {k: [] for k in judges}
                for _ in range(args.rounds):
                    for key, fn in judges.items():
                        total, lat = _measure(fn, per_round, workers)
                        totals[key] += total
                        lats[key] += lat
                raw[name] = {k: _figures(totals[k], lats[k], runs) for k in judges}
                raw[name]["ratio_new_vs_previous"] = round(totals["previous"] / totals["new"], 3)
                raw[name]["ratio_new_vs_bare"] = round(totals["bare_subprocess"] / totals["new"], 3)
                print(
                    f"{name:15s} exec/s new {raw[name]['new']['exec_per_s']:7.2f} | previous "
                    f"{raw[name]['previous']['exec_per_s']:7.2f} | bare {raw[name]['bare_subprocess']['exec_per_s']:7.2f}"
                    f"   p50 ms new {raw[name]['new']['latency_p50_ms']:6.1f} | previous "
                    f"{raw[name]['previous']['latency_p50_ms']:6.1f} | bare {raw[name]['bare_subprocess']['latency_p50_ms']:6.1f}"
                    f"   new/previous {raw[name]['ratio_new_vs_previous']:.3f}x"
                )
    head = raw["ten_asserts"]
    result = {
        "name": "sandbox_throughput",
        "device": f"cpu {workers} cores",
        "date": datetime.date.today().isoformat(),
        "baseline": f"the previous judge (sandboxes/ at {args.baseline_rev}), same programs and concurrency",
        "metric": "executions per second, honest program with 10 literal asserts (headline)",
        "value": head["new"]["exec_per_s"],
        "baseline_value": head["previous"]["exec_per_s"],
        "unit": "executions/s",
        "ratio": head["ratio_new_vs_previous"],
        "goal": "ratio >= 0.8",
        "runs_per_program": runs,
        "rounds": args.rounds,
        "concurrency": workers,
        "raw": raw,
        "host_load_avg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "note": "ratio = new exec/s / previous exec/s over the same interleaved rounds (>1: new faster); "
        "ratio_new_vs_bare = new exec/s / bare python3 exec/s. Host load varied during the run "
        "(a shared 2-core machine): compare the columns of one run, not across runs.",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
