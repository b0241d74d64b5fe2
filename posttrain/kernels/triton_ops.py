"""The Triton implementations under the names and signatures of :mod:`posttrain.kernels.reference`.

``route`` and ``dense_scales`` have no kernel: they are re-exported from the reference.
"""

from posttrain.kernels.fused_moe import fused_experts_backward, fused_experts_forward
from posttrain.kernels.gather_scatter import gather_mul, scatter_add
from posttrain.kernels.grouped_gemm import grouped_gemm
from posttrain.kernels.index_shuffling import index_shuffling, sort_by_expert
from posttrain.kernels.reference import RouterOutput, ShuffledIndices, dense_scales, route
from posttrain.kernels.swiglu import expert_mlp, swiglu

__all__ = [
    "RouterOutput",
    "ShuffledIndices",
    "dense_scales",
    "expert_mlp",
    "fused_experts_backward",
    "fused_experts_forward",
    "gather_mul",
    "grouped_gemm",
    "index_shuffling",
    "route",
    "scatter_add",
    "sort_by_expert",
    "swiglu",
]
