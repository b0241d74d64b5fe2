"""A routed SwiGLU MoE layer's experts, end to end, on either implementation.

sort pairs by expert (custom op) -> routing weights into expert order (a torch scatter) ->
fused experts (custom op: gather in GEMM1's loads, SwiGLU, GEMM2 with the weighted scatter-add in
its epilogue; registered autograd). Nothing here reads a value back to the host when the kernels
run, and the whole function traces under ``torch.compile(fullgraph=True)``: the ops are opaque
``torch.library`` custom ops with fake implementations (see :mod:`posttrain.kernels.ops`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import torch

from posttrain.kernels import ops, reference

MoeImpl = Literal["triton", "reference", "auto"]


def moe_ops(impl: MoeImpl) -> ModuleType:
    """The module implementing the individual MoE ops for ``impl`` (benchmarks and tests).

    Imports Triton on first use: call it outside of traced code.
    """
    if impl == "reference":
        return reference
    if impl not in ops.IMPLS:
        raise ValueError(f"unknown MoE kernel implementation {impl!r}; choose one of {list(ops.IMPLS)}")
    from posttrain.kernels import triton_ops

    return triton_ops


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
        top_k_index: [T, k] chosen experts (distinct per token, in [0, E)), any integer dtype.
        top_k_weights: [T, k] combine weights (differentiable: the router gets its gradient).
        gate_up_proj: [E, 2I, H] ([E, H, 2I] if ``transposed_w``), gate rows first.
        down_proj: [E, H, I] ([E, I, H] if ``transposed_w``).
        transposed_w: weight layout, as transformers' ``is_transposed``.
        impl: "triton" (kernels), "reference" (plain torch) or "auto" (kernels where Triton runs).

    Returns:
        [T, H] in ``hidden_states.dtype``: sum_j w_tj * SwiGLU-MLP_{e_tj}(x_t), summed in float32.
    """
    if impl not in ops.IMPLS:
        raise ValueError(f"unknown MoE kernel implementation {impl!r}; choose one of {list(ops.IMPLS)}")
    num_experts = gate_up_proj.shape[0]
    counts, _, token_indices, slots = torch.ops.posttrain.sort_by_expert(top_k_index, num_experts, impl)
    # Routing weight of each expert-sorted row: row_scales[slot[t, j]] = w[t, j] (gradient: a gather).
    flat_weights = top_k_weights.reshape(-1).float()
    row_scales = flat_weights.new_zeros(flat_weights.shape).scatter(0, slots.reshape(-1).long(), flat_weights)
    out, _ = torch.ops.posttrain.moe_experts_fwd(
        hidden_states.to(gate_up_proj.dtype), gate_up_proj, down_proj, counts, token_indices, row_scales, transposed_w, impl
    )
    return out.to(hidden_states.dtype)
