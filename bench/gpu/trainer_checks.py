"""The trainer path on one GPU, without vLLM or Ray (bench/gpu_check.sh runs each part).

    python bench/gpu/trainer_checks.py OUT PART [PART ...] [--smoke]

Parts (each writes OUT/gpu_<part>.json when it ends: name, device, date, ok, figures):

- ``fsdp_bf16``: the FSDP2 trainer engine at world size 1 (nccl on GPU) with bf16 mixed precision
  on a small Llama built from config: the first step's loss and grad norm match the fp32 CPU
  reference within bf16 tolerance, and the engine was built through the sharded path (meta
  skeleton, shards filled from the loaded weights);
- ``packing``: per-token logprobs of packed micro-batches (posttrain/engine/packing.py, also with
  shared prefixes) equal the padded path's;
- ``logprob_memory``: the chunked logprob's memory beyond the logits and their gradient stays flat
  as the batch grows (``torch.cuda.max_memory_allocated``), while a plain fp32 log-softmax grows;
- ``offload``: trainer offload (posttrain/rl/offload.py) releases the device bytes it reports
  (``torch.cuda.memory_allocated``), and the step after onload equals a twin's that never offloaded.

``--smoke``: the same code on CPU with gloo and tiny shapes (CI), memory figures reported, not gated.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from posttrain.algorithms.logprobs import token_logprobs  # noqa: E402
from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig  # noqa: E402
from posttrain.models.factory import TinyModelSpec, build_tiny_model  # noqa: E402

SMOKE = "--smoke" in sys.argv
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
# GPU: a small Llama (~40M parameters, vocab 32k); smoke: the factory's tiny default shape.
SPEC = (TinyModelSpec(arch="llama", num_layers=2, vocab_size=128, seed=1) if SMOKE else
        TinyModelSpec(arch="llama", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                      intermediate_size=1536, vocab_size=32000, max_position_embeddings=1024, seed=1))  # fmt: skip
ROWS, T = (4, 16) if SMOKE else (8, 256)


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({os.cpu_count()} cores, smoke)" if SMOKE else f"cpu ({os.cpu_count()} cores)"


def _batch(rows: int = ROWS, length: int = T, seed: int = 0, ragged: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SPEC.vocab_size, (rows, length), generator=g)
    attn = torch.ones(rows, length, dtype=torch.long)
    if ragged:  # right-padded rows of different lengths
        for r in range(rows):
            attn[r, int(length * (0.4 + 0.6 * (r + 1) / rows)) :] = 0
    return {"input_ids_BT": ids, "attention_mask_BT": attn, "loss_mask_BT": attn.float()}


def _loss(model: torch.nn.Module, b: dict[str, torch.Tensor], count: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Token NLL, normalised by the global token count (the engine's contract)."""
    ids, attn = b["input_ids_BT"], b["attention_mask_BT"]
    lp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
    return -(lp * b["loss_mask_BT"][:, 1:]).sum() / count, {}


def _count(b: dict[str, torch.Tensor]) -> float:
    return float(b["loss_mask_BT"][:, 1:].sum())


class _Group:
    """A one-rank process group for the part (nccl on GPU, gloo in smoke mode), left on exit."""

    def __enter__(self) -> _Group:
        from posttrain.engine.dist import init_rank

        self.store = tempfile.mktemp(prefix="posttrain_gpu_check_")
        init_rank(0, 1, self.store, "nccl" if DEVICE.type == "cuda" else "gloo")
        return self

    def __exit__(self, *exc: Any) -> None:
        from posttrain.engine.dist import leave_group

        leave_group(exc[0] is None)
        if os.path.exists(self.store):
            os.unlink(self.store)


def _engine(mixed_precision: str = "bf16", lr: float = 1e-3) -> TrainEngine:
    torch.manual_seed(0)
    cfg = TrainerConfig(max_steps=10, global_batch_size=ROWS, micro_batch_size=ROWS // 2, mixed_precision=mixed_precision,
                        grad_clip=0.0, optim=OptimConfig(lr=lr))  # fmt: skip
    return TrainEngine(build_tiny_model(SPEC), cfg, DEVICE)


