"""A trainer rank's weights and optimizer state leave the accelerator while colocated rollout
engines generate (``trainer.offload: true`` with ``cluster.placement: colocated``).

    offload:  every model of the rank (policy, reference, critic; FSDP2 shards or plain modules)
              and every optimizer-state tensor -> host memory
    onload:   the same tensors -> the rank's device, before its next verb

Who calls them, and when, is :class:`posttrain.rl.trainers.TrainerGroup` (``offload`` before the
engines wake to generate; any other verb onloads first). On a CPU rank host and device are the
same memory: both calls run, move nothing and report ``released_bytes = 0``. On CUDA the stats
say how much device memory the move freed (``torch.cuda.memory_allocated`` before - after).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

HOST = torch.device("cpu")


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _move_optimizer_state(optimizer: torch.optim.Optimizer | None, device: torch.device) -> int:
    """Moves every tensor of the optimizer's state (AdamW: exp_avg, exp_avg_sq) in place of the
    old one; the bytes of state held (moved or not).

    AdamW's ``step`` stays where AdamW put it: a host scalar unless ``capturable``/``fused`` (then
    on the device already). A host ``step`` moved to the GPU makes every update read it back
    (``.item()`` per parameter group: a sync each), and a ``capturable`` one must not leave the device."""
    total = 0
    if optimizer is None:
        return total
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
                if key != "step" and value.device != device:
                    state[key] = value.to(device, non_blocking=True)
    return total


def _module_bytes(module: torch.nn.Module) -> int:
    local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731 — an FSDP2 shard: this rank's part
    return sum(local(p).numel() * local(p).element_size() for p in module.parameters())


def move(engines: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Move the models and optimizer states of ``engines`` (``TrainEngine``: ``.model``,
    ``.optimizer``) to ``device``; stats: bytes held, bytes of device memory released (negative:
    taken), seconds."""
    engines = list(engines)
    accel = next((e.device for e in engines if e.device.type != "cpu"), HOST)
    before, t0 = _allocated(accel), time.perf_counter()
    held = 0
    with torch.no_grad():
        for e in engines:
            # nn.Module.to keeps the Parameter objects (FSDP2 re-points its shards after _apply),
            # so the optimizer's state, keyed by parameter, stays attached.
            e.model.to(device)
            held += _module_bytes(e.model) + _move_optimizer_state(getattr(e, "optimizer", None), device)
    if accel.type == "cuda":
        torch.cuda.synchronize(accel)
        if device.type == "cpu":
            torch.cuda.empty_cache()
    return {"bytes": float(held), "released_bytes": float(before - _allocated(accel)), "seconds": time.perf_counter() - t0}


def offload(engines: Iterable[Any]) -> dict[str, float]:
    """Everything to host memory (``trainer/offload_*`` stats)."""
    return {f"trainer/offload_{k}": v for k, v in move(engines, HOST).items()}


def onload(engines: Iterable[Any], device: torch.device) -> dict[str, float]:
    """Everything back to the rank's device (``trainer/onload_*`` stats)."""
    return {f"trainer/onload_{k}": v for k, v in move(engines, device).items()}
