"""The console (#14 part 3): a line per step without a terminal, the rich bar on one, quiet library
logs, the resume line, a clean Ctrl-C, completion samples, ``--version``."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from posttrain.metrics import (
    RELOAD_LOGGER,
    LoggingConfig,
    MetricsLogger,
    WandbConfig,
    log_completion_samples,
    quiet_library_logs,
    step_line,
)

SFT = "recipes/sft_tiny_arith.yaml"
FAST = ["logging.wandb.enabled=false"]


def _cfg(**kw) -> LoggingConfig:
    return LoggingConfig(wandb=WandbConfig(enabled=False), **kw)


def test_step_line_has_step_keys_and_time_split():
    metrics = {"loss": 0.1234567, "reward/mean": 0.5, "lr": float("nan"), "time/generate_s": 1.25,
               "time/train_s": 3.5, "time/step_s": 4.8}
    line = step_line(10, 40, metrics, ["reward/mean", "loss", "lr", "absent"], elapsed_s=60.0)
    assert line.startswith("step 10/40 (25%)")
    assert "reward/mean=0.5 loss=0.1235" in line and "lr=" not in line  # NaN and absent keys left out
    assert "time generate=1.25s train=3.5s" in line and "step=" not in line
    assert "elapsed 1m00s eta 3m00s" in line


def test_without_a_terminal_one_line_every_n_steps(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), _cfg(every_steps=2, progress_keys=["loss"]), 5, {})
    for step in range(6):
        log.log(step, {"loss": 1.0 / (step + 1)})
    log.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["2/5", "4/5", "5/5"]  # every 2nd step and the last, not step 0
    assert all("loss=" in ln for ln in lines)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6  # the file still has every step


def test_on_a_terminal_the_rich_bar(tmp_path, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Tty())
    log = MetricsLogger(str(tmp_path), _cfg(), 3, {})
    assert log._progress is not None and not log._lines
    log.close()


def test_progress_false_prints_nothing(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), _cfg(progress=False), 2, {})
    log.log(1, {"loss": 1.0})
    log.close()
    assert capsys.readouterr().out == ""


def test_completion_samples_keep_text(tmp_path):
    samples = [{"prompt": f"{i}+1=", "completion": str(i + 1), "reward": float(i % 2), "version": 3} for i in range(16)]

    class FakeRun:
        logged: list = []

        def log(self, data, step):
            self.logged.append((step, data))

    run = FakeRun()
    kept = log_completion_samples(str(tmp_path), 7, samples, 4, seed=1, wandb_run=run)
    rows = [json.loads(ln) for ln in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert rows == kept and len(rows) == 4 and all(r["step"] == 7 and r["completion"] for r in rows)
    assert len({r["prompt"] for r in rows}) == 4
    again = log_completion_samples(str(tmp_path / ".."), 7, samples, 4, seed=1)  # same (seed, step): same choice
    assert [r["prompt"] for r in again] == [r["prompt"] for r in kept]
    other = log_completion_samples(str(tmp_path / ".."), 8, samples, 4, seed=1)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in kept]
    (step, data), = run.logged
    table = data["completions"]
    assert step == 7 and table.columns[:4] == ["step", "prompt", "completion", "reward"] and len(table.data) == 4
    assert log_completion_samples(str(tmp_path), 9, samples, 0) == []


def test_metrics_logger_log_samples_uses_its_config(tmp_path):
    log = MetricsLogger(str(tmp_path), _cfg(progress=False, samples_per_step=2), 2, {})
    kept = log.log_samples(1, [{"prompt": "p", "completion": c, "reward": 0.0} for c in "abc"])
    log.close()
    assert len(kept) == 2 and (tmp_path / "completions.jsonl").exists()


def test_library_logs_quiet_by_default_and_back_with_verbose(monkeypatch):
    for var in ("VLLM_LOGGING_LEVEL", "RAY_LOGGER_LEVEL", "TRANSFORMERS_VERBOSITY", "POSTTRAIN_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    quiet_library_logs(False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING" and os.environ["RAY_LOGGER_LEVEL"] == "warning"
    assert not logging.getLogger("vllm.engine").isEnabledFor(logging.INFO)
    assert not logging.getLogger("ray").isEnabledFor(logging.INFO)
    quiet_library_logs(True)
    assert "VLLM_LOGGING_LEVEL" not in os.environ and logging.getLogger("vllm").isEnabledFor(logging.INFO)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own setting is kept
    quiet_library_logs(False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    quiet_library_logs(False)


def test_rotary_reload_warning_is_dropped(caplog):
    quiet_library_logs(False)
    reload_log = logging.getLogger(RELOAD_LOGGER)
    with caplog.at_level(logging.WARNING, logger=RELOAD_LOGGER):
        reload_log.warning("%s: Failed to load weights", "RotaryEmbedding")
        reload_log.warning("%s: Failed to load weights", "Llama3RotaryEmbedding")
        reload_log.warning("%s: Failed to load weights", "QKVParallelLinear")  # a real failure still shows
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]


def test_version(capsys):
    from posttrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("posttrain 0.")


@pytest.fixture
def in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_ctrl_c_stops_with_one_line_that_says_how_to_resume(in_repo, run_cli, tmp_path, monkeypatch):
    def runner_for(cfg):
        def interrupted(*args):
            raise KeyboardInterrupt

        return interrupted

    monkeypatch.setattr("posttrain.cli._runner_for", runner_for)
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=x", "trainer.max_steps=7", *FAST)
    assert code == 130 and "Traceback" not in err
    assert "interrupted" in err
    assert f"posttrain run {SFT} run.output_dir={tmp_path} trainer.max_steps=7 {FAST[0]} run.name=x checkpoint.resume=auto" in err


def test_resume_line_names_step_and_checkpoint(in_repo, run_cli, tmp_path, monkeypatch):
    ckpts = tmp_path / "x" / "checkpoints"
    (ckpts / "step_000010").mkdir(parents=True)
    (ckpts / "step_000020").mkdir()
    (ckpts / "latest").write_text("step_000010")  # step_000020 was never finished
    monkeypatch.setattr("posttrain.cli._runner_for", lambda cfg: lambda *a: {})
    code, out, _ = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=x", "checkpoint.resume=auto", *FAST)
    assert code == 0 and f"resuming from step 10 (checkpoint {ckpts / 'step_000010'})" in out
    code, out, _ = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=y", "checkpoint.resume=auto", *FAST)
    assert code == 0 and "no checkpoint" in out and "starting from step 0" in out


def test_sft_run_in_a_log_file_prints_a_line_per_step(in_repo, run_cli, tmp_path):
    """What `nohup posttrain run ... > log` shows: plain lines, no progress-bar control codes."""
    code, out, err = run_cli(
        "run", SFT, f"run.output_dir={tmp_path}", "trainer.max_steps=4", "logging.every_steps=2", "checkpoint.every_steps=0",
        "checkpoint.export_hf=false", "data.train.num_examples=256", "data.eval.num_examples=8", "eval.every_steps=0",
        "model.factory.hidden_size=32", "model.factory.num_layers=1", "model.factory.intermediate_size=64", *FAST,
    )
    assert code == 0, err
    steps = [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")]
    assert steps == ["2/4", "4/4"] and "\x1b[" not in out
    assert "time " in out or "loss=" in out