def _micro(b: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    half = ROWS // 2
    return [{k: v[:half] for k, v in b.items()}, {k: v[half:] for k, v in b.items()}]


# --- parts ------------------------------------------------------------------------------------------


def part_fsdp_bf16() -> dict[str, Any]:
    """Loss and grad norm of the first step: FSDP2 + bf16 on the device vs fp32 plain on CPU.

    Tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per op); the loss is a
    mean over ROWS x T tokens, so its error averages out: 1% relative on the loss, 5% on the grad
    norm (a sum of squares of bf16 products, no averaging)."""
    b = _batch()
    want = _cpu_reference(b)
    with _Group():
        engine = _engine(mixed_precision="bf16")
        assert engine.sharded, "bf16 mixed precision takes the FSDP2 path"
        from torch.distributed.tensor import DTensor

        sharded = all(isinstance(p, DTensor) for p in engine.model.parameters())
        got = engine.train_step(_micro(b), _loss, _count)
        got2 = engine.train_step(_micro(_batch(seed=1)), _loss, _count)
    loss_rel = abs(got["loss"] - want["loss"]) / abs(want["loss"])
    norm_rel = abs(got["grad_norm"] - want["grad_norm"]) / want["grad_norm"]
    ok = sharded and loss_rel < 1e-2 and norm_rel < 5e-2 and got2["loss"] == got2["loss"]
    return {"ok": bool(ok), "loss_bf16": got["loss"], "loss_fp32_cpu": want["loss"], "loss_rel_diff": loss_rel,
            "grad_norm_bf16": got["grad_norm"], "grad_norm_fp32_cpu": want["grad_norm"], "grad_norm_rel_diff": norm_rel,
            "params_are_dtensors": sharded, "second_step_loss": got2["loss"], "tolerance": {"loss_rel": 1e-2, "grad_norm_rel": 5e-2},
            "params": sum(p.numel() for p in build_tiny_model(SPEC).parameters())}  # fmt: skip


def _cpu_reference(b: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fp32 first step on CPU without any process group (plain module, same maths)."""
    torch.manual_seed(0)
    model = build_tiny_model(SPEC)
    micro = _micro(b)
    total = sum(_count(mb) for mb in micro)
    loss = 0.0
    for mb in micro:
        part, _ = _loss(model, mb, total)
        part.backward()
        loss += float(part.detach())
    norm = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), float("inf")))
    return {"loss": loss, "grad_norm": norm}


def part_packing() -> dict[str, Any]:
    """Per-token logprobs: packed (alone and with shared prefixes) vs padded, fp32 on the device.
    Tolerance 1e-4 nats: the same fp32 maths, different attention kernels' summation order."""
    from posttrain.engine import packing

    model = build_tiny_model(SPEC).to(DEVICE).eval()
    b = _batch(ragged=True, seed=3)
    ids, attn = b["input_ids_BT"], b["attention_mask_BT"]
    ids[1::2, : T // 4] = ids[0, : T // 4]  # half the rows share a prefix with row 0
    fn = lambda out, nxt: token_logprobs(out, nxt)  # noqa: E731
    out: dict[str, Any] = {}
    with torch.no_grad():
        padded = {"input_ids_BT": ids.to(DEVICE), "attention_mask_BT": attn.to(DEVICE)}
        want = packing.next_token(fn, packing.forward(model, padded).logits, padded) * attn.to(DEVICE)
        for name, shared in (("packed", 0), ("packed_shared_prefix", 4)):
            mb = {**padded, **packing.pack(ids.to(DEVICE), attn.to(DEVICE), min_shared=shared)}
            got = packing.next_token(fn, packing.forward(model, mb).logits, mb) * attn.to(DEVICE)
            out[f"{name}_max_abs_diff"] = float((got - want).abs().max())
            out[f"{name}_tokens"] = int(mb["packed_ids_1N"].shape[1])
    out["padded_tokens"] = int(ids.numel())
    out["tolerance"] = 1e-4
    out["ok"] = all(out[f"{n}_max_abs_diff"] < 1e-4 for n in ("packed", "packed_shared_prefix"))
    out["shared_prefix_saved_tokens"] = out["packed_tokens"] - out["packed_shared_prefix_tokens"]
    return out


def _peak_extra(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: int, length: int, vocab: int) -> int:
    """Peak device bytes of fn's forward + backward beyond the logits and their gradient."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(rows, length, vocab, generator=g).to(DEVICE, torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, length), generator=g).to(DEVICE)
    base = logits.numel() * logits.element_size()
    if DEVICE.type != "cuda":
        fn(logits, labels).sum().backward()
        return -1  # not measured on CPU
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(logits, labels).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start - base  # minus the logits' gradient


def part_logprob_memory() -> dict[str, Any]:
    """The chunked logprob's temporaries are chunk x V floats whatever the batch: flat. A plain
    fp32 log_softmax keeps B x T x V floats: grows with the batch."""
    vocab, length = (256, 32) if SMOKE else (32000, 512)
    chunked = lambda x, y: token_logprobs(x, y, chunk_tokens=256)  # noqa: E731
    plain = lambda x, y: torch.log_softmax(x.float(), -1).gather(-1, y[..., None])[..., 0]  # noqa: E731
    sizes = (1, 4, 16)
    got = {f"chunked_extra_bytes_B{b}": _peak_extra(chunked, b, length, vocab) for b in sizes}
    got.update({f"plain_extra_bytes_B{b}": _peak_extra(plain, b, length, vocab) for b in sizes})
    got.update(vocab=vocab, length=length, chunk_tokens=256)
    if DEVICE.type != "cuda":
        return {"ok": True, "measured": False, **got}
    flat = got["chunked_extra_bytes_B16"] <= 1.25 * got["chunked_extra_bytes_B1"] + (1 << 20)
    grows = got["plain_extra_bytes_B16"] > 8 * max(got["plain_extra_bytes_B1"], 1)
    # the bound: a few fp32 blocks of chunk x V, plus the fp32 outputs
    bound = 4 * 256 * vocab * 4 + 16 * length * 8
    return {"ok": bool(flat and grows and got["chunked_extra_bytes_B16"] <= bound), "measured": True,
            "chunked_bound_bytes": bound, **got}  # fmt: skip


def part_offload() -> dict[str, Any]:
    """Offload after a step releases what it reports; the step after onload equals a twin's."""
    from posttrain.rl.offload import offload, onload

    b1, b2 = _batch(seed=4), _batch(seed=5)
    with _Group():
        twin = _engine()
        engine = _engine()
        for e in (twin, engine):
            e.train_step(_micro(b1), _loss, _count)  # AdamW's state exists from here
        out = offload([engine])
        back = onload([engine], DEVICE)
        m_twin = twin.train_step(_micro(b2), _loss, _count)
        m = engine.train_step(_micro(b2), _loss, _count)
        # 1e-6: an offload that lost or corrupted any state moves a weight by ~lr (1e-3)
        same = all(torch.allclose(p.full_tensor(), q.full_tensor(), rtol=0, atol=1e-6)
                   for p, q in zip(engine.model.parameters(), twin.model.parameters(), strict=True))  # fmt: skip
        step_devices = sorted({str(v.device) for s in engine.optimizer.state.values() for k, v in s.items() if k == "step"})
    held, released = out["trainer/offload_bytes"], out["trainer/offload_released_bytes"]
    if DEVICE.type == "cuda":
        released_ok = 0.95 * held <= released <= 1.05 * held + (1 << 20)
    else:  # host and device are the same memory: nothing moves, nothing is released (documented)
        released_ok = released == 0
    loss_same = abs(m["loss"] - m_twin["loss"]) <= 1e-6 * abs(m_twin["loss"])
    return {"ok": bool(released_ok and same and loss_same), "held_bytes": held, "released_bytes": released,
            "onload_taken_bytes": -back["trainer/onload_released_bytes"], "offload_seconds": out["trainer/offload_seconds"],
            "onload_seconds": back["trainer/onload_seconds"], "step_after_onload_equals_twin": same,
            "optimizer_step_tensor_devices": step_devices}  # fmt: skip


PARTS: dict[str, Callable[[], dict[str, Any]]] = {
    "fsdp_bf16": part_fsdp_bf16,
    "packing": part_packing,
    "logprob_memory": part_logprob_memory,
    "offload": part_offload,
}


def run_part(name: str, out_dir: str) -> bool:
    t0 = time.perf_counter()
    record: dict[str, Any] = {"name": name, "device": device_name(), "smoke": SMOKE,
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    try:
        record.update(PARTS[name]())
    except Exception as exc:  # a crash is this part's failure, reported in its JSON
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    record["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(out_dir, f"gpu_{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"{name}: {'ok' if record['ok'] else 'FAILED'} ({record['seconds']} s)", flush=True)
    return bool(record["ok"])


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--smoke"]
    if len(args) < 2 or any(p not in PARTS for p in args[1:]):
        print(f"usage: trainer_checks.py OUT PART [PART ...] [--smoke]; parts: {' '.join(PARTS)}", file=sys.stderr)
        return 2
    os.makedirs(args[0], exist_ok=True)
    if DEVICE.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    results = [run_part(p, args[0]) for p in args[1:]]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
