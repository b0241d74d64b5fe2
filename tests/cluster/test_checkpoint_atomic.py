"""Checkpoints are atomic and verified: a save killed midway, a corrupted shard and a non-finite step
never cost the run its previous good checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from ckpt_common import tiny_engine

from posttrain.config.errors import PosttrainError
from posttrain.engine import checkpoint
from posttrain.engine.dist import launch
from posttrain.engine.manifest import MANIFEST, verify_manifest, write_manifest
from posttrain.offline.runner import should_save

HERE = os.path.dirname(os.path.abspath(__file__))


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_seen():
    handler = _Warnings()
    checkpoint.logger.addHandler(handler)
    yield handler.messages
    checkpoint.logger.removeHandler(handler)


def _save_steps(root: str, steps: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Save one checkpoint per step, changing the weights in between; returns each step's weights."""
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def body(rank: int, world: int) -> None:
        engine = tiny_engine()
        for s in steps:
            with torch.no_grad():
                for p in engine.model.parameters():
                    p.add_(0.01 * s)
            checkpoint.save_checkpoint(root, s, engine, {"tag": s}, keep_last=5)
            weights[s] = {k: v.clone() for k, v in engine.full_state_dict().items()}

    launch(body, 1)
    return weights


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    out: dict = {}

    def body(rank: int, world: int) -> None:
        engine = tiny_engine(seed=1)
        out["extra"] = checkpoint.load_checkpoint(path, engine)
        out["weights"] = {k: v.clone() for k, v in engine.full_state_dict().items()}

    launch(body, 1)
    return out["weights"], out["extra"]


def test_save_writes_verified_manifest_and_loads_back(tmp_path):
    root = str(tmp_path / "ckpt")
    weights = _save_steps(root, [1, 2])
    path = checkpoint.find_checkpoint("auto", root)
    assert path.endswith("step_000002") and verify_manifest(path) is None
    assert not [d for d in os.listdir(root) if d.endswith(".tmp")]
    loaded, extra = _load(path)
    assert extra["tag"] == 2 and extra["step"] == 2
    for k, v in weights[2].items():
        torch.testing.assert_close(loaded[k], v, atol=0, rtol=0)


def test_corrupted_shard_fails_manifest_and_falls_back(tmp_path, warnings_seen):
    root = str(tmp_path / "ckpt")
    weights = _save_steps(root, [1, 2])
    newest = os.path.join(root, "step_000002")
    shard = next(f for f in sorted(os.listdir(newest)) if f.endswith(".distcp"))
    with open(os.path.join(newest, shard), "r+b") as f:  # flip one byte, same size
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert "sha256" in verify_manifest(newest)
    path = checkpoint.find_checkpoint("auto", root)
    assert path.endswith("step_000001")
    assert any("step_000002" in m and "corrupt" in m for m in warnings_seen)
    loaded, extra = _load(path)
    assert extra["step"] == 1
    torch.testing.assert_close(
        loaded["model.embed_tokens.weight"], weights[1]["model.embed_tokens.weight"], atol=0, rtol=0
    )
    with pytest.raises(
        PosttrainError, match="incomplete or corrupt"
    ):  # an explicit path is never swapped silently
        checkpoint.find_checkpoint(newest, root)


def test_checkpoint_without_manifest_is_skipped(tmp_path, warnings_seen):
    root = str(tmp_path / "ckpt")
    _save_steps(root, [1, 2])
    os.remove(os.path.join(root, "step_000002", MANIFEST))
    assert checkpoint.find_checkpoint("auto", root).endswith("step_000001")
    assert any("no manifest.json" in m for m in warnings_seen)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    child = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_ckpt_child.py"), root], stdout=subprocess.PIPE, text=True
    )
    try:
        lines = []
        for line in child.stdout:  # wait until step 2 is half written
            lines.append(line.strip())
            if line.startswith("SAVING 2"):
                break
        assert lines[-2:] == ["SAVED 1", "SAVING 2"], lines
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    assert os.path.isdir(os.path.join(root, "step_000002.tmp"))  # the kill really landed mid-save
    path = checkpoint.find_checkpoint("auto", root)
    assert path.endswith("step_000001")
    _, extra = _load(path)
    assert extra["step"] == 1


def test_nonfinite_step_is_never_checkpointed():
    assert should_save(3, {"loss": 1.0}, every=3, max_steps=10)
    assert not should_save(3, {"loss": float("nan"), "skipped_nonfinite": 1.0}, every=3, max_steps=10)
    assert not should_save(10, {"skipped_nonfinite": 1.0}, every=0, max_steps=10)
    assert should_save(10, {"loss": 0.5}, every=0, max_steps=10)


def test_ranks_split_the_hashing_and_together_catch_corruption(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    for i in range(4):
        (d / f"f{i}").write_bytes(bytes([i]) * 1000)
    write_manifest(str(d), {"step": 1})
    assert [verify_manifest(str(d), (r, 2)) for r in range(2)] == [None, None]
    (d / "f1").write_bytes(bytes([9]) * 1000)  # same size, other bytes: only a hash finds it
    found = [verify_manifest(str(d), (r, 2)) for r in range(2)]
    assert found[0] is None and "f1 fails its sha256" in found[1]
    (d / "f2").write_bytes(b"short")  # a size mismatch is seen by every part
    assert all("f2 has 5 bytes" in verify_manifest(str(d), (r, 2)) for r in range(2))


def test_auto_resume_refuses_when_no_checkpoint_verifies(tmp_path):
    root = str(tmp_path / "ckpt")
    assert checkpoint.find_checkpoint("auto", root) is None  # nothing saved yet: a fresh start
    _save_steps(root, [1, 2])
    for step in ("step_000001", "step_000002"):
        os.remove(os.path.join(root, step, MANIFEST))
    with pytest.raises(PosttrainError, match="none of the 2 checkpoints .* verifies"):
        checkpoint.find_checkpoint("auto", root)
