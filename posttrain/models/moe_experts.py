"""posttrain's MoE kernels inside transformers models, and router load metrics for the trainer.

transformers 5 dispatches the forward of every ``@use_experts_implementation`` experts module
(Qwen3-MoE, Mixtral, DeepSeek-V3, ...) through ``ExpertsInterface`` using
``config._experts_implementation``, looked up at each call. This module registers
``"posttrain_triton"`` there; :func:`set_moe_kernels` switches a model (or a config before the
model is built) between it, ``"grouped_mm"`` and ``"eager"``. The recipe key ``model.moe_kernels``
maps to its ``kind`` argument.

Usage::

    set_moe_kernels(model, "triton")
    track_router_metrics(model)          # once, after building the model
    loss = model(**batch).loss           # any number of micro-batches
    metrics = router_aux_metrics(model)  # {"moe/aux_loss": ..., "moe/load_frac/expert_3": ...}; resets

"triton" runs posttrain's kernels on CUDA tensors, and on CPU only under ``TRITON_INTERPRET=1``;
otherwise it logs once and runs the plain-torch reference of the same ops. Experts it cannot
handle (biases, non-SwiGLU or custom gates, interleaved gate/up, expert parallelism) are named in
one log line when the kernels are set, and use transformers' ``grouped_mm`` path. "eager" is
transformers' per-expert loop (the experts class's own forward), "grouped_mm" torch's
``_grouped_mm``. The forward traces under ``torch.compile(fullgraph=True)``: no logging, no
imports and no host reads on the traced path.

A model is MoE when one of its modules holds 3-D expert weights (``gate_up_proj`` or ``up_proj``
plus ``down_proj``, [E, ., .]): the structure transformers 5 gives Qwen3-MoE, DeepSeek-V3,
Mixtral and OLMoE, whatever the config calls its expert count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ExpertsInterface,
    _default_apply_gate,
    grouped_mm_experts_forward,
)

from posttrain.kernels import moe_experts

logger = logging.getLogger(__name__)

MoeKernelKind = Literal["triton", "grouped_mm", "eager"]

TRITON_EXPERTS_KEY = "posttrain_triton"
# Recipe value -> name registered in transformers' ExpertsInterface.
_KIND_TO_IMPLEMENTATION: dict[str, str] = {
    "triton": TRITON_EXPERTS_KEY,
    "grouped_mm": "grouped_mm",
    "eager": "eager",
}
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _unsupported_reason(experts: torch.nn.Module) -> str | None:
    """Why the Triton path cannot run this experts module, or None if it can."""
    if not getattr(experts, "has_gate", False):
        return "experts without a gate (no gate_up_proj)"
    if getattr(experts, "has_bias", False):
        return "experts with biases"
    if not getattr(experts, "is_concatenated", True):
        return "interleaved gate/up layout"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism"
    if type(experts)._apply_gate is not _default_apply_gate:
        return "a model-specific gate function"
    if not isinstance(getattr(experts, "act_fn", None), (SiLUActivation, torch.nn.SiLU)):
        return f"activation {type(getattr(experts, 'act_fn', None)).__name__} (SwiGLU needs SiLU)"
    return None


def is_experts_module(module: torch.nn.Module) -> bool:
    """True for a module holding routed experts as 3-D weights: [E, 2I, H]-like ``gate_up_proj``
    (or ``up_proj``) and ``down_proj``."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor) and down.dim() == 3 and up.dim() == 3


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every routed-experts module of ``model`` (see :func:`is_experts_module`)."""
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def triton_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """ExpertsInterface entry: [T, H] tokens, [T, k] expert ids and weights -> [T, H]."""
    if _unsupported_reason(self) is not None:  # logged once by set_moe_kernels
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return moe_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.gate_up_proj,
        self.down_proj,
        transposed_w=self.is_transposed,
        impl="auto",
    )


ExpertsInterface.register(TRITON_EXPERTS_KEY, triton_experts_forward)


def set_moe_kernels(model_or_config: PreTrainedModel | PretrainedConfig, kind: MoeKernelKind) -> None:
    """Choose the experts implementation of a transformers MoE model (or of a config, before building).

    ``kind``: "triton" (posttrain kernels), "grouped_mm" (torch grouped GEMM) or "eager"
    (transformers' per-expert loop). Takes effect at the next forward; sub-configs follow.
    """
    if kind not in _KIND_TO_IMPLEMENTATION:
        raise ValueError(
            f"model.moe_kernels: unknown value {kind!r}; choose one of {sorted(_KIND_TO_IMPLEMENTATION)}"
        )
    implementation = _KIND_TO_IMPLEMENTATION[kind]
    if isinstance(model_or_config, PreTrainedModel):
        modules = experts_modules(model_or_config)
        switchable = [m for _, m in modules if hasattr(m, "is_concatenated")]
        if not switchable or not model_or_config._can_set_experts_implementation():
            raise ValueError(
                f"model.moe_kernels: {type(model_or_config).__name__} has no switchable experts "
                "(no module with 3-D expert weights built by transformers' @use_experts_implementation); "
                "remove the key for this model"
            )
        if kind == "triton":
            for name, module in modules:
                reason = _unsupported_reason(module)
                if reason is not None:
                    _log_once(
                        f"posttrain MoE kernels: {type(module).__name__} ({name}) has {reason}; "
                        "using transformers grouped_mm there"
                    )
        model_or_config.set_experts_implementation(implementation)
    elif isinstance(model_or_config, PretrainedConfig):
        model_or_config._experts_implementation = implementation
    else:
        raise TypeError(
            f"set_moe_kernels: expected a PreTrainedModel or PretrainedConfig, got {type(model_or_config)}"
        )


@dataclass
class _LayerStats:
    """Router statistics of one MoE layer, summed over the forwards since the last read."""

    tokens_per_expert: torch.Tensor | None = None  # [E] float32: top-k assignments
    prob_per_expert: torch.Tensor | None = None  # [E] float32: sum of softmax(router logits)
    rows: int = 0  # tokens seen by the router
    assigned_rows: int = 0  # tokens seen by the experts

    def reset(self) -> None:
        """Forget everything (in place: the hooks hold this object)."""
        self.tokens_per_expert = self.prob_per_expert = None
        self.rows = self.assigned_rows = 0


@dataclass
class _RouterTracker:
    layers: dict[str, _LayerStats] = field(default_factory=dict)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


def _moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, router, experts) of every block with a ``gate`` router and switchable ``experts``."""
    blocks = []
    for name, module in model.named_modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        if (
            isinstance(experts, torch.nn.Module)
            and isinstance(gate, torch.nn.Module)
            and hasattr(experts, "has_gate")
        ):
            blocks.append((name, gate, experts))
    return blocks


def track_router_metrics(model: torch.nn.Module) -> int:
    """Attach hooks recording router statistics; idempotent. Returns the number of MoE layers tracked.

    The router hook sums softmax(router logits) per expert; the experts hook counts top-k
    assignments. Both stay on the device (no sync) until :func:`router_aux_metrics` reads them.
    Padding tokens are counted (the hooks do not see the attention mask); with activation
    checkpointing the recomputed forward is counted again, which leaves fractions unchanged.
    """
    tracker: _RouterTracker | None = getattr(model, "_posttrain_router_tracker", None)
    if tracker is not None:
        return len(tracker.layers)
    tracker = _RouterTracker()
    for name, gate, experts in _moe_blocks(model):
        stats = tracker.layers.setdefault(name, _LayerStats())

        def on_router(
            module: torch.nn.Module, args: tuple, output: object, stats: _LayerStats = stats
        ) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
            total = probs.sum(dim=0)
            stats.prob_per_expert = total if stats.prob_per_expert is None else stats.prob_per_expert + total
            stats.rows += probs.shape[0]

        def on_experts(
            module: torch.nn.Module, args: tuple, kwargs: dict, output: object, stats: _LayerStats = stats
        ) -> None:
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            ids = top_k_index.detach().reshape(-1).long()
            # scatter_add into a fixed-size [E] buffer: no host sync on CUDA (bincount reads the
            # max id back to size its output); ids outside [0, E) (expert-parallel sentinels) drop.
            inside = (ids >= 0) & (ids < module.num_experts)
            counts = torch.zeros(module.num_experts, dtype=torch.float32, device=ids.device)
            counts.scatter_add_(0, ids.clamp(0, module.num_experts - 1), inside.float())
            stats.tokens_per_expert = (
                counts if stats.tokens_per_expert is None else stats.tokens_per_expert + counts
            )
            stats.assigned_rows += top_k_index.shape[0]

        tracker.handles.append(gate.register_forward_hook(on_router))
        tracker.handles.append(experts.register_forward_hook(on_experts, with_kwargs=True))
    model._posttrain_router_tracker = tracker
    return len(tracker.layers)


def router_aux_metrics(model: torch.nn.Module, reset: bool = True) -> dict[str, float]:
    """Load-balancing metrics over the forwards since the last call (one host sync).

    Keys:
        ``moe/aux_loss``: the Switch-Transformer load-balancing loss exactly as transformers'
            ``load_balancing_loss_func`` computes it (statistics pooled over layers):
            E * sum_e f_e * P_e, f_e = top-k assignments to e per token, P_e = mean router
            probability of e. A balanced router gives k (top-k); the value the model adds to its
            loss is ``router_aux_loss_coef`` times this.
        ``moe/load_frac/expert_{e}``: fraction of all assignments that went to expert e, pooled
            over layers (1/E when balanced).
        ``moe/max_load_frac``: largest per-layer, per-expert fraction.

    Requires :func:`track_router_metrics`; returns {} before any forward.
    """
    tracker: _RouterTracker | None = getattr(model, "_posttrain_router_tracker", None)
    if tracker is None:
        raise RuntimeError(
            "router_aux_metrics: call track_router_metrics(model) once after building the model"
        )
    seen = [
        s
        for s in tracker.layers.values()
        if s.tokens_per_expert is not None and s.prob_per_expert is not None
    ]
    rows = sum(s.rows for s in seen)
    assigned_rows = sum(s.assigned_rows for s in seen)
    if not seen or rows == 0 or assigned_rows == 0:
        return {}
    counts = torch.stack([s.tokens_per_expert for s in seen])  # [layers, E]
    probs = sum(s.prob_per_expert for s in seen)  # [E]
    aux = counts.shape[1] * ((counts.sum(0) / assigned_rows) * (probs / rows)).sum()
    layer_frac = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
    pooled_frac = counts.sum(0) / counts.sum().clamp_min(1.0)
    values = torch.cat([aux[None], layer_frac.max()[None], pooled_frac]).tolist()
    if reset:
        for stats in tracker.layers.values():
            stats.reset()
    metrics = {"moe/aux_loss": values[0], "moe/max_load_frac": values[1]}
    metrics.update({f"moe/load_frac/expert_{e}": v for e, v in enumerate(values[2:])})
    return metrics
