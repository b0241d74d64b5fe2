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

BF16_GEMM = {
    "x_ptr": "*bf16",
    "w_ptr": "*bf16",
    "out_ptr": "*bf16",
    "m_sizes_ptr": "*i32",
    "a_idx_ptr": "*i32",
    "c_idx_ptr": "*i32",
    "scale_ptr": "*fp32",
}
FUSED_GEMM = {**BF16_GEMM, "out_ptr": "*fp32"}  # the scatter-add epilogue accumulates in float32
PLAIN = {"A_GATHER": False, "SCATTER": False, "HAS_SCALE": False}
WGRAD_PTRS = {
    "x_ptr": "*bf16",
    "dy_ptr": "*bf16",
    "dw_ptr": "*bf16",
    "m_sizes_ptr": "*i32",
    "m_starts_ptr": "*i32",
    "x_idx_ptr": "*i32",
    "dy_idx_ptr": "*i32",
    "dy_scale_ptr": "*fp32",
}
WGRAD_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_N": 4}
NO_GATHER = {"X_GATHER": False, "DY_GATHER": False, "DY_SCALE": False}
GEMM_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
DOT = {"UPCAST_DOT": False, "INPUT_PRECISION": "ieee"}
# What a launch specialises for contiguous bf16 tensors: unit inner strides become constants.
FWD_UNIT_STRIDES = {"stride_xk": 1, "stride_bk": 1, "stride_on": 1}
WGRAD_UNIT_STRIDES = {"stride_xk": 1, "stride_dyn": 1, "stride_ck": 1}
# Kernels whose inner loop must be software-pipelined (async copies into shared memory).
PIPELINED = {
    "gemm_pointer",
    "gemm_tma_w_gnk",
    "gemm_tma_w_gkn",
    "gemm_gather_a_tma_w_store",
    "gemm_fused_gather_scatter",
    "wgrad",
    "wgrad_tma",
    "wgrad_tma_dy_gather_x",
    "wgrad_tma_x_gather_scaled_dy",
}
# Kernels that must load with TMA (cp.async.bulk.tensor ... global) and store with it (... shared::cta).
TMA_LOADS = {"gemm_tma_w_gnk", "gemm_tma_w_gkn", "gemm_gather_a_tma_w_store", "gemm_fused_gather_scatter"}
TMA_LOADS |= {"wgrad_tma", "wgrad_tma_dy_gather_x", "wgrad_tma_x_gather_scaled_dy"}
TMA_STORES = {"gemm_tma_w_gnk", "gemm_tma_w_gkn", "gemm_gather_a_tma_w_store"}
ATOMIC_EPILOGUE = {"gemm_fused_gather_scatter"}
SHUFFLE_BUFFERS = {
    "scores_ptr": "*fp32",
    **{name: "*i32" for name in ("rank_ptr", "hist_ptr", "starts_ptr", "done_ptr", "counts_ptr")},
}
SHUFFLE_BLOCKS = {"TOP_K": 8, "K_PAD": 8, "BLOCK_T": 8, "BLOCK_E": 128, "BLOCK_NB": 64}

