"""The bf16 logprob gap floor between two attention implementations on one GPU (torch + transformers).

    python bench/gpu/probe_floor.py OUT          # GPU: a small Llama (~110M) in bf16, sdpa vs eager
    python bench/gpu/probe_floor.py OUT --cpu    # CPU smoke: a tiny Llama, same measurement

``OUT`` is a ``.json`` path, or a directory that gets ``gpu_probe_floor.json`` (bench/gpu_check.sh
passes its output directory). No vLLM, no Ray: the weight-sync probe compares the engine's
logprobs with the trainer's, and with the SAME weights two attention kernels in bf16 already
differ per token. This measures that floor the way posttrain's publisher does at version 0
(``posttrain.weight_sync.measure_floor``: mean and p99 of per-token absolute gaps), on one set of
sequences, then judges a second set against it (``judge_probe``), and reports what the old rule
(max over tokens <= 0.1 nats) would have said. fp32 is measured too, as the reference.

The model is built from config with random weights (initializer_range 0.1 so that logits are not
flat): its floor indicates the size of kernel noise, not a given checkpoint's.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from posttrain.weight_sync import PROBE_TOLERANCE, WeightSyncProbeError, judge_probe, measure_floor  # noqa: E402


@torch.no_grad()
def _logprobs(model, ids_BT: torch.Tensor) -> list[list[float]]:
    """Per-token logprob of token t given tokens < t (t = 1..T-1), fp32 log-softmax, per sequence."""
    logits = model(ids_BT).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    return lp.cpu().tolist()


def _measure(model, impls: tuple[str, str], batches: list[torch.Tensor]) -> list[tuple[list[list[float]], list[list[float]]]]:
    out = []
    for ids in batches:
        sides = []
        for impl in impls:
            model.set_attn_implementation(impl)
            sides.append(_logprobs(model, ids))
        out.append((sides[0], sides[1]))
    return out


def main(argv: list[str]) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = [a for a in argv if not a.startswith("--")]
    cpu = "--cpu" in argv or os.environ.get("GPU_CHECK_SMOKE") == "1" or not torch.cuda.is_available()
    out = args[0] if args else "gpu_probe_floor.json"
    if not out.endswith(".json"):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "gpu_probe_floor.json")
    device = torch.device("cpu" if cpu else "cuda")
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=512) if cpu else dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    seqs, length = (2, 64) if cpu else (4, 512)  # 126 / 2,044 scored tokens per set
    record: dict = {"name": "probe_floor", "device": "cpu" if cpu else torch.cuda.get_device_name(0),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "model": {**dims, "initializer_range": 0.1}, "sequences": seqs, "length": length,
                    "implementations": ["sdpa", "eager"], "ok": False}  # fmt: skip
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = LlamaConfig(**dims, max_position_embeddings=2 * length, initializer_range=0.1)
        model = LlamaForCausalLM(config).to(device).eval()
        g = torch.Generator().manual_seed(1)
        sets = [torch.randint(0, dims["vocab_size"], (seqs, length), generator=g).to(device) for _ in range(2)]
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            (a0, b0), (a1, b1) = _measure(model, ("sdpa", "eager"), sets)
            name = str(dtype).removeprefix("torch.")
            tol = PROBE_TOLERANCE[dtype]
            floor = measure_floor(a0, b0, dtype)  # version 0: the same weights on both sides
            entry = {"floor_mean": floor.mean, "floor_p99": floor.p99, "tolerance": tol}
            try:
                gap = judge_probe(a1, b1, version=1, dtype=dtype, floor=floor)
                entry.update(judged_ok=True, gap_mean=gap.mean, gap_p99=gap.p99, gap_max=gap.max)
            except WeightSyncProbeError as err:
                entry.update(judged_ok=False, error=str(err))
            # what a probe judged on the max over tokens against the tolerance alone would say
            entry["max_rule_would_trip"] = max(abs(x - y) for a, b in zip(a1, b1, strict=True) for x, y in zip(a, b, strict=True)) > tol
            record[name] = entry
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["ok"] = bool(record["float32"]["judged_ok"] and record["bfloat16"]["judged_ok"])
    except Exception as err:  # noqa: BLE001 — reported in the record
        record["error"] = f"{type(err).__name__}: {err}"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
