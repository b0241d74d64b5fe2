"""SFT training throughput: posttrain's engine (FSDP2, 1 rank, global-count normalisation,
grad clipping, scheduler) vs a plain single-process PyTorch loop over the same model and data,
alternating in one process. ratio = posttrain tokens/s / plain tokens/s.

    python bench/sft_throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402

from posttrain.algorithms.offline_losses import sft_loss
from posttrain.data.formatting import make_sft_example, pad_batch
from posttrain.data.tasks import ArithmeticTask
from posttrain.engine.dist import launch
from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig
from posttrain.models.factory import TinyModelSpec, build_tiny_model
from posttrain.models.tokenizer import build_char_tokenizer
from posttrain.offline.common import sequence_token_logprobs

SPEC = TinyModelSpec(arch="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768)
BATCH = 64


def batches(steps: int) -> list[dict[str, torch.Tensor]]:
    tok = build_char_tokenizer()
    rows = ArithmeticTask(digits=3).generate(BATCH * steps, seed=0)
    ex = [make_sft_example(tok, r, 64) for r in rows]
    return [pad_batch([e.input_ids for e in ex[i : i + BATCH]], [e.loss_mask for e in ex[i : i + BATCH]], 0) for i in range(0, len(ex), BATCH)]


def loss_fn(model, b, count):
    return sft_loss(sequence_token_logprobs(model, b["input_ids_BT"], b["attention_mask_BT"]), b["loss_mask_BT"], count)


def plain_loop(data) -> float:
    torch.manual_seed(0)
    model = build_tiny_model(SPEC)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    for b in data:
        loss, _ = loss_fn(model, b, float(b["loss_mask_BT"].sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _engine_worker(rank, world, data, out):
    torch.manual_seed(0)
    cfg = TrainerConfig(max_steps=len(data), global_batch_size=BATCH, micro_batch_size=BATCH, optim=OptimConfig(lr=1e-3))
    engine = TrainEngine(build_tiny_model(SPEC), cfg, torch.device("cpu"))
    t0 = time.perf_counter()
    for b in data:
        engine.train_step([b], loss_fn, lambda mb: float(mb["loss_mask_BT"].sum()))
    out["s"] = time.perf_counter() - t0


def engine_loop(data) -> float:
    out: dict[str, float] = {}
    launch(_engine_worker, 1, args=(data, out))
    return out["s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    data = batches(args.steps)
    tokens = sum(float(b["attention_mask_BT"].sum()) for b in data)
    plain, ours = [], []
    plain_loop(data[:3])  # warm-up
    for _ in range(args.rounds):  # alternate so drift on a shared machine hits both alike
        plain.append(tokens / plain_loop(data))
        ours.append(tokens / engine_loop(data))
    v, bv = sorted(ours)[len(ours) // 2], sorted(plain)[len(plain) // 2]
    write_result(
        "sft_throughput", "plain single-process PyTorch loop (same model, data, AdamW, grad clip)", v, bv, "tokens/s", v / bv,
        {"posttrain_tokens_per_s": ours, "plain_tokens_per_s": plain, "steps": args.steps, "batch": BATCH, "tokens_per_round": tokens,
         "model": SPEC.__dict__, "threads": torch.get_num_threads()},
    )


if __name__ == "__main__":
    main()
