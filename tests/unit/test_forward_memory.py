"""The trainer's ``forward`` verb (old / reference logprobs) holds the logits of one micro-batch at
a time: its peak memory stays flat as the batch grows at a fixed micro-batch size, while scoring
the whole batch at once (the contrast, same model, same rows) grows with the batch.

Each measurement runs in a fresh Python process (this file, run as a script) so that no
allocator cache from an earlier measurement hides a later one's growth; it reports the rise of
the process's peak RSS (VmHWM, reset just before the forward) over its RSS at that moment. glibc
runs with a fixed mmap threshold (64 KiB): every large block is its own mapping, returned to the
system when freed, so the figure does not depend on how the heap happened to fragment (with the
default, dynamic threshold the same run varied by +-15 MiB).
The vocabulary (32k) makes the logits dominate: one micro-batch of 4 rows x 64 tokens is 33 MB
of fp32 logits, the whole batch of 32 rows 262 MB. Those two measure the unfused head
(``model.fused_lm_head=false``): they are about micro-batching, which bounds the logits alive.

The fused LM head (``posttrain.engine.head_logprobs``, the default) removes the logits altogether:
the peak of a whole RL train step (forward, policy loss, backward, AdamW) stays flat from a
49,152- to a 151,936-token vocabulary, where the unfused head's grows with V.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from posttrain.engine.memory import PeakRSS, can_measure_peak

VOCAB, T, MICRO = 32_000, 64, 4


def _measure(mode: str, batch: int, store: str) -> dict[str, float]:
    """In this (fresh) process: the peak RSS rise of one forward over ``batch`` rows."""
    torch.set_num_threads(1)
    from posttrain.engine.trainer import TrainerConfig
    from posttrain.models.factory import TinyModelSpec
    from posttrain.models.loading import ModelConfig
    from posttrain.rl.config import OnlineRLConfig, SyncConfig
    from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker

    spec = TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=VOCAB)
    cfg = TrainerConfig(max_steps=1, global_batch_size=MICRO, micro_batch_size=MICRO)
    model_cfg = ModelConfig(factory=spec, fused_lm_head=False)  # the micro-batching of the unfused head's logits
    worker = TrainerWorker(0, TrainerSpec(1, store, model_cfg, cfg, OnlineRLConfig(), SyncConfig(), cpus=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    with PeakRSS() as m:
        out = _forward(mode, worker, ids, mask)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    return {"peak_rise_mib": m.extra_bytes / 2**20, "batch": batch, "mode": mode}


def _forward(mode: str, worker, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from posttrain.algorithms.logprobs import token_logprobs
    from posttrain.types import ForwardBatch

    if mode == "forward_verb":
        return worker.forward(ForwardBatch(ids, mask, want_old=True)).old_logprobs_BT
    # the whole batch's logits at once
    return worker.policy.forward(lambda m: token_logprobs(m(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:]))


def _run(mode: str, batch: int, tmp_path) -> float:
    store = str(tmp_path / f"store_{mode}_{batch}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, mode, str(batch), store], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rise_mib"]


@pytest.mark.skipif(not can_measure_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_forward_verb_memory_is_flat_in_batch_size(tmp_path):
    verb = {b: _run("forward_verb", b, tmp_path) for b in (8, 32, 128)}
    whole = {b: _run("whole_batch", b, tmp_path) for b in (8, 32)}
    logits_mib = lambda b: b * T * VOCAB * 4 / 2**20  # noqa: E731
    report = f"forward verb peak rise (MiB) {verb}; whole batch at once {whole}"
    # the contrast grows with the batch: 24 more rows add at least 3/4 of their 188 MiB of logits
    assert whole[32] - whole[8] > 0.75 * (logits_mib(32) - logits_mib(8)), report
    # micro-batched: 16x the rows, under 25% more memory (plus 4 MiB for the outputs and noise)
    assert verb[128] < 1.25 * verb[8] + 4, report
    assert verb[32] < 1.25 * verb[8] + 4, report
    # and the forward verb does hold one micro-batch's logits, not less (the measure sees them)
    assert verb[8] > 0.5 * logits_mib(MICRO), report


def test_blockwise_forward_logprobs_match_the_training_path():
    from types import SimpleNamespace

    from posttrain.algorithms.logprobs import sampled_token_logprobs
    from posttrain.rl.trainer_worker import TrainerWorker

    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 11, 50, generator=g) * 3, torch.randint(0, 50, (3, 11), generator=g)
    ids[1, 7] = -100  # padding label: 0
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (0.0, 1.0)]:
        rank = SimpleNamespace(temperature=temperature, top_p=top_p)
        train_lp = TrainerWorker._sampled(rank, logits[:, :-1], ids[:, 1:])[0]
        verb_lp = sampled_token_logprobs(logits[:, :-1], ids[:, 1:], temperature, top_p)  # what the forward verb runs
        torch.testing.assert_close(verb_lp, train_lp, rtol=1e-6, atol=1e-6)
        # blocks of 5 positions (2 columns per block for 3 rows) give the same values
        blocked = sampled_token_logprobs(logits[:, :-1], ids[:, 1:], temperature, top_p, chunk_tokens=5)
        torch.testing.assert_close(blocked, train_lp, rtol=1e-6, atol=1e-6)
        assert blocked[1, 6] == 0


# -- a train step's peak is flat in the vocabulary with the fused head ---------------------------

STEP_ROWS, STEP_T, STEP_HIDDEN = 2, 128, 16  # 256 tokens; hidden 16 keeps the V x H weights small
SMALL_V, LARGE_V = 49_152, 151_936  # SmolLM2's vocabulary, Qwen2's


def _measure_step(vocab: int, store: str) -> dict[str, float]:
    """In this (fresh) process: the peak RSS rise of one RL train step at vocabulary ``vocab``,
    fused first, then unfused (same model and optimizer, after one warm-up step: AdamW's state exists)."""
    torch.set_num_threads(1)
    from posttrain.engine.trainer import TrainerConfig
    from posttrain.models.factory import TinyModelSpec
    from posttrain.models.loading import ModelConfig
    from posttrain.rl.config import OnlineRLConfig, SyncConfig
    from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
    from posttrain.types import TrainBatch

    spec = TinyModelSpec(hidden_size=STEP_HIDDEN, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vocab_size=vocab)
    cfg = TrainerConfig(max_steps=4, global_batch_size=STEP_ROWS, micro_batch_size=STEP_ROWS)
    model_cfg = ModelConfig(factory=spec)
    worker = TrainerWorker(0, TrainerSpec(1, store, model_cfg, cfg, OnlineRLConfig(), SyncConfig(), cpus=1, temperature=0.7))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (STEP_ROWS, STEP_T), generator=g)
    ones = torch.ones(STEP_ROWS, STEP_T, dtype=torch.long)
    loss_mask = ones.clone()
    loss_mask[:, :16] = 0  # the prompt
    batch = TrainBatch(ids, ones, loss_mask, torch.full((STEP_ROWS, STEP_T), -3.0), torch.randn(STEP_ROWS, STEP_T, generator=g),
                       num_tokens=float(loss_mask.sum()), num_seqs=float(STEP_ROWS))  # fmt: skip
    out = {}
    worker.train(batch)  # warm-up (fused): AdamW's state
    for fused in (True, False):  # fused first: a cache left by the other could only hide growth
        model_cfg.fused_lm_head = fused
        with PeakRSS() as m:
            metrics = worker.train(batch)
        assert metrics.get("skipped_nonfinite", 0.0) == 0.0, metrics
        out["fused" if fused else "unfused"] = m.extra_bytes / 2**20
    return out


