"""Compile every posttrain Triton kernel launch for Hopper (sm_90) on CPU, as a real launch would.

Triton's compiler needs no GPU: the NVIDIA pipeline runs down to a cubin with the ptxas bundled in
the triton wheel. What a CPU compile check can get wrong is the *specialisation*: a real launch
turns integer arguments equal to 1 into constants and marks pointers, strides and sizes that are
multiples of 16 as divisible by 16, and the compiled code (vector widths, TMA legality, pipelining)
depends on it. So this module does not hand-write signatures:

1. it runs posttrain's public kernel functions (the MoE layer's forward and backward, the plain
   grouped GEMM with and without TMA, both weight layouts) on CPU tensors with every ``LazyKernel``
   replaced by a recorder, which keeps each launch's arguments instead of running it;
2. it specialises each recorded launch with Triton's own binder for a CUDA target (the code path of
   ``JITFunction.run``) and compiles it for ``GPUTarget("cuda", 90, 32)`` (warp size 32: what
   Triton's CUDA driver reports for every NVIDIA GPU);
3. autotuned kernels are compiled once per config that their pruning can keep (the configs that
   fit shared memory for the launch's dtypes).

Run as a script it prints one JSON line per compile (``--jobs N`` compiles in N processes,
``--all`` compiles every variant with every config instead of the CI selection, see ``plan``).
It must run in a process that never used the interpreter (the interpreter patches triton.language).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

SMEM_LIMIT_BYTES = 232448  # shared memory per block on H100 / H200
TARGET_ARCH = 90


@dataclass
class Launch:
    """One recorded kernel launch: the kernel (module, attribute), its arguments, what it asks for."""

    module: str
    attr: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    autotuned: bool
    variant: str = ""

    def flags(self) -> dict[str, Any]:
        """Constexpr options of the launch (no block sizes): what tells variants apart."""
        return {k: v for k, v in sorted(self.kwargs.items()) if k.isupper() and not k.startswith(("BLOCK_", "GROUP_"))}


@dataclass
class Job:
    """One compile: a launch, with an autotune config's kwargs when the kernel is autotuned."""

    launch: Launch
    config: dict[str, Any] = field(default_factory=dict)
    smem_estimate: int | None = None

    def name(self) -> str:
        blocks = "x".join(str(self.config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in self.config)
        stages = f"s{self.config['num_stages']}" if "num_stages" in self.config else ""
        return f"{self.launch.variant}" + (f"@{blocks}{stages}" if blocks else "")


def _dtype_tag(args: tuple[Any, ...]) -> str:
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    if first is None:
        return "int"
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[first.dtype]


def record_launches() -> list[Launch]:
    """Every distinct launch posttrain's kernels make for the MoE layer and the grouped GEMM, per dtype."""
    from posttrain.kernels import fused_moe, gather_scatter, grouped_gemm, index_shuffling, launch, swiglu
    from posttrain.kernels.reference import ShuffledIndices

    recorded: list[Launch] = []

    class Recorder:
        def __init__(self, module: Any, attr: str, kernel: launch.LazyKernel) -> None:
            self.module, self.attr, self.kernel = module.__name__, attr, kernel
            self.autotuned = kernel._autotune_configs is not None  # launches then pass no block sizes

        def __getitem__(self, grid: Any) -> Any:
            def keep(*args: Any, **kwargs: Any) -> None:
                recorded.append(Launch(self.module, self.attr, args, kwargs, self.autotuned))

            return keep

    modules = (gather_scatter, grouped_gemm, index_shuffling, swiglu)
    originals = {
        (m, a): v for m in modules for a, v in vars(m).items() if isinstance(v, launch.LazyKernel)
    }
    original_use_tma = grouped_gemm.use_tma
    try:
        for (module, attr), kernel in originals.items():
            setattr(module, attr, Recorder(module, attr, kernel))
        for dtype in (torch.bfloat16, torch.float32):
            _drive(dtype, grouped_gemm, fused_moe, gather_scatter, index_shuffling, swiglu, ShuffledIndices)
    finally:
        for (module, attr), kernel in originals.items():
            setattr(module, attr, kernel)
        grouped_gemm.use_tma = original_use_tma

    distinct: dict[str, Launch] = {}
    for rec in recorded:
        flags = ",".join(f"{k}={v}" for k, v in rec.flags().items())
        rec.variant = f"{rec.attr.strip('_').lower()}[{_dtype_tag(rec.args)}]({flags})"
        rec.variant = f"{rec.module.rsplit('.', 1)[-1]}.{rec.variant}"
        distinct.setdefault(rec.variant, rec)
    return list(distinct.values())


def _drive(dtype: torch.dtype, grouped_gemm: Any, fused_moe: Any, gather_scatter: Any, index_shuffling: Any,
           swiglu: Any, shuffled: Any) -> None:
    """Call the public kernel functions once each way a training step calls them (nothing runs)."""
    tokens, hidden, inter, experts, top_k = 64, 256, 128, 8, 2
    rows = tokens * top_k
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    scores = torch.randn(tokens, experts, generator=gen)
    idx = index_shuffling.index_shuffling(scores, top_k)  # launches recorded, outputs left empty
    index_shuffling.sort_by_expert(torch.topk(scores, top_k).indices, experts)
    idx = shuffled(
        torch.full((experts,), rows // experts, dtype=torch.int32),
        torch.arange(rows, dtype=torch.int32) % experts,
        torch.arange(rows, dtype=torch.int32) // top_k,
        torch.arange(rows, dtype=torch.int32).view(tokens, top_k),
    )
    dense = torch.rand(tokens, experts, generator=gen).to(dtype)
    y = gather_scatter.gather_mul_forward(x, idx, dense)
    gather_scatter.scatter_add_forward(y, idx, dense, x)
    gather_scatter._pair_scale_grad(y, x, idx, dense)
    h = torch.randn(rows, 2 * inter, generator=gen).to(dtype)
    swiglu.swiglu_forward(h)
    swiglu.swiglu_backward(h, torch.randn(rows, inter, generator=gen).to(dtype), torch.rand(rows))
    for tma in (True, False):  # sm_90 with aligned operands / anything else (pointer path)
        grouped_gemm.use_tma = lambda device, tma=tma: tma
        for transposed in (False, True):
            shape = (experts, hidden, inter) if transposed else (experts, inter, hidden)
            w = torch.randn(shape, generator=gen).to(dtype)
            a = torch.randn(rows, hidden, generator=gen).to(dtype)
            out = grouped_gemm.grouped_gemm_forward(a, w, idx.token_counts, transposed)
            grouped_gemm.grouped_gemm_forward(out.contiguous(), w, idx.token_counts, not transposed)  # dX
            grouped_gemm.grouped_gemm_wgrad(a, out, idx.token_counts, transposed)
        if tma:
            gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen).to(dtype)
            down = torch.randn(experts, hidden, inter, generator=gen).to(dtype)
            scales = torch.rand(rows, generator=gen)
            out, h = fused_moe.fused_experts_forward(x, gate_up, down, idx.token_counts, idx.token_indices, scales)
            fused_moe.fused_experts_backward(
                torch.randn(tokens, hidden, generator=gen).to(dtype), x, gate_up, down, idx.token_counts,
                idx.token_indices, scales, torch.randn(rows, 2 * inter, generator=gen).to(dtype),
            )


def _fitting_configs(launch: Launch) -> list[tuple[dict[str, Any], int]]:
    """The configs an autotuned launch can run with: its pruning over every (M_BUCKET, G) key."""
    from posttrain.kernels import grouped_gemm

    kernel = getattr(grouped_gemm, launch.attr)
    names = list(kernel.fn.__code__.co_varnames[: kernel.fn.__code__.co_argcount])
    named = dict(zip(names, launch.args, strict=False))
    # A huge M_BUCKET with one group keeps every config the shared-memory check keeps.
    kept = kernel._prune(kernel._autotune_configs(), {**named, "M_BUCKET": 1 << 40, "G": 1})
    wgrad = launch.attr == "_WGRAD"
    out = named["dw_ptr" if wgrad else "out_ptr"]
    return [
        (
            {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages},
            grouped_gemm.smem_estimate(c, named["x_ptr"].element_size(), out.element_size(), wgrad),
        )
        for c in kept
    ]


def _is_gemm(launch: Launch) -> bool:
    return launch.module.endswith("grouped_gemm")


def _heavy(launch: Launch) -> bool:
    """The GEMM variants with the most shared memory per config: operands through TMA and the TMA
    store epilogue (forward, w [G, N, K]), and the weight gradient with both operands through TMA."""
    flags = launch.flags()
    if not (_is_gemm(launch) and flags.get("USE_TMA")):
        return False
    if launch.attr == "_WGRAD":
        return not flags["X_GATHER"] and not flags["DY_GATHER"]
    return not flags["A_GATHER"] and not flags["SCATTER"] and not flags["B_N_CONTIGUOUS"]


def plan(launches: list[Launch], every_config_everywhere: bool = False) -> list[Job]:
    """Compile jobs; the CI selection keeps a cold compile to about two minutes on two cores.

    - bf16 (the training dtype): every variant of every kernel, with its largest fitting config;
    - every fitting config of the heavy variants (see ``_heavy``), in bf16 and float32: float32
      doubles the tiles, so that is where a config overflows shared memory;
    - float32 scatter epilogue: its largest fitting config.

    ``every_config_everywhere``: every variant x every fitting config, both dtypes (~150 compiles).
    """
    jobs: list[Job] = []
    for launch in launches:
        bf16 = "[bf16]" in launch.variant or "[int]" in launch.variant
        if not launch.autotuned:  # index shuffling reads float32 scores: it has no bf16 variant
            if bf16 or every_config_everywhere or launch.module.endswith("index_shuffling"):
                jobs.append(Job(launch))
            continue
        configs = _fitting_configs(launch)
        if every_config_everywhere or _heavy(launch):
            chosen = configs
        elif bf16 or launch.flags().get("SCATTER"):
            chosen = configs[:1]
        else:
            chosen = []
        jobs.extend(Job(launch, config, estimate) for config, estimate in chosen)
    return jobs


def compile_job(job: Job) -> dict[str, Any]:
    """Specialise the launch as ``JITFunction.run`` would for an sm_90 device and compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch = job.launch
    module = sys.modules.get(launch.module) or __import__(launch.module, fromlist=["_"])
    jit = triton.jit(getattr(module, launch.attr).fn)
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **job.config}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    start = time.perf_counter()
    kernel = compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    flags = launch.flags()
    return {
        "job": job.name(),
        "variant": launch.variant,
        "config": job.config,
        "seconds": round(seconds, 2),
        "shared": int(kernel.metadata.shared),
        "smem_estimate": job.smem_estimate,
        "cubin": bool(kernel.asm.get("cubin")),
        "wgmma": "wgmma.mma_async" in ptx,
        # TMA loads: global -> shared ("shared::cta" in Triton >= 3.7, "shared::cluster" before).
        "tma_load": any(f"cp.async.bulk.tensor.2d.{s}.global" in ptx for s in ("shared::cta", "shared::cluster")),
        "tma_store": any(f"cp.async.bulk.tensor.2d.global.{s}" in ptx for s in ("shared::cta", "shared::cluster")),
        # float32 atomic adds, scalar or vectorised (Triton >= 3.7: atom.global.gpu.relaxed.add.v4.f32).
        "atomic_f32": re.search(r"\b(?:red|atom)\.[\w.]*add(?:\.v\d)?\.f32", ptx) is not None,
        "wide_offsets": "mul.wide.s32" in ptx or "mul.lo.s64" in ptx,
        # Software pipelining: async copies into shared memory (cp.async, or cp.async.bulk for TMA).
        "pipelined": "cp.async" in ptx,
        # What the variant asks for, from its flags (checked by the test).
        # Warpgroup MMA needs 64 rows per dot (the dot's rows: BLOCK_M forward, BLOCK_N for dW;
        # smaller tiles use mma.sync); float32 GEMMs with input_precision="ieee" (torch's default,
        # no TF32) run on FMA units.
        "wants_wgmma": _is_gemm(launch)
        and ("[bf16]" in launch.variant or flags.get("INPUT_PRECISION") == "tf32")
        and job.config.get("BLOCK_N" if launch.attr == "_WGRAD" else "BLOCK_M", 0) >= 64,
        "wants_tma_load": bool(flags.get("USE_TMA")),
        "wants_tma_store": bool(flags.get("USE_TMA")) and launch.attr == "_FWD" and not flags.get("SCATTER"),
        "wants_atomic_f32": bool(flags.get("SCATTER")),
        "wants_pipelined": _is_gemm(launch) and job.config.get("num_stages", 1) > 1,
    }


def _safe_compile(job: Job) -> dict[str, Any]:
    try:
        return compile_job(job)
    except Exception as exc:  # noqa: BLE001  (reported per job, the run goes on)
        return {"job": job.name(), "variant": job.launch.variant, "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


def run(jobs: list[Job], workers: int) -> Iterator[dict[str, Any]]:
    """Compile the jobs, ``workers`` processes at a time (forked: the recorded tensors are inherited)."""
    if workers <= 1:
        yield from map(_safe_compile, jobs)
        return
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_safe_compile, jobs, chunksize=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--all", action="store_true", help="every variant x every fitting config")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("sm90_compile: unset TRITON_INTERPRET (compiled kernels are built here)")
    import triton

    start = time.perf_counter()
    jobs = plan(record_launches(), every_config_everywhere=args.all)
    print(json.dumps({"triton": triton.__version__, "triton_path": os.path.dirname(triton.__file__), "jobs": len(jobs)}),
          flush=True)
    for result in run(jobs, args.jobs):
        print(json.dumps(result), flush=True)
    print(json.dumps({"done": True, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
