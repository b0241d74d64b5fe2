"""A run's record survives what a user does after the demo (#28 items 4, 5, 8): a failed or foreign
resume leaves ``config.yaml`` as it was, Ctrl-C in a checkpoint write exits 130 with the right
hint and no ``.tmp``, ``export`` checks its input and exports any checkpoint step, ``plot`` on a
run without metrics says so."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

SFT = "recipes/sft_tiny_arith.yaml"
DPO = "recipes/dpo_tiny_arith.yaml"
SMALL = [
    "logging.wandb.enabled=false", "eval.every_steps=0", "data.train.num_examples=64", "data.eval.num_examples=8",
    "model.factory.hidden_size=32", "model.factory.num_layers=1", "model.factory.intermediate_size=64",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=8",
]


@pytest.fixture
def in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """One finished 2-step SFT run with a checkpoint at each step (shared by the module)."""
    import os

    from posttrain.cli import main

    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path_factory.mktemp("runs")
    here = os.getcwd()
    os.chdir(repo_root)
    try:
        code = main(["run", SFT, f"run.output_dir={out}", "run.name=sft", "trainer.max_steps=2",
                     "checkpoint.every_steps=1", "checkpoint.keep_last=2", *SMALL])
    finally:
        os.chdir(here)
    assert code == 0
    return out / "sft"


def _copy(run, tmp_path):
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def test_resuming_with_another_recipe_kind_exits_2_and_keeps_the_record(in_repo, run_cli, sft_run, tmp_path):
    run = _copy(sft_run, tmp_path)
    before = (run / "config.yaml").read_bytes()
    code, _, err = run_cli("run", DPO, f"run.output_dir={tmp_path}", f"run.name={run.name}", "checkpoint.resume=auto",
                           "trainer.max_steps=3", *SMALL)
    assert code == 2 and "Traceback" not in err
    assert "another recipe kind" in err and "DPOConfig" in err and "SFTConfig" in err and "fix:" in err
    assert (run / "config.yaml").read_bytes() == before  # today: overwritten with the DPO config, then trained


def test_resuming_with_another_model_exits_2_and_keeps_the_record(in_repo, run_cli, sft_run, tmp_path):
    run = _copy(sft_run, tmp_path)
    before = (run / "config.yaml").read_bytes()
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", f"run.name={run.name}", "checkpoint.resume=auto",
                           "trainer.max_steps=3", *SMALL, "model.factory.hidden_size=64")
    assert code == 2 and "another model" in err and "model.factory" in err
    assert (run / "config.yaml").read_bytes() == before


def test_a_resume_that_fails_puts_the_previous_record_back(in_repo, run_cli, sft_run, tmp_path, monkeypatch):
    run = _copy(sft_run, tmp_path)
    before = (run / "config.yaml").read_bytes()

    def failing(cfg):
        def fail(*args):
            raise RuntimeError("boom in the runner")

        return fail

    monkeypatch.setattr("posttrain.cli._runner_for", failing)
    with pytest.raises(RuntimeError, match="boom"):  # an unknown error keeps its traceback
        run_cli("run", SFT, f"run.output_dir={tmp_path}", f"run.name={run.name}", "checkpoint.resume=auto",
                "trainer.max_steps=5", *SMALL)
    assert (run / "config.yaml").read_bytes() == before  # the new config (max_steps 5) was rolled back


def _interrupt_in_checkpoint_write(monkeypatch, after_saves: int) -> None:
    """A Ctrl-C that lands inside DCP's file writer on save number ``after_saves + 1``."""
    from torch.distributed.checkpoint import filesystem

    real = filesystem.FileSystemWriter.write_data
    calls = {"n": 0}

    def write_data(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_saves:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", write_data)


def test_ctrl_c_in_the_first_checkpoint_write_says_no_checkpoint_yet(in_repo, run_cli, tmp_path, monkeypatch):
    _interrupt_in_checkpoint_write(monkeypatch, after_saves=0)
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=c", "trainer.max_steps=2",
                           "checkpoint.every_steps=1", "checkpoint.export_hf=false", *SMALL)
    # Today: DCP wraps the KeyboardInterrupt in a CheckpointException (a BaseException): exit 1, traceback.
    assert code == 130 and "Traceback" not in err
    assert "no checkpoint yet" in err and "run.name=c checkpoint.resume=auto" in err
    assert not [p.name for p in (tmp_path / "c" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_in_a_later_checkpoint_write_names_the_step_to_resume(in_repo, run_cli, tmp_path, monkeypatch):
    _interrupt_in_checkpoint_write(monkeypatch, after_saves=1)
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=c", "trainer.max_steps=3",
                           "checkpoint.every_steps=1", "checkpoint.export_hf=false", *SMALL)
    ckpts = tmp_path / "c" / "checkpoints"
    assert code == 130 and "newest checkpoint is step 1" in err and "resume:" in err
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_000001"]


@pytest.mark.parametrize("where", ["missing", "not_a_run"])
def test_export_checks_its_input(run_cli, tmp_path, where):
    target = tmp_path / "nope" if where == "missing" else tmp_path
    code, out, err = run_cli("export", str(target))
    assert code == 4 and "fix:" in err and "holds" not in out  # today: exit 0, "holds a LoRA run's adapter"


def test_export_of_a_full_run_does_not_call_it_lora(run_cli, sft_run):
    code, out, _ = run_cli("export", str(sft_run))
    assert code == 0 and "full model" in out and "LoRA" not in out


def test_export_any_checkpoint_step(run_cli, sft_run, tmp_path):
    code, _, err = run_cli("export", str(sft_run), "--step", "9")
    assert code == 4 and "[1, 2]" in err
    code, _, _ = run_cli("export", str(sft_run), "--step", "2", "--out", str(tmp_path / "s2"))
    assert code == 0
    code, _, _ = run_cli("export", str(sft_run), "--step", "1", "--out", str(tmp_path / "s1"))
    assert code == 0
    final = load_file(str(sft_run / "hf" / "model.safetensors"))
    step2 = load_file(str(tmp_path / "s2" / "model.safetensors"))
    step1 = load_file(str(tmp_path / "s1" / "model.safetensors"))
    assert step2.keys() == final.keys()
    assert all(torch.equal(step2[k], final[k]) for k in final)  # the last checkpoint is the final model
    assert any(not torch.equal(step1[k], final[k]) for k in final)  # and step 1 is another state


def test_plot_without_metrics_says_no_metrics_yet(run_cli, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    code, _, err = run_cli("plot", str(tmp_path))
    assert code == 1 and "no metrics yet" in err  # today: ZeroDivisionError


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path):
    from posttrain.metrics import LoggingConfig, MetricsLogger

    ids = []
    for step in (1, 2):  # the first start, then a resume in the same run directory
        log = MetricsLogger(str(tmp_path), LoggingConfig(), 2, {"x": 1})
        log.log(step, {"loss": 1.0 / step})
        ids.append(log._wandb.id)
        log.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_id").read_text()  # before: a new random id each start


def test_logging_wandb_false_names_the_switch(in_repo, run_cli):
    code, _, err = run_cli("run", SFT, "logging.wandb=false", "--dry-run")
    assert code == 2 and "logging.wandb.enabled=false" in err  # before: "write it as a YAML mapping"
