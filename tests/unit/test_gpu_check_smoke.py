"""bench/gpu_check.sh --smoke: the device script's parts run on CPU (gloo, tiny shapes) and write
their records; a part that cannot run makes the script fail with a record saying why."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

TRAINER_PARTS = ("fsdp_bf16", "packing", "logprob_memory", "offload")
ALL_PARTS = (*TRAINER_PARTS, "ipc_roundtrip", "probe_floor", "moe")


def _run(repo_root: str, out, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", str(out)], cwd=repo_root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})  # fmt: skip


def _records(out) -> dict[str, dict]:
    return {p: json.loads((out / f"gpu_{p}.json").read_text()) for p in ALL_PARTS}


@pytest.mark.slow  # three Python processes (trainer parts, IPC round trip, probe floor): ~40 s on 2 cores
def test_smoke_mode_runs_every_part_and_writes_its_record(tmp_path, repo_root):
    proc = _run(repo_root, tmp_path)
    records = _records(tmp_path)
    for name, r in records.items():
        assert {"name", "device", "date", "ok"} <= set(r) and r["name"] == name
    for name in TRAINER_PARTS:
        assert records[name]["ok"] is True, records[name]
    fsdp = records["fsdp_bf16"]
    assert fsdp["params_are_dtensors"] and fsdp["loss_rel_diff"] < 1e-2
    assert records["packing"]["packed_max_abs_diff"] < 1e-4
    assert records["offload"]["step_after_onload_equals_twin"] and records["offload"]["released_bytes"] == 0
    assert records["moe"]["ok"] is None and "smoke" in records["moe"]["skipped"]
    failed = [n for n, r in records.items() if r["ok"] is False]
    assert proc.returncode == (1 if failed else 0), proc.stdout + proc.stderr[-2000:]
    assert not failed, {n: records[n].get("error") for n in failed}


def test_parts_without_time_fail_the_script_with_records(tmp_path, repo_root):
    proc = _run(repo_root, tmp_path, GPU_CHECK_TOTAL_S="5")
    assert proc.returncode == 1, proc.stdout
    records = _records(tmp_path)
    for name in ALL_PARTS[:-1]:  # moe is skipped in smoke mode
        assert records[name]["ok"] is False and records[name]["error"], records[name]
