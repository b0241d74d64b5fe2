"""MoE kernels: index shuffling, gather-mul, persistent grouped GEMM, SwiGLU, scatter-add.

Each op exists twice with one signature: :mod:`posttrain.kernels.reference` (plain torch) and
:mod:`posttrain.kernels.triton_ops` (Triton, imported on demand). :func:`moe_experts` composes
them. This package imports nothing from the rest of posttrain.
"""

from posttrain.kernels.launch import triton_available
from posttrain.kernels.moe import MoeImpl, moe_experts, moe_ops
from posttrain.kernels.reference import RouterOutput, ShuffledIndices

__all__ = ["MoeImpl", "RouterOutput", "ShuffledIndices", "moe_experts", "moe_ops", "triton_available"]
