"""LoRA: low-rank adapters on chosen linear layers, trained with FSDP2 while the base stays frozen.

``apply_lora(model, cfg)`` swaps every ``nn.Linear`` whose last name part is in
``cfg.target_modules`` for a :class:`LoRALinear` *before* sharding. The frozen base weight keeps its
name (``<module>.weight``), so checkpoints, exports and weight-sync names of the base are
unchanged; the adapter adds ``<module>.lora_A`` [r, in] and ``<module>.lora_B`` [out, r]:

    y = x W^T + b + scale * dropout(x) A^T B^T,      scale = alpha / r,   B = 0 at start

Everything but the adapters has ``requires_grad=False``, so the engine's optimizer (built over
trainable parameters) holds only adapter state. FSDP2 shards per parameter, so frozen and trainable
parameters mix in one sharded block. PEFT is not a dependency: the adapter is exported in PEFT's
file format (``adapter_model.safetensors`` + ``adapter_config.json``) so PEFT loads it.

The reference policy of DPO / KL-regularised RL is the same model with the adapters off
(:func:`adapters_disabled`, :class:`BaseReference`): no second copy of the weights.

Weight sync sends only the adapters, under wire names ``<base weight name>:lora_A`` and
``<base weight name>:lora_B`` with ``B`` already multiplied by ``scale``; the rollout worker sets
``W = W_base + B_scaled @ A`` from its own copy of ``W_base`` (``rollout/adapter_merge.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config.errors import PosttrainError

WIRE_A, WIRE_B = ":lora_A", ":lora_B"  # suffixes of a base weight's name on the sync wire
PEFT_PREFIX = "base_model.model."  # PEFT's names: base_model.model.<module>.lora_A.weight


@dataclass
class LoRAConfig:
    """``model.lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # last name part of the nn.Linear modules to adapt (PEFT's convention); the default is every
    # attention and MLP projection of Llama/Qwen-style blocks
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self) -> tuple[str, str, str] | None:
        if self.r <= 0:
            return ("r", f"{self.r} must be positive", "set model.lora.r to the adapter rank (e.g. 8)")
        if not 0.0 <= self.dropout < 1.0:
            return ("dropout", f"{self.dropout} is not in [0, 1)", "set model.lora.dropout to e.g. 0.0 or 0.05")
        if not self.target_modules:
            return ("target_modules", "is empty", "list the linear layers to adapt, e.g. [q_proj, v_proj]")
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRATargetError(PosttrainError):
    pass


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        # scale the [.., r] tensor, and add into y in place (linear does not save its output):
        # one [.., out] temporary per layer instead of three
        return y.add_(F.linear(F.linear(self.dropout(x), self.lora_A) * self.scale, self.lora_B))

    def delta(self) -> torch.Tensor:
        """scale * B @ A, [out, in], in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replace the target linear layers by :class:`LoRALinear` in place and freeze everything else."""
    model.requires_grad_(False)
    targets = set(cfg.target_modules)
    found: list[str] = []
    for name, module in list(model.named_modules()):
        last = name.rsplit(".", 1)[-1]
        if last not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise LoRATargetError(
                f"model.lora.target_modules: '{name}' is a {type(module).__name__}, not an nn.Linear.\n"
                "  fix: list only linear layers (e.g. q_proj, v_proj); fused MoE experts cannot take adapters"
            )
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, last, LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout))
        found.append(name)
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise LoRATargetError(
            f"model.lora.target_modules={cfg.target_modules} matched no linear layer of this model.\n"
            f"  fix: use names of its linear layers: {names}"
        )
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRA config a model was adapted with, read back from its modules."""
    mods = list(lora_modules(model))
    first = mods[0][1]
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return LoRAConfig(first.r, first.alpha, p, sorted({n.rsplit(".", 1)[-1] for n, _ in mods}))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: the model computes the base model's outputs (the adapters are skipped)."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.adapter_enabled = True


class BaseReference:
    """The reference policy of a LoRA run: the policy engine with its adapters off.

    Has the ``forward(fn)`` verb of a frozen ``TrainEngine``, so DPO and RL use it unchanged."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        with adapters_disabled(self.engine.model):
            return self.engine.forward(fn)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of a parameter (an FSDP2 DTensor is gathered: collective)."""
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach().cpu()


def adapter_wire_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The adapters as the weight sync sends them: ``(<module>.weight:lora_A, A)`` and
    ``(<module>.weight:lora_B, scale * B)``, gathered (collective: every rank must call)."""
    out = []
    for name, m in lora_modules(model):
        out.append((f"{name}.weight{WIRE_A}", _full(m.lora_A)))
        out.append((f"{name}.weight{WIRE_B}", _full(m.lora_B) * m.scale))
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back (in place):
    the result is the architecture's own module tree, which ``save_pretrained`` writes."""
    for name, m in list(lora_modules(model)):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        lin.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], lin)
    return model


# -- PEFT file format ------------------------------------------------------------------------------
def peft_adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors of a full (gathered) state dict, under PEFT's names."""
    out = {}
    for k, v in state.items():
        for part in ("lora_A", "lora_B"):
            if k.endswith("." + part):
                out[f"{PEFT_PREFIX}{k[: -len(part) - 1]}.{part}.weight"] = v.detach().cpu().contiguous()
    return out


def peft_adapter_config(cfg: LoRAConfig, base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }


def save_adapter(out_dir: str, state: dict[str, torch.Tensor], cfg: LoRAConfig, base_model: str | None) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT's layout)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_adapter_state(state), os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_adapter_config(cfg, base_model), f, indent=2)


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str) -> None:
    """Copy a PEFT-format adapter into a model adapted with the same targets and rank."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise LoRATargetError(f"no adapter_model.safetensors in {adapter_dir}.\n  fix: point at the hf directory a LoRA run exported")
    state = load_file(path)
    mods = dict(lora_modules(model))
    for key, value in state.items():
        module, part = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[:2]
        if module not in mods:
            raise LoRATargetError(f"adapter tensor {key} has no LoRA layer '{module}' in the model.\n  fix: load it into the run's own model config")
        getattr(mods[module], part).copy_(value)
    if len(state) != 2 * len(mods):
        raise LoRATargetError(f"{path} holds {len(state)} tensors, the model has {len(mods)} adapted layers (x2).\n  fix: use the run's model.lora settings")
