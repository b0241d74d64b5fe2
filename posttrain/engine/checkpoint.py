"""Sharded checkpoints (torch.distributed.checkpoint) with exact resume, and Hugging Face export.

Layout under ``<run_dir>/checkpoints``::

    step_000010/                    DCP shards of model + optimizer, plus
    step_000010/extra_rank{r}.pt    step, scheduler, sampler position, RNG states (per rank)
    step_000010/manifest.json       sha256 and size of every other file; written last
    latest                          name of the newest complete checkpoint

A save is atomic: files go to ``step_N.tmp``, are fsynced, the manifest is written last, then the
directory is renamed and ``latest`` replaced. A checkpoint without a manifest, or whose files do not
match it, is incomplete or corrupt: ``checkpoint.resume=auto`` skips it with a warning and resumes
from the newest one that verifies. A crash during a save therefore leaves the previous checkpoint
in use.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from posttrain.config.errors import PosttrainError
from posttrain.engine.manifest import file_entries, fsync_dir, verify_manifest, write_manifest
from posttrain.models.factory import check_tokenizer_roundtrip
from posttrain.models.tokenizer import CHAT_TEMPLATE

logger = logging.getLogger(__name__)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: str | None = None  # "auto" (newest in this run dir), a checkpoint path, or null
    export_hf: bool = True  # write <run_dir>/hf (safetensors + config + tokenizer) at the end


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_dicts(mine: dict[str, Any]) -> dict[str, Any]:
    """Union of every rank's dict (collective; a plain copy on one rank)."""
    if _world() == 1:
        return dict(mine)
    parts: list[Any] = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _verify(path: str) -> str | None:
    """Collective manifest check: each rank hashes 1/world of the files; all get the same answer."""
    if _world() == 1:
        return verify_manifest(path)
    problems = _gather_dicts({str(_rank()): verify_manifest(path, (_rank(), _world()))})
    return next((p for _, p in sorted(problems.items(), key=lambda kv: int(kv[0])) if p), None)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, engine, extra: dict[str, Any], keep_last: int) -> str:
    """Collective: every rank calls. Returns the final checkpoint directory.

    Order (each step durable before the next): shards + per-rank extra state into ``step_N.tmp``;
    rank 0 fsyncs them and writes the manifest last; rename to ``step_N``; replace ``latest``.
    """
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    try:
        _write_step(root, step, engine, extra, keep_last, tmp, final)
    except BaseException as exc:  # a Ctrl-C or a failed write: no half-written step_N.tmp stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if as_interrupt(exc) is exc:
            raise
        raise KeyboardInterrupt from exc
    return final


