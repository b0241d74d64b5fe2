"""Recovery after a crash: how long ``checkpoint.resume=auto`` takes to find, verify and load the
newest good checkpoint, when the newest one is intact, half written (killed mid-save) or corrupt.

    python bench/resume_verify.py [--repeats 3]

Model: the ~25M-parameter llama factory model with AdamW state (as in bench/checkpoint.py).
Baseline: ``torch.load(weights_only=True)`` + ``engine.load_state_dict`` of the same state from one
file (no verification, and no way to notice a torn or corrupt file). Headline: the corrupt-newest
case (verify newest, fail, verify previous, load); ratio = baseline time / posttrain time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint as ckpt_bench  # noqa: E402  (bench/checkpoint.py: model spec, timing helpers)
from common import write_result  # noqa: E402

from posttrain.engine import checkpoint  # noqa: E402
from posttrain.engine.dist import launch  # noqa: E402
from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig  # noqa: E402
from posttrain.models.factory import build_tiny_model  # noqa: E402


def _corrupt_one_byte(directory: str) -> None:
    shard = max((os.path.join(directory, f) for f in os.listdir(directory)), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0xFF]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="posttrain_recovery_bench_")
    raw: dict[str, float] = {}

    def body(rank: int, world: int) -> None:
        torch.manual_seed(0)
        model = build_tiny_model(ckpt_bench.LLAMA_25M)
        cfg = TrainerConfig(max_steps=10, global_batch_size=2, micro_batch_size=2, optim=OptimConfig(lr=1e-4))
        engine = TrainEngine(model, cfg, torch.device("cpu"))
        ckpt_bench._one_step(engine, model.config.vocab_size)
        root = os.path.join(work, "checkpoints")
        for step in (1, 2):
            checkpoint.save_checkpoint(root, step, engine, {"sampler": {}}, keep_last=5)

        def resume() -> None:
            checkpoint.load_checkpoint(checkpoint.find_checkpoint("auto", root), engine)

        raw["resume_intact_s"] = ckpt_bench._median_s(resume, args.repeats)
        torn = os.path.join(root, "step_000003.tmp")  # what a kill during a save leaves behind
        shutil.copytree(os.path.join(root, "step_000002"), torn)
        os.remove(os.path.join(torn, "manifest.json"))
        raw["resume_after_killed_save_s"] = ckpt_bench._median_s(resume, args.repeats)
        _corrupt_one_byte(os.path.join(root, "step_000002"))
        assert checkpoint.find_checkpoint("auto", root).endswith("step_000001")
        raw["resume_corrupt_newest_fallback_s"] = ckpt_bench._median_s(resume, args.repeats)

        plain = os.path.join(work, "plain.pt")
        torch.save(engine.state_dict(), plain)
        raw["baseline_torch_load_s"] = ckpt_bench._median_s(
            lambda: engine.load_state_dict(torch.load(plain, weights_only=True)), args.repeats
        )
        raw["checkpoint_bytes"] = ckpt_bench._dir_bytes(os.path.join(root, "step_000001"))

    checkpoint.logger.disabled = True  # the fallback warning would print once per repeat
    try:
        launch(body, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw = {k: round(v, 4) for k, v in raw.items()}
    raw["repeats"] = args.repeats
    write_result(
        "resume_verify", "torch.load + load_state_dict of the same state (no verification)", raw["resume_corrupt_newest_fallback_s"],
        raw["baseline_torch_load_s"], "s (resume, 25M llama + AdamW, newest checkpoint corrupt)",
        round(raw["baseline_torch_load_s"] / raw["resume_corrupt_newest_fallback_s"], 3), raw,
    )  # fmt: skip


if __name__ == "__main__":
    main()
