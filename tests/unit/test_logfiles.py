"""Off a terminal only posttrain's own lines reach the console (#28.8); library records, warnings
and progress bars go to <run_dir>/logs or nowhere."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings

from posttrain.logfiles import route_library_logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN_LINE = re.compile(r"^(run directory: |library logs: |step \d+/\d+|eval/\S+: before|\{\"summary\"|posttrain|\[posttrain\]|INFO posttrain|WARNING posttrain)")


def test_library_records_go_to_the_run_log_and_own_lines_stay(tmp_path, monkeypatch):
    console = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(handler, "stream", console)
    monkeypatch.setattr("posttrain.logfiles._console_handlers", lambda: [handler])
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        undo = route_library_logs(str(tmp_path))  # pytest's stdout is not a terminal
        logging.getLogger("vllm.engine").warning("a library warning")
        logging.getLogger("posttrain.rl.controller").warning("an own warning")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
        undo()
        logging.getLogger("vllm.engine").warning("after undo")
    finally:
        root.removeHandler(handler)
    shown = console.getvalue()
    kept = (tmp_path / "logs" / "libraries.log").read_text()
    assert "an own warning" in shown and "a library warning" not in shown and "a python warning" not in shown
    assert "a library warning" in kept and "a python warning" in kept and "an own warning" not in kept
    assert "after undo" in shown  # undone: the next run in this process starts clean


def test_an_sft_run_under_nohup_prints_only_posttrain_lines(tmp_path):
    """What `nohup posttrain run ... > log 2>&1` holds. Before: tqdm's "Writing model shards" bar
    (export) and library warnings were mixed in."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "TQDM_DISABLE", "NO_COLOR")}
    cmd = [sys.executable, "-m", "posttrain.cli", "run", "recipes/sft_tiny_arith.yaml", f"run.output_dir={tmp_path}",
           "run.name=n", "trainer.max_steps=2", "eval.every_steps=0", "data.train.num_examples=32", "data.eval.num_examples=4",
           "model.factory.hidden_size=32", "model.factory.num_layers=1", "model.factory.intermediate_size=64",
           "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "logging.wandb.enabled=true"]
    with open(tmp_path / "log", "w") as log:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300)
    text = (tmp_path / "log").read_text()
    assert r.returncode == 0, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not OWN_LINE.match(ln)]
    assert not foreign, foreign
    assert "\x1b[" not in text and "\r" not in text and "it/s" not in text
    assert os.path.isfile(tmp_path / "n" / "logs" / "libraries.log")
