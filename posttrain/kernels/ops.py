"""The MoE kernels as ``torch.library`` custom ops: opaque to torch.compile, with fake (meta)
implementations for tracing and a registered autograd formula.

- ``posttrain::sort_by_expert(top_k_index, num_experts, impl)`` -> ShuffledIndices fields
  (validates expert ids first: -1 or >= E is a clear error, not an out-of-bounds write);
- ``posttrain::moe_experts_fwd(x, gate_up_proj, down_proj, token_counts, token_indices,
  row_scales, transposed_w, impl)`` -> (out [T, H], h [S, 2I]), differentiable in x, both
  weights and row_scales through ``posttrain::moe_experts_bwd``.

``impl``: "triton" (the kernels), "reference" (plain torch) or "auto" (the kernels where Triton
can run: CUDA, or CPU under TRITON_INTERPRET=1; the reference elsewhere). The choice happens
inside the op, at run time, so nothing host-side (environment, importing Triton, data pointers)
is in the traced path.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import Tensor

from posttrain.kernels.launch import triton_available

logger = logging.getLogger(__name__)

IMPLS = ("triton", "reference", "auto")
_warned: set[str] = set()


def _backend(impl: str, device: torch.device) -> ModuleType:
    """The module whose functions implement the ops: posttrain.kernels.triton_ops or .reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE kernel implementation {impl!r}; choose one of {list(IMPLS)}")
    if impl == "auto":
        impl = "triton" if triton_available(device) else "reference"
        if impl == "reference" and device.type not in _warned:
            _warned.add(device.type)
            logger.warning(
                "posttrain MoE kernels: Triton cannot run on %s tensors (set TRITON_INTERPRET=1 to "
                "interpret it on CPU); using the plain-torch reference ops",
                device.type,
            )
    if impl == "triton":
        from posttrain.kernels import triton_ops

        return triton_ops
    from posttrain.kernels import reference

    return reference


def validate_expert_ids(top_k_index: Tensor, num_experts: int) -> None:
    """Raise if an expert id is outside [0, num_experts) (e.g. -1 padding, an expert-parallel sentinel).

    CPU: a ValueError naming the bad value. CUDA: a device-side assert (``torch._assert_async``),
    so no host sync; the message is in the CUDA error.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.numel() == 0:
        return
    if top_k_index.is_floating_point():
        raise ValueError(f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")
    bad = (top_k_index < 0) | (top_k_index >= num_experts)
    if top_k_index.device.type == "cuda":
        torch._assert_async(
            ~bad.any(), f"posttrain MoE kernels: an expert id in top_k_index is outside [0, {num_experts})"
        )
        return
    if bool(bad.any()):
        value = int(top_k_index[bad][0])
        raise ValueError(
            f"posttrain MoE kernels: top_k_index holds expert id {value}, outside [0, {num_experts}).\n"
            "  fix: route every token to real experts (no -1 padding); for expert parallelism, whose "
            "sentinel ids mark remote experts, use moe_kernels: grouped_mm"
        )


@torch.library.custom_op("posttrain::sort_by_expert", mutates_args=())
def sort_by_expert_op(top_k_index: Tensor, num_experts: int, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(token_counts [E], expert_indices [S], token_indices [S], slot_positions [T, k]), all int32."""
    validate_expert_ids(top_k_index, num_experts)
    out = _backend(impl, top_k_index.device).sort_by_expert(top_k_index, num_experts)
    return tuple(t.clone() if t is top_k_index else t for t in out)  # type: ignore[return-value]


@sort_by_expert_op.register_fake
def _(top_k_index: Tensor, num_experts: int, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    num_tokens, top_k = top_k_index.shape
    i32 = {"dtype": torch.int32, "device": top_k_index.device}
    return (
        torch.empty(num_experts, **i32),
        torch.empty(num_tokens * top_k, **i32),
        torch.empty(num_tokens * top_k, **i32),
        torch.empty(num_tokens, top_k, **i32),
    )


@torch.library.custom_op("posttrain::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(
    x: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    token_counts: Tensor,
    token_indices: Tensor,
    row_scales: Tensor,
    transposed_w: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """(out [T, H], h [S, 2I]): see ``reference.fused_experts_forward``."""
    backend = _backend(impl, x.device)
    return backend.fused_experts_forward(
        x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, transposed_w
    )


@moe_experts_fwd.register_fake
def _(x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, transposed_w, impl):
    two_i = gate_up_proj.shape[2] if transposed_w else gate_up_proj.shape[1]
    return x.new_empty(x.shape), gate_up_proj.new_empty(token_indices.shape[0], two_i)


@torch.library.custom_op("posttrain::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(
    grad_out: Tensor,
    x: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    token_counts: Tensor,
    token_indices: Tensor,
    row_scales: Tensor,
    h: Tensor,
    transposed_w: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d gate_up_proj, d down_proj, d row_scales): see ``reference.fused_experts_backward``."""
    backend = _backend(impl, x.device)
    return backend.fused_experts_backward(
        grad_out, x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, h, transposed_w
    )


@moe_experts_bwd.register_fake
def _(grad_out, x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, h, transposed_w, impl):
    return x.new_empty(x.shape), torch.empty_like(gate_up_proj), torch.empty_like(down_proj), torch.empty_like(row_scales)


def _setup_context(ctx, inputs, output) -> None:
    x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, transposed_w, impl = inputs
    ctx.save_for_backward(x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, output[1])
    ctx.transposed_w, ctx.impl = transposed_w, impl
    ctx.mark_non_differentiable(output[1])  # h is an internal activation, not part of the layer


def _backward(ctx, grad_out: Tensor, grad_h: Tensor | None):
    x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, h = ctx.saved_tensors
    dx, d_gate_up, d_down, d_scales = moe_experts_bwd(
        grad_out, x, gate_up_proj, down_proj, token_counts, token_indices, row_scales, h, ctx.transposed_w, ctx.impl
    )
    return dx, d_gate_up, d_down, None, None, d_scales, None, None


torch.library.register_autograd("posttrain::moe_experts_fwd", _backward, setup_context=_setup_context)