def _run_step(vocab: int, tmp_path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "step", str(vocab), str(tmp_path / f"store_step_{vocab}")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not can_measure_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_fused_head_train_step_memory_is_flat_in_vocabulary(tmp_path):
    small, large = _run_step(SMALL_V, tmp_path), _run_step(LARGE_V, tmp_path)
    logits_mib = lambda v: STEP_ROWS * STEP_T * v * 4 / 2**20  # noqa: E731 (one fp32 [B, T, V])
    grown = logits_mib(LARGE_V) - logits_mib(SMALL_V)  # 100 MiB
    embedding_mib = (LARGE_V - SMALL_V) * STEP_HIDDEN * 4 / 2**20  # 6.3 MiB: one V x H fp32 copy more
    report = f"train-step peak rise (MiB) at V={SMALL_V}: {small}; at V={LARGE_V}: {large}"
    # unfused: the logits (and their gradient) grow with V: at least 3/4 of one [B, T, V] more
    assert large["unfused"] - small["unfused"] > 0.75 * grown, report
    # fused: only parameter-sized memory may grow, the (tied) V x H embedding's gradient and an
    # AdamW temporary: two copies of its growth, plus 4 MiB of noise; no tokens x V term
    assert large["fused"] - small["fused"] < 2 * embedding_mib + 4, report
    # and at 152k the fused step's peak is below the unfused one's by at least one [B, T, V]
    assert large["fused"] < large["unfused"] - logits_mib(LARGE_V), report


if __name__ == "__main__":
    if sys.argv[1] == "step":
        print(json.dumps(_measure_step(int(sys.argv[2]), sys.argv[3])))
    else:
        print(json.dumps(_measure(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