CASES: dict[str, tuple[Callable[..., None], dict[str, str], dict[str, object]]] = {
    "gemm_pointer": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, **FWD_UNIT_STRIDES, **PLAIN, "USE_TMA": False, "B_N_CONTIGUOUS": False},
    ),
    "gemm_tma_w_gnk": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, **PLAIN, "USE_TMA": True, "B_N_CONTIGUOUS": False},
    ),
    "gemm_tma_w_gkn": (
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, **PLAIN, "USE_TMA": True, "B_N_CONTIGUOUS": True},
    ),
    "gemm_gather_a_tma_w_store": (  # MoE GEMM1: token rows gathered in the A loads, TMA weights and store
        grouped_gemm._grouped_gemm_kernel,
        BF16_GEMM,
        {**GEMM_BLOCKS, **DOT, **PLAIN, "A_GATHER": True, "USE_TMA": True, "B_N_CONTIGUOUS": False},
    ),
    "gemm_fused_gather_scatter": (  # MoE GEMM2 / dX: scaled scatter-add epilogue (float32 atomics)
        grouped_gemm._grouped_gemm_kernel,
        FUSED_GEMM,
        {**GEMM_BLOCKS, **DOT, "A_GATHER": True, "SCATTER": True, "HAS_SCALE": True, "USE_TMA": True}
        | {"B_N_CONTIGUOUS": False},
    ),
    "wgrad": (
        grouped_gemm._wgrad_kernel,
        WGRAD_PTRS,
        {**WGRAD_BLOCKS, **DOT, **WGRAD_UNIT_STRIDES, **NO_GATHER, "USE_TMA": False},
    ),
    "wgrad_tma": (
        grouped_gemm._wgrad_kernel,
        WGRAD_PTRS,
        {**WGRAD_BLOCKS, **DOT, **NO_GATHER, "USE_TMA": True},
    ),
    "wgrad_tma_dy_gather_x": (  # MoE dW1: token rows of x gathered, dh through TMA
        grouped_gemm._wgrad_kernel,
        WGRAD_PTRS,
        {**WGRAD_BLOCKS, **DOT, **NO_GATHER, "X_GATHER": True, "USE_TMA": True},
    ),
    "wgrad_tma_x_gather_scaled_dy": (  # MoE dW2: dout rows gathered and scaled, a through TMA
        grouped_gemm._wgrad_kernel,
        WGRAD_PTRS,
        {**WGRAD_BLOCKS, **DOT, **NO_GATHER, "DY_GATHER": True, "DY_SCALE": True, "USE_TMA": True},
    ),
    "index_place": (
        index_shuffling._place_kernel,
        {"topk_ptr": "*i64", "rank_ptr": "*i32", "hist_ptr": "*i32", "starts_ptr": "*i32"}
        | {"expert_out_ptr": "*i32", "token_out_ptr": "*i32", "slot_out_ptr": "*i32"},
        {"TOP_K": 6, "K_PAD": 8, "BLOCK_T": 16},
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
        {"h_ptr": "*bf16", "dout_ptr": "*bf16", "dh_ptr": "*bf16", "scale_ptr": "*fp32"},
        {"HAS_SCALE": True, "BLOCK_R": 16, "BLOCK_I": 256},
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
    ptx = kernel.asm["ptx"]
    if name in PIPELINED:
        assert "cp.async" in ptx  # cp.async (pointer path) or cp.async.bulk.tensor (TMA)
        assert kernel.metadata.shared >= 2 * 64 * 64 * 2 * 2  # at least two stages of bf16 tiles
    if name in TMA_LOADS:
        assert "cp.async.bulk.tensor.2d.shared::cta.global" in ptx, "no TMA load"
    if name in TMA_STORES:
        assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx, "no TMA store epilogue"
    if name in ATOMIC_EPILOGUE:
        assert "red.global.gpu.relaxed.add.f32" in ptx, "no float32 atomic scatter-add"
    # 64-bit offsets: address arithmetic of the GEMMs is done in 64 bits (mul.wide or mul.lo.s64)
    if name.startswith(("gemm", "wgrad")):
        assert "mul.wide.s32" in ptx or "mul.lo.s64" in ptx
        assert "wgmma.mma_async" in ptx  # Hopper warpgroup MMA
    print("COMPILED", name)


def compile_all() -> None:
    """Compile every case in this process, one line per case: COMPILED name / FAILED name: error."""
    for name in sorted(CASES):
        try:
            compile_case(name)
        except BaseException as exc:  # noqa: BLE001
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[-1500:]!r}", flush=True)


@pytest.fixture(scope="module")
def compile_log() -> str:
    """One fresh process compiles all cases (no interpreter patches, one torch/triton import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # build real JITFunctions
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_kernels_compile as t; t.compile_all()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_compiles_for_sm90(name: str, compile_log: str) -> None:
    if "SKIP no ptxas" in compile_log:
        pytest.skip("no ptxas bundled with this triton")
    failed = [line for line in compile_log.splitlines() if line.startswith(f"FAILED {name}:")]
    assert not failed, failed[0]
    assert f"COMPILED {name}" in compile_log.splitlines()
