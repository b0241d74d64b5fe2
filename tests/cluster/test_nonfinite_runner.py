"""The offline runner never checkpoints a skipped non-finite step, and stops a diverged run with a
clear error instead of looping on fresh batches forever. A real SFT run (1 rank, in-process) whose
loss is made NaN on chosen optimizer calls; the engine's own non-finite check does the skipping."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.engine.trainer import TrainEngine
from posttrain.metrics import read_metrics
from posttrain.offline import runner


def _overrides(tmp, name: str) -> list[str]:
    return [
        "model.factory.hidden_size=32", "model.factory.num_layers=1", "model.factory.num_heads=2", "model.factory.num_kv_heads=1",
        "model.factory.intermediate_size=64", "data.train.num_examples=64", "data.eval.num_examples=4", "trainer.max_steps=3",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "eval.every_steps=0", "checkpoint.every_steps=1",
        "checkpoint.keep_last=5", "checkpoint.export_hf=false", f"run.output_dir={tmp}", f"run.name={name}",
        "logging.wandb.enabled=false", "logging.progress=false",
    ]  # fmt: skip


def _poison(monkeypatch, nan_calls: set[int] | None) -> list[int]:
    """Make train_step calls in ``nan_calls`` (1-based; None: all after the first) see a NaN loss;
    record the steps the runner saves."""
    real_step, saved, calls = TrainEngine.train_step, [], [0]

    def train_step(self, micro, loss_fn, count_fn):
        calls[0] += 1
        if (nan_calls is None and calls[0] > 1) or (nan_calls and calls[0] in nan_calls):

            def nan_loss(model, mb, count):  # noqa: E306
                loss, m = loss_fn(model, mb, count)
                return loss * float("nan"), m

            return real_step(self, micro, nan_loss, count_fn)
        return real_step(self, micro, loss_fn, count_fn)

    real_save = runner.save_checkpoint
    monkeypatch.setattr(TrainEngine, "train_step", train_step)
    monkeypatch.setattr(
        runner, "save_checkpoint", lambda root, step, *a: (saved.append(step), real_save(root, step, *a))[1]
    )
    return saved


def _run(tmp_path, repo_root, name):
    cfg, resolved = load_recipe(
        os.path.join(repo_root, "recipes/sft_tiny_arith.yaml"), _overrides(tmp_path, name)
    )
    run_dir = os.path.join(tmp_path, name)
    os.makedirs(run_dir, exist_ok=True)
    runner.run_offline(cfg, resolved, run_dir)
    return run_dir


def test_skipped_nonfinite_steps_are_not_checkpointed(tmp_path, repo_root, monkeypatch):
    saved = _poison(monkeypatch, {2, 3})  # calls 2 and 3 are skipped: step 1 is not re-saved after them
    run_dir = _run(tmp_path, repo_root, "skip")
    assert saved == [1, 2, 3]
    skipped = [m for m in read_metrics(run_dir) if m.get("skipped_nonfinite")]
    assert len(skipped) == 2 and all(m["step"] == 1 for m in skipped)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "latest",
        "step_000001",
        "step_000002",
        "step_000003",
    ]


def test_a_diverged_run_stops_with_a_clear_error(tmp_path, repo_root, monkeypatch):
    saved = _poison(monkeypatch, None)
    with pytest.raises(
        runner.DivergedError, match="10 steps in a row had a non-finite loss.*\n  fix: lower trainer.optim.lr"
    ):
        _run(tmp_path, repo_root, "diverged")
    assert saved == [1]
