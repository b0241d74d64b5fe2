"""LoRA weight sync, receiver side: adapters arrive, the engine serves ``W_base + B_scaled @ A``.

A LoRA trainer sends only its adapters (``posttrain.models.lora``): for each adapted base weight
``<name>`` the tensors ``<name>:lora_A`` [r, in] and ``<name>:lora_B`` [out, r], ``B`` already
multiplied by alpha / r. Invariants:

- A version is either full (every served parameter, as without LoRA) or adapters only, each
  adapted weight with both halves (:func:`adapter_version`); never a mix.
- The engine keeps the ORIGINAL base weights of the adapted modules (read once from its own
  checkpoint directory, only those tensors) and loads ``W = W_base + B @ A`` on every version, so
  repeated syncs replace the delta instead of accumulating it.
- vLLM fuses projections (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up) and reprocesses a
  fused layer once all its parts are loaded: the parts that are not adapted (and biases) are
  reloaded from the kept base, so a partly adapted fused layer is never left half loaded.
- Adapter tensors of a version are buffered until its last bucket (they are small), then the merged
  weights are loaded in one go.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from posttrain.models.lora import WIRE_A, WIRE_B
from posttrain.weight_sync import WeightSyncError


def is_adapter(name: str) -> bool:
    return name.endswith((WIRE_A, WIRE_B))


def adapter_shape_problem(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...] | None) -> str | None:
    """Why an adapter tensor does not fit the base weight it adapts (None when it fits)."""
    base = name.rsplit(":", 1)[0]
    if base_shape is None or len(base_shape) != 2:
        return f"{name!r} adapts {base!r}, which the engine does not serve as a 2-D weight"
    if len(shape) != 2:
        return f"{name!r} is not a matrix ({list(shape)})"
    if name.endswith(WIRE_A) and shape[1] != base_shape[1]:
        return f"{name!r} has {shape[1]} input features, {base!r} has {base_shape[1]}"
    if name.endswith(WIRE_B) and shape[0] != base_shape[0]:
        return f"{name!r} has {shape[0]} output features, {base!r} has {base_shape[0]}"
    return None


def adapter_version(received: set[str], version: int) -> bool:
    """True when ``received`` is a complete adapters-only version; False when it holds no adapter
    (a full version, checked as usual); raises when it mixes both or an adapter lacks a half."""
    adapters = {n for n in received if is_adapter(n)}
    if not adapters:
        return False
    if adapters != received:
        raise WeightSyncError(
            f"version {version} mixes adapter tensors with full weights ({sorted(received - adapters)[:3]}); "
            "a LoRA trainer sends its adapters only"
        )
    bases = {n.rsplit(":", 1)[0] for n in adapters}
    unpaired = sorted(b for b in bases if f"{b}{WIRE_A}" not in adapters or f"{b}{WIRE_B}" not in adapters)
    if unpaired:
        raise WeightSyncError(f"version {version}: adapters without both halves (lora_A and lora_B) for {unpaired[:3]}")
    return True


class CheckpointBase:
    """The original tensors of a Hugging Face checkpoint directory, read on demand and kept."""

    def __init__(self, model_dir: str, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        self.dtype, self._where, self._kept = dtype, {}, {}
        for file in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
            path = os.path.join(model_dir, file)
            with safe_open(path, "pt") as f:
                self._where.update({k: path for k in f.keys()})

    def names(self) -> Iterable[str]:
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._kept:
            from safetensors import safe_open

            with safe_open(self._where[name], "pt") as f:
                self._kept[name] = f.get_tensor(name).to(self.dtype)
        return self._kept[name]


class AdapterMerger:
    """Turns the adapter tensors of a version into merged base weights (see the module docstring).

    ``packed``: vLLM's ``packed_modules_mapping`` of the served model (fused name -> part names)."""

    def __init__(self, base: CheckpointBase, packed: dict[str, list[str]]) -> None:
        self.base, self.packed = base, packed
        self._pending: dict[str, torch.Tensor] = {}
        self.merged_last = False  # whether the last version loaded was adapters only

    def start(self) -> None:
        self._pending.clear()

    def tensors(self, tensors: Iterable[tuple[str, torch.Tensor]], is_last: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass full weights through; keep adapter halves, and at the last bucket yield the merged
        weights plus the base tensors their fused layers also need."""
        for name, t in tensors:
            if is_adapter(name):
                self._pending[name] = t.clone()  # the bucket's buffer may be reused for the next one
            else:
                yield name, t
        if not is_last:
            return
        self.merged_last = bool(self._pending)
        if self._pending:
            yield from self._flush()

    def _module_group(self, module: str) -> list[str]:
        """Module paths loaded together with ``module`` (itself and its fused siblings)."""
        prefix, _, last = module.rpartition(".")
        for parts in self.packed.values():
            if last in parts:
                return [f"{prefix}.{p}" for p in parts]
        return [module]

    def _flush(self) -> Iterator[tuple[str, torch.Tensor]]:
        merged: dict[str, torch.Tensor] = {}
        for name in sorted(n for n in self._pending if n.endswith(WIRE_A)):
            base = name.removesuffix(WIRE_A)
            a, b = self._pending[name].float(), self._pending[f"{base}{WIRE_B}"].float()
            w = self.base.get(base)
            merged[base] = (w.float() + b @ a).to(w.dtype)
        self._pending.clear()
        modules = {n.rsplit(".", 1)[0] for n in merged}
        group = sorted({m for mod in modules for m in self._module_group(mod)})
        for name in self.base.names():  # every tensor of the touched (fused) layers, merged or base
            if name.rsplit(".", 1)[0] in group:
                yield name, merged.get(name, self.base.get(name))
