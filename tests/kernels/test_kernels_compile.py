"""Every Triton kernel compiles for Hopper (sm_90, TMA and pointer paths) without a GPU.

The interpreter checks semantics but not what the compiler accepts (loop-carried types, layouts,
descriptor rules); this runs Triton's real NVIDIA pipeline down to a cubin with the ptxas that the
triton wheel bundles, so a kernel that would fail to build on a GPU machine fails here.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")

from posttrain.kernels import gather_scatter, grouped_gemm, index_shuffling, swiglu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

BF16_GEMM = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "m_sizes_ptr": "*i32"}
GEMM_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
DOT = {"UPCAST_DOT": False, "INPUT_PRECISION": "ieee"}
# What a launch specialises for contiguous bf16 tensors: unit inner strides become constants.
FWD_UNIT_STRIDES = {"stride_xk": 1, "stride_bk": 1, "stride_on": 1}
WGRAD_UNIT_STRIDES = {"stride_xk": 1, "stride_dyn": 1, "stride_ck": 1}
# Kernels whose inner loop must be software-pipelined (async copies into shared memory).
PIPELINED = {"gemm_pointer", "gemm_tma_w_gnk", "gemm_tma_w_gkn", "wgrad"}
SHUFFLE_BUFFERS = {
    "scores_ptr": "*fp32",
    **{name: "*i32" for name in ("rank_ptr", "hist_ptr", "starts_ptr", "done_ptr", "counts_ptr")},
    **{name: "*i32" for name in ("expert_out_ptr", "token_out_ptr", "slot_out_ptr")},
}
SHUFFLE_BLOCKS = {"TOP_K": 8, "K_PAD": 8, "BLOCK_T": 8, "BLOCK_E": 128, "BLOCK_NB": 64, "PLACE_BLOCK": 2048}

CASES: dict[str, tuple[Callable[..., None], dict[str, str], dict[str, object]]] = {
    "gemm_pointer": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, **FWD_UNIT_STRIDES, "USE_TMA": False, "B_N_CONTIGUOUS": False},
    ),
    "gemm_tma_w_gnk": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, "USE_TMA": True, "B_N_CONTIGUOUS": False},
    ),
    "gemm_tma_w_gkn": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, "USE_TMA": True, "B_N_CONTIGUOUS": True},
    ),
    "wgrad": (
        grouped_gemm._wgrad_kernel,
        {
            "x_ptr": "*bf16",
            "dy_ptr": "*bf16",
            "dw_ptr": "*bf16",
            "m_sizes_ptr": "*i32",
            "m_starts_ptr": "*i32",
        },
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, **DOT, **WGRAD_UNIT_STRIDES},
    ),
    "index_shuffling_scores": (
        index_shuffling._index_shuffling_kernel,
        {**SHUFFLE_BUFFERS, "topk_ptr": "*i32"},
        {**SHUFFLE_BLOCKS, "FROM_SCORES": True},
    ),
    "index_shuffling_topk": (
        index_shuffling._index_shuffling_kernel,
        {**SHUFFLE_BUFFERS, "topk_ptr": "*i64"},
        {**SHUFFLE_BLOCKS, "FROM_SCORES": False},
    ),
    "gather_mul": (
        gather_scatter._gather_mul_kernel,
        {
            "x_ptr": "*bf16",
            "token_ptr": "*i32",
            "expert_ptr": "*i32",
            "scales_ptr": "*fp32",
            "out_ptr": "*bf16",
        },
        {"HAS_SCALES": True, "BLOCK_R": 16, "BLOCK_H": 256},
    ),
    "combine": (
        gather_scatter._combine_kernel,
        {"y_ptr": "*bf16", "slot_ptr": "*i32", "expert_ptr": "*i32", "scales_ptr": "*bf16"}
        | {"shared_ptr": "*bf16", "out_ptr": "*bf16"},
        {"TOP_K": 4, "HAS_SCALES": True, "HAS_SHARED": True, "BLOCK_R": 16, "BLOCK_H": 256},
    ),
    "row_dot": (
        gather_scatter._row_dot_kernel,
        {"a_ptr": "*bf16", "b_ptr": "*bf16", "b_idx_ptr": "*i32", "out_ptr": "*fp32"},
        {"BLOCK_R": 16, "BLOCK_H": 256},
    ),
    "swiglu_fwd": (
        swiglu._swiglu_fwd_kernel,
        {"h_ptr": "*bf16", "out_ptr": "*bf16"},
        {"BLOCK_R": 16, "BLOCK_I": 256},
    ),
    "swiglu_bwd": (
        swiglu._swiglu_bwd_kernel,
        {"h_ptr": "*bf16", "dout_ptr": "*bf16", "dh_ptr": "*bf16"},
        {"BLOCK_R": 16, "BLOCK_I": 256},
    ),
}


def compile_case(name: str) -> None:
    """Compile one case for sm_90 and check the result; run in a process that never interpreted
    a kernel (the interpreter patches triton.language in place for the rest of the process)."""
    fn, pointer_types, constexprs = CASES[name]
    params = list(inspect.signature(fn).parameters)
    signature = {arg: "constexpr" if arg in constexprs else pointer_types.get(arg, "i32") for arg in params}
    # Launches mark 16-aligned pointers and multiples of 16 (strides, sizes) as such; do the same.
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, arg in enumerate(params)
        if arg not in constexprs and (arg.endswith("_ptr") or arg.startswith("stride") or arg in ("N", "K"))
    }
    source = compiler.ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs, attrs=aligned)
    try:
        kernel = compiler.compile(
            source, target=backends.GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}
        )
    except RuntimeError as exc:
        if "ptxas" in str(exc) and "not found" in str(exc).lower():
            print(f"SKIP no ptxas bundled with this triton: {exc}")
            return
        raise
    assert kernel.asm["cubin"]  # a real sm_90 binary came out
    if name in PIPELINED:
        assert "cp.async" in kernel.asm["ptx"]  # cp.async (pointer path) or cp.async.bulk.tensor (TMA)
        assert kernel.metadata.shared >= 2 * 128 * 64 * 2 * 2  # at least two stages of bf16 tiles
    print("COMPILED", name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # build real JITFunctions
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_kernels_compile as t; t.compile_case({name!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert f"COMPILED {name}" in proc.stdout
