"""Checkpoint save / load time and size: posttrain's atomic, verified checkpoints vs plain torch.save.

    python bench/checkpoint.py [--repeats 3]

Models: the SFT demo model (recipes/sft_tiny_arith.yaml) and a ~25M-parameter llama factory model,
each after one AdamW step (so the optimizer state is real). The same state goes through:

- posttrain: ``save_checkpoint`` (DCP shards + per-rank extra state to ``step_N.tmp``, fsync,
  sha256 manifest, rename, ``latest``) and ``find_checkpoint("auto")`` (manifest check) +
  ``load_checkpoint`` (DCP load into the engine, scheduler, RNG);
- baseline: ``torch.save`` of the engine's model + optimizer state dict to one file, and
  ``torch.load(weights_only=True)`` + ``engine.load_state_dict`` of it.

Headline: the 25M model's save time; ratio = torch.save time / posttrain save time (below 1:
posttrain is slower by the price of durability and verification). Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from posttrain.engine import checkpoint  # noqa: E402
from posttrain.engine.dist import launch  # noqa: E402
from posttrain.engine.manifest import verify_manifest, write_manifest  # noqa: E402
from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig  # noqa: E402
from posttrain.models.factory import TinyModelSpec, build_tiny_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_25M = TinyModelSpec(
    arch="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408
)


def demo_model() -> torch.nn.Module:
    from posttrain.config.loader import load_recipe

    cfg, _ = load_recipe(os.path.join(REPO, "recipes/sft_tiny_arith.yaml"), [])
    return cfg.algorithm.build().load_model(cfg.model)


def _median_s(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _one_step(engine: TrainEngine, vocab: int) -> None:
    ids = torch.randint(0, vocab, (2, 32))
    batch = {"input_ids_BT": ids, "attention_mask_BT": torch.ones_like(ids)}

    def loss_fn(model, b, count):
        logits = model(input_ids=b["input_ids_BT"], attention_mask=b["attention_mask_BT"]).logits
        return logits.float().pow(2).mean(), {}

    engine.train_step([batch], loss_fn, lambda b: 1.0)


def bench_model(name: str, build: Callable[[], torch.nn.Module], repeats: int, work: str) -> dict[str, float]:
    out: dict[str, float] = {}

    def body(rank: int, world: int) -> None:
        torch.manual_seed(0)
        model = build()
        cfg = TrainerConfig(max_steps=10, global_batch_size=2, micro_batch_size=2, optim=OptimConfig(lr=1e-4))
        engine = TrainEngine(model, cfg, torch.device("cpu"))
        _one_step(engine, model.config.vocab_size)
        root = os.path.join(work, name, "checkpoints")
        plain = os.path.join(work, name, "plain.pt")
        step = iter(range(1, 10_000))

        out["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        out["posttrain_save_s"] = _median_s(
            lambda: checkpoint.save_checkpoint(root, next(step), engine, {"sampler": {}}, 2), repeats
        )
        newest = checkpoint.find_checkpoint("auto", root)
        out["posttrain_bytes"] = _dir_bytes(newest)
        out["manifest_verify_s"] = _median_s(lambda: verify_manifest(newest), repeats)
        meta = {"step": 0, "world_size": 1}
        out["manifest_write_s"] = _median_s(
            lambda: write_manifest(newest, meta), repeats
        )  # fsync + sha256 share of a save
        out["posttrain_load_s"] = _median_s(
            lambda: checkpoint.load_checkpoint(checkpoint.find_checkpoint("auto", root), engine), repeats
        )

        out["torch_save_s"] = _median_s(lambda: torch.save(engine.state_dict(), plain), repeats)
        out["torch_bytes"] = os.path.getsize(plain)

        def plain_load() -> None:
            engine.load_state_dict(torch.load(plain, weights_only=True))

        out["torch_load_s"] = _median_s(plain_load, repeats)

    launch(body, 1)
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="posttrain_ckpt_bench_")
    try:
        raw = {
            "sft_tiny_arith_demo": bench_model("demo", demo_model, args.repeats, work),
            "llama_25m": bench_model("llama25m", lambda: build_tiny_model(LLAMA_25M), args.repeats, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw["repeats"] = args.repeats
    raw["storage"] = f"local disk ({work.rsplit('/', 1)[0]})"
    raw["note"] = (
        "posttrain save = DCP shards + extra state + fsync + sha256 manifest + rename; load = manifest check + DCP load + restore"
    )
    big = raw["llama_25m"]
    write_result(
        "checkpoint", "torch.save of the same model+optimizer state dict (no fsync, no checksum)", big["posttrain_save_s"],
        big["torch_save_s"], "s (save, 25M llama + AdamW state)", round(big["torch_save_s"] / big["posttrain_save_s"], 3), raw,
    )  # fmt: skip


if __name__ == "__main__":
    main()
