"""Trainer tokens/s with sequence packing vs padded micro-batches (issue #17, item 2).

One RL trainer rank (``TrainerWorker.train``: GRPO loss, AdamW step) on a 23.7M-parameter Llama
built from config (hidden 512, 8 layers), fed mini-batches whose response lengths have a long
tail (log-normal, median ~40 tokens, capped at 192): most rows are short, a few are long, so
padded micro-batches are mostly padding. Baseline: today's path, ``micro_batch_size`` rows padded
to the mini-batch's longest row. posttrain: ``trainer.max_tokens_per_micro_batch`` packing.
tokens/s counts real (unpadded) tokens of the mini-batch over the wall time of ``train``.
Rounds interleave the two so machine noise hits both alike.

    .venv/bin/python bench/packing.py [--rounds 3] [--rows 32] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from posttrain.algorithms.advantages import GRPOAdvantage  # noqa: E402
from posttrain.algorithms.policy_loss import GRPOLossConfig  # noqa: E402
from posttrain.engine.trainer import OptimConfig, TrainerConfig  # noqa: E402
from posttrain.models.factory import TinyModelSpec  # noqa: E402
from posttrain.models.loading import ModelConfig  # noqa: E402
from posttrain.rl.config import OnlineRLConfig, SyncConfig  # noqa: E402
from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker  # noqa: E402
from posttrain.types import TrainBatch  # noqa: E402

SPEC = TinyModelSpec(arch="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408)
PROMPT, MAX_NEW = 16, 192


def long_tailed_batch(rows: int, seed: int) -> TrainBatch:
    """Prompt of 16 tokens + a log-normal response length (median 40, sigma 0.7, cap 192)."""
    g = torch.Generator().manual_seed(seed)
    resp = (40 * torch.exp(0.7 * torch.randn(rows, generator=g))).round().clamp(4, MAX_NEW).long()
    lengths = PROMPT + resp
    T = int(lengths.max())
    cols = torch.arange(T)
    attn = (cols[None, :] < lengths[:, None]).long()
    loss_mask = attn.float()
    loss_mask[:, :PROMPT] = 0.0
    return TrainBatch(
        input_ids_BT=torch.randint(5, 100, (rows, T), generator=g) * attn,
        attention_mask_BT=attn,
        loss_mask_BT=loss_mask,
        behaviour_logprobs_BT=-4.8 + torch.randn(rows, T, generator=g),
        advantages_BT=torch.randn(rows, 1, generator=g).expand(rows, T).clone(),
        num_tokens=float(loss_mask.sum()),
        num_seqs=float(rows),
    )


def make_worker(store: str, rows: int, micro: int, max_tokens: int | None, cpus: int) -> TrainerWorker:
    cfg = TrainerConfig(max_steps=1000, global_batch_size=rows, micro_batch_size=micro, optim=OptimConfig(lr=1e-5),
                        max_tokens_per_micro_batch=max_tokens)  # fmt: skip
    algo = OnlineRLConfig(advantage=GRPOAdvantage(), loss=GRPOLossConfig())
    return TrainerWorker(0, TrainerSpec(1, store, ModelConfig(factory=SPEC), cfg, algo, SyncConfig(), cpus=cpus))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="train steps per mode per round")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8, help="padded baseline: rows per micro-batch")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    store = os.path.join(tempfile.mkdtemp(), "store")
    modes = {"padded": make_worker(store, args.rows, args.micro, None, args.cpus),
             "packed": make_worker(store, args.rows, args.micro, args.max_tokens, args.cpus)}  # fmt: skip
    n_params = sum(p.numel() for p in modes["padded"].policy.model.parameters())
    print(f"model {n_params / 1e6:.1f}M params, {args.rows} rows/step, torch threads {torch.get_num_threads()}")
    for w in modes.values():  # warm-up step (allocator, first-call overheads)
        w.train(long_tailed_batch(args.rows, 10_000))

    tps: dict[str, list[float]] = {m: [] for m in modes}
    real = padded_tokens = 0
    for r in range(args.rounds):
        batches = [long_tailed_batch(args.rows, r * 100 + s) for s in range(args.steps)]
        for name, w in (modes.items() if r % 2 == 0 else reversed(modes.items())):
            t0 = time.perf_counter()
            for b in batches:
                w.train(b)
            tps[name].append(sum(int(b.attention_mask_BT.sum()) for b in batches) / (time.perf_counter() - t0))
        real += sum(int(b.attention_mask_BT.sum()) for b in batches)
        padded_tokens += sum(b.input_ids_BT.numel() for b in batches)
        print(f"round {r}: padded {tps['padded'][-1]:8.1f} tok/s | packed {tps['packed'][-1]:8.1f} tok/s | "
              f"ratio {tps['packed'][-1] / tps['padded'][-1]:.2f}")  # fmt: skip

    value, base = statistics.median(tps["packed"]), statistics.median(tps["padded"])
    print(f"median: packed {value:.1f} tok/s vs padded {base:.1f} tok/s -> {value / base:.2f}x "
          f"(real tokens are {real / padded_tokens:.0%} of the padded [B, T])")  # fmt: skip
    if not args.no_write:
        write_result(
            "packing", f"padded micro-batches ({args.micro} rows, padded to the mini-batch's longest row: today's trainer)",
            value, base, "tokens/s", value / base,
            {"packed_tokens_per_s": tps["packed"], "padded_tokens_per_s": tps["padded"], "rounds": args.rounds,
             "steps_per_round": args.steps, "rows_per_step": args.rows, "max_tokens_per_micro_batch": args.max_tokens,
             "real_token_fraction": real / padded_tokens, "lengths": f"prompt {PROMPT} + lognormal(median 40, sigma 0.7) cap {MAX_NEW}",
             "model": {"params_m": n_params / 1e6, **{k: getattr(SPEC, k) for k in ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}},
             "torch_threads": torch.get_num_threads(), "loss": "GRPO (seq_mean_token_mean), AdamW, one RL trainer rank",
             "equality_test": "tests/unit/test_packing.py"},  # fmt: skip
        )


if __name__ == "__main__":
    main()