def as_interrupt(exc: BaseException) -> BaseException:
    """``exc``, or a KeyboardInterrupt when ``exc`` is DCP's CheckpointException wrapping one: DCP
    catches BaseException on each rank and re-raises a CheckpointException (itself a
    BaseException), which would turn a Ctrl-C during a save into a traceback and exit 1."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, dcp.api.CheckpointException) and isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
            if isinstance(inner, KeyboardInterrupt):
                return KeyboardInterrupt()
    return exc


def discard_partial(root: str) -> list[str]:
    """Remove ``step_N.tmp`` directories (saves that never finished) under ``root``; returns them.
    Call only when no rank is writing (after a run stopped)."""
    gone = []
    if os.path.isdir(root):
        for d in sorted(os.listdir(root)):
            if d.startswith("step_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                gone.append(d)
    return gone


def _write_step(root: str, step: int, engine, extra: dict[str, Any], keep_last: int, tmp: str, final: str) -> None:
    dcp.save(engine.state_dict(), checkpoint_id=tmp)
    state = {"step": step, "scheduler": engine.scheduler.state_dict(), "rng": rng_state(), **extra}
    torch.save(state, os.path.join(tmp, f"extra_rank{_rank()}.pt"))
    _barrier()
    # Each rank fsyncs and hashes the files it wrote (DCP names them __<rank>_<i>.distcp).
    mine = sorted(
        f for f in os.listdir(tmp) if f.startswith(f"__{_rank()}_") or f == f"extra_rank{_rank()}.pt"
    )
    known = _gather_dicts(file_entries(tmp, mine))
    if _rank() == 0:
        write_manifest(tmp, {"step": step, "world_size": _world()}, known)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        _write_latest(root, os.path.basename(final))
        _prune(root, keep_last)
    _barrier()


def _write_latest(root: str, name: str) -> None:
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    fsync_dir(root)


def _prune(root: str, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints; stale ``.tmp`` directories go too."""
    for d in os.listdir(root):
        if d.startswith("step_") and d.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    done = _step_dirs(root)
    for d in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _step_dirs(root: str) -> list[str]:
    """Names of ``step_N`` directories (not ``.tmp``), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(
        d
        for d in os.listdir(root)
        if d.startswith("step_") and not d.endswith(".tmp") and os.path.isdir(os.path.join(root, d))
    )


def newest_valid_checkpoint(root: str) -> str | None:
    """The newest checkpoint under ``root`` that matches its manifest; each skipped one is warned about.
    None when there is no checkpoint; an error when there are some and none verifies.

    Collective when a process group of several ranks exists (they share the hashing)."""
    names = _step_dirs(root)
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):  # a directory newer than ``latest`` names was never finished
        with open(latest) as f:
            pointed = f.read().strip()
        if pointed in names:
            names = [n for n in names if n <= pointed]
    for name in reversed(names):
        path = os.path.join(root, name)
        problem = _verify(path)
        if problem is None:
            return path
        if _rank() == 0:
            logger.warning(
                "checkpoint %s is incomplete or corrupt (%s); falling back to the previous checkpoint",
                path,
                problem,
            )
    if names:  # starting over would let the new run's saves prune these: make the user decide
        raise PosttrainError(
            f"checkpoint.resume=auto: none of the {len(names)} checkpoints under {root} verifies (see the warnings above).\n"
            "  fix: restore a good copy of one and resume from it (checkpoint.resume=PATH), "
            "or move them away to start the run over"
        )
    return None


def find_checkpoint(resume: str, root: str) -> str | None:
    """Resolve ``checkpoint.resume``: "auto" -> the newest verified checkpoint in ``root`` (None if
    there is none); a path -> that checkpoint, which must verify. Collective like
    ``newest_valid_checkpoint``: every rank calls it and gets the same answer."""
    if resume == "auto":
        return newest_valid_checkpoint(root)
    if not os.path.isdir(resume):
        raise PosttrainError(
            f"checkpoint.resume: '{resume}' is not a checkpoint directory.\n  fix: use 'auto' or a path like runs/X/checkpoints/step_000010"
        )
    problem = _verify(resume)
    if problem is not None:
        raise PosttrainError(
            f"checkpoint.resume: '{resume}' is incomplete or corrupt: {problem}.\n"
            "  fix: point checkpoint.resume at an earlier step_N, or use 'auto' to take the newest checkpoint that verifies"
        )
    return resume


def load_checkpoint(path: str, engine) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler and RNG; return the extra state.

    ``path`` should come from ``find_checkpoint``, which verifies it."""
    state = engine.state_dict()
    try:
        dcp.load(state, checkpoint_id=path)
    except BaseException as exc:
        if as_interrupt(exc) is exc:
            raise
        raise KeyboardInterrupt from exc
    engine.load_state_dict(state)
    extra = torch.load(os.path.join(path, f"extra_rank{_rank()}.pt"), weights_only=True)
    engine.scheduler.load_state_dict(extra["scheduler"])
    engine.step = extra["step"]
    set_rng_state(extra["rng"])
    return extra


def export_hf(out_dir: str, engine, model_config, tokenizer, model_class, base_model: str | None = None) -> None:
    """Collective: gather full weights; rank 0 writes a directory transformers and vLLM load.

    A LoRA model exports its adapter only, in PEFT's format (``posttrain export RUN_DIR --merge``
    writes the merged model); ``base_model`` goes into its adapter_config.json."""
    from posttrain.models.lora import has_lora, lora_config_of, save_adapter

    full = engine.full_state_dict()
    if has_lora(engine.model):
        if _rank() == 0:
            save_adapter(out_dir, full, lora_config_of(engine.model), base_model)
            tokenizer.save_pretrained(out_dir)
        _barrier()
        return
    if _rank() == 0:
        model = model_class(model_config)
        missing, unexpected = model.load_state_dict(full, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied head may be absent
            raise RuntimeError(
                f"export: state dict does not match the model: missing={missing} unexpected={unexpected}"
            )
        model.tie_weights()
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if (
            getattr(tokenizer, "chat_template", "") == CHAT_TEMPLATE
        ):  # the in-code tokenizer must survive the round trip
            check_tokenizer_roundtrip(out_dir)
    _barrier()


def run_has_started(run_dir: str) -> bool:
    """Whether ``run_dir`` holds anything of a run that trained (metrics, a checkpoint, a summary).
    A directory with only ``config.yaml`` (and wandb's files) is what a failed start leaves."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return (
        bool(_step_dirs(os.path.join(run_dir, "checkpoints")))
        or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0)
        or os.path.exists(os.path.join(run_dir, "summary.json"))
    )


def resume_point(resume: str, root: str) -> tuple[str, int] | None:
    """The checkpoint ``checkpoint.resume`` names and its step, read from names only (the run
    verifies it when it loads, falling back to an older one with a warning); None when ``auto``
    finds none. For the start-up line "resuming from step N (checkpoint ...)"."""
    if resume == "auto":
        names = _step_dirs(root)
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                pointed = f.read().strip()
            names = [n for n in names if n <= pointed] or names
        if not names:
            return None
        path = os.path.join(root, names[-1])
    else:
        path = resume
    name = os.path.basename(os.path.normpath(path))
    step = int(name[len("step_"):]) if name.startswith("step_") and name[len("step_"):].isdigit() else -1
    return path, step
