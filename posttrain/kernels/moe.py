"""A routed SwiGLU MoE layer's experts, end to end, on either implementation.

shuffle pairs by expert -> gather token rows -> gate+up grouped GEMM -> SwiGLU -> down grouped
GEMM -> weighted un-shuffle and sum of each token's k rows. Nothing here reads a value back to the
host when ``impl="triton"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import torch

MoeImpl = Literal["triton", "reference"]

# Modules exposing the same functions (see posttrain.kernels.reference); imported on first use so
# that importing posttrain.kernels never requires triton.
_IMPLEMENTATIONS: dict[str, str] = {
    "triton": "posttrain.kernels.triton_ops",
    "reference": "posttrain.kernels.reference",
}


def moe_ops(impl: MoeImpl) -> ModuleType:
    """The module implementing the MoE ops for ``impl``."""
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(
            f"unknown MoE kernel implementation {impl!r}; choose one of {sorted(_IMPLEMENTATIONS)}"
        )
    return importlib.import_module(_IMPLEMENTATIONS[impl])


def moe_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    transposed_w: bool = False,
    impl: MoeImpl = "triton",
) -> torch.Tensor:
    """Routed SwiGLU experts.

    Args:
        hidden_states: [T, H] tokens.
        top_k_index: [T, k] chosen experts (distinct per token), any integer dtype.
        top_k_weights: [T, k] combine weights (differentiable: the router gets its gradient).
        gate_up_proj: [E, 2I, H] ([E, H, 2I] if ``transposed_w``), gate rows first.
        down_proj: [E, H, I] ([E, I, H] if ``transposed_w``).
        transposed_w: weight layout, as transformers' ``is_transposed``.
        impl: "triton" (kernels) or "reference" (plain torch).

    Returns:
        [T, H] in ``hidden_states.dtype``: sum_j w_tj * SwiGLU-MLP_{e_tj}(x_t), summed in float32.
    """
    ops = moe_ops(impl)
    num_experts = gate_up_proj.shape[0]
    indices = ops.sort_by_expert(top_k_index, num_experts)
    rows = ops.gather_mul(hidden_states.to(gate_up_proj.dtype), indices, None)
    out_rows = ops.expert_mlp(rows, gate_up_proj, down_proj, indices.token_counts, transposed_w)
    scales = ops.dense_scales(top_k_weights, top_k_index, num_experts)
    return ops.scatter_add(out_rows, indices, scales, None).to(hidden_states.dtype)
