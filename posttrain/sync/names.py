"""Trainer parameter names and layouts -> the rollout engine's checkpoint names and layouts.

The trainer's state dict is what transformers builds in memory; the engine serves the Hugging
Face checkpoint layout. For dense models they are the same. MoE models differ: transformers 5
keeps each layer's experts fused, the checkpoint (and so vLLM's loader) has one tensor per expert:

    trainer                                   engine (checkpoint)
    <p>.experts.gate_up_proj [E, 2I, H]   ->  <p>.experts.<e>.gate_proj.weight [I, H]  (rows :I)
                                              <p>.experts.<e>.up_proj.weight   [I, H]  (rows I:)
    <p>.experts.down_proj    [E, H, I]    ->  <p>.experts.<e>.down_proj.weight [H, I]

(Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 name them so; Mixtral's checkpoint uses
``block_sparse_moe.experts.<e>.w1/w3/w2``.) Per-expert tensors are views of the gathered fused
tensor: no copy until the sender packs them. :func:`engine_tensors` is applied on every trainer
rank in the same order, so the FSDP gathers stay in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

# model_type -> (module prefix replacement, gate name, up name, down name) of the checkpoint
_EXPERT_NAMES: dict[str, tuple[tuple[str, str] | None, str, str, str]] = {
    "mixtral": ((".mlp.experts", ".block_sparse_moe.experts"), "w1", "w3", "w2"),
}
_DEFAULT = (None, "gate_proj", "up_proj", "down_proj")


def _split_experts(name: str, tensor: torch.Tensor, model_type: str) -> Iterator[tuple[str, torch.Tensor]]:
    rename, gate, up, down = _EXPERT_NAMES.get(model_type, _DEFAULT)
    fused, prefix = name.rsplit(".", 1)[1], name.rsplit(".", 1)[0]
    if rename is not None:
        prefix = prefix.replace(*rename)
    if fused == "gate_up_proj":
        inter = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{gate}.weight", tensor[e, :inter]
            yield f"{prefix}.{e}.{up}.weight", tensor[e, inter:]
    else:
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{down}.weight", tensor[e]


def _is_fused_expert(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and tensor.dim() == 3


def engine_tensors(tensors: Iterable[tuple[str, torch.Tensor]], model_type: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(trainer name, tensor)`` -> ``(engine name, tensor)``, in the trainer's order.

    A fused expert tensor may be a DTensor (an FSDP2 shard): it is gathered here, once, and
    split into per-expert views; every other tensor passes through ungathered (the sender
    gathers it when it packs it).
    """
    for name, tensor in tensors:
        if _is_fused_expert(name, tensor):
            full = getattr(tensor, "full_tensor", None)
            yield from _split_experts(name, full() if callable(full) else tensor, model_type)
        else:
            yield name, tensor
