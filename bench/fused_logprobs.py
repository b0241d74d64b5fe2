"""Peak trainer memory of one RL train step, fused LM head + logprob against the unfused head.

The tiny Llama of ``TinyModelSpec`` (hidden 128, 4 layers, tied embeddings) with its vocabulary
widened to 49,152 (SmolLM2) and 151,936 (Qwen2), one micro-batch of 8 rows x 128 tokens (the
issue's example), temperature 0.7: a real ``TrainerWorker.train`` (forward, GRPO policy loss with
the entropy metric, backward, AdamW). Baseline: ``model.fused_lm_head=false``, the full
``[B, T, V]`` logits then the chunked logprob (posttrain.algorithms.logprobs).

Each (vocabulary, mode) runs in a fresh process with glibc's mmap threshold fixed at 64 KiB (as
tests/unit/test_forward_memory.py), one warm-up step (AdamW's state), then the measured step:
the rise of the peak RSS (VmHWM, reset just before) over the RSS at its start.

    .venv/bin/python bench/fused_logprobs.py        # writes bench/results/fused_logprobs.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROWS, T = 8, 128
VOCABS = (49_152, 151_936)


def measure(vocab: int, fused: bool, store: str) -> dict[str, float]:
    """In this (fresh) process: peak RSS rise (MiB) and wall time of one train step."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from posttrain.engine.memory import PeakRSS
    from posttrain.engine.trainer import TrainerConfig
    from posttrain.models.factory import TinyModelSpec
    from posttrain.models.loading import ModelConfig
    from posttrain.rl.config import OnlineRLConfig, SyncConfig
    from posttrain.rl.trainer_worker import TrainerSpec, TrainerWorker
    from posttrain.types import TrainBatch

    model_cfg = ModelConfig(factory=TinyModelSpec(vocab_size=vocab), fused_lm_head=fused)
    cfg = TrainerConfig(max_steps=4, global_batch_size=ROWS, micro_batch_size=ROWS)
    spec = TrainerSpec(1, store, model_cfg, cfg, OnlineRLConfig(), SyncConfig(), cpus=torch.get_num_threads(), temperature=0.7)
    worker = TrainerWorker(0, spec)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (ROWS, T), generator=g)
    ones = torch.ones(ROWS, T, dtype=torch.long)
    loss_mask = ones.clone()
    loss_mask[:, :32] = 0
    batch = TrainBatch(ids, ones, loss_mask, torch.full((ROWS, T), -3.0), torch.randn(ROWS, T, generator=g),
                       num_tokens=float(loss_mask.sum()), num_seqs=float(ROWS))  # fmt: skip
    worker.train(batch)  # warm-up: AdamW's state
    t0 = time.perf_counter()
    with PeakRSS() as m:
        metrics = worker.train(batch)
    return {"peak_rise_mib": m.extra_bytes / 2**20, "step_s": time.perf_counter() - t0, "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"], "loadavg": os.getloadavg()[0]}  # fmt: skip


def run(vocab: int, fused: bool, tmp: str, fixed_mmap: bool = True) -> dict[str, float]:
    """One measurement in a fresh process. ``fixed_mmap``: glibc's mmap threshold at 64 KiB (a stable
    memory figure); False: glibc's default, which reuses freed blocks (the time figure: with the
    fixed threshold every freed block is unmapped and the next one page-faults afresh, which costs
    the fused head's many block-sized temporaries far more than the unfused head's few large ones)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "2")}
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    store = os.path.join(tmp, f"store_{vocab}_{int(fused)}_{int(fixed_mmap)}")
    proc = subprocess.run([sys.executable, __file__, str(vocab), str(int(fused)), store], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write_result

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            for fused in (True, False):
                runs[f"{'fused' if fused else 'unfused'}_V{vocab}"] = r = run(vocab, fused, tmp)
                r["step_s_default_malloc"] = run(vocab, fused, tmp, fixed_mmap=False)["step_s"]
                print(vocab, "fused" if fused else "unfused", r, flush=True)
    big = VOCABS[-1]
    fused, unfused = runs[f"fused_V{big}"]["peak_rise_mib"], runs[f"unfused_V{big}"]["peak_rise_mib"]
    logits_mib = {v: ROWS * T * v * 4 / 2**20 for v in VOCABS}
    write_result(
        "fused_logprobs",
        "unfused LM head + chunked logprob",
        fused,
        unfused,
        f"MiB peak RSS rise of one RL train step at V={big}",
        unfused / fused,
        {
            "model": "TinyModelSpec Llama (hidden 128, 4 layers, tied embeddings), vocabulary widened, float32",
            "micro_batch": f"{ROWS} rows x {T} tokens, temperature 0.7, GRPO policy loss + entropy metric, AdamW",
            "measure": "VmHWM - VmRSS over the 2nd train step, fresh process each, MALLOC_MMAP_THRESHOLD_=65536; "
            "step_s under that setting, step_s_default_malloc in another fresh process with glibc's default (the time to quote)",
            "threads": int(os.environ.get("BENCH_THREADS", "2")),
            "one_fp32_logits_BTV_mib": logits_mib,
            "fused_growth_49k_to_152k_mib": runs[f"fused_V{big}"]["peak_rise_mib"] - runs[f"fused_V{VOCABS[0]}"]["peak_rise_mib"],
            "unfused_growth_49k_to_152k_mib": unfused - runs[f"unfused_V{VOCABS[0]}"]["peak_rise_mib"],
            "runs": runs,
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(measure(int(sys.argv[1]), bool(int(sys.argv[2])), sys.argv[3])))
    else:
        main()
