"""Grouped GEMM: posttrain's persistent Triton kernel vs a per-expert torch.matmul loop vs torch._grouped_mm.

Shapes are MetaShuffling's (bf16; M is tokens per group, N output and K input features per group):
prefill G=16 M=1024 N=2048 K=5120, G=16 M=1024 N=5120 K=1024, G=128 M=128 (same N, K), and decode
G=16 M=8, G=128 M=1. Reports forward and forward+backward time and TFLOP/s side by side.

    python bench/moe/bench_grouped_gemm.py          # CUDA: prints and writes bench/results/moe_grouped_gemm.json
    python bench/moe/bench_grouped_gemm.py --smoke  # CPU interpreter, tiny shapes, no result file

Result ``ratio`` = loop time / posttrain time, forward, first prefill shape (>1: posttrain faster).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from moe_bench_common import parse_args, require_cuda_or_exit, time_ms, write_result

from posttrain.kernels import triton_ops

SHAPES = [  # (G, M per group, N, K)
    (16, 1024, 2048, 5120),
    (16, 1024, 5120, 1024),
    (128, 128, 2048, 5120),
    (128, 128, 5120, 1024),
    (16, 8, 2048, 5120),
    (16, 8, 5120, 1024),
    (128, 1, 2048, 5120),
    (128, 1, 5120, 1024),
]
SMOKE_SHAPES = [(4, 24, 40, 48), (8, 1, 40, 48)]


def _loop(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Baseline: one matmul launch per expert, sizes known on the host."""
    outs, start = [], 0
    for g, size in enumerate(sizes):
        outs.append(x[start : start + size] @ w[g].t())
        start += size
    return torch.cat(outs)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


def _train(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
):
    def step() -> None:
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        fn(xr, wr).backward(grad)

    return step


def bench_shape(groups: int, m: int, n: int, k: int, device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(groups * m, k, device=device, generator=gen).bfloat16()
    w = (torch.randn(groups, n, k, device=device, generator=gen) / k**0.5).bfloat16()
    grad = torch.randn(groups * m, n, device=device, generator=gen).bfloat16()
    sizes_dev = torch.full((groups,), m, dtype=torch.int32, device=device)
    offsets = torch.cumsum(sizes_dev, 0, dtype=torch.int32)
    sizes = [m] * groups

    impls: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "posttrain": lambda a, b: triton_ops.grouped_gemm(a, b, sizes_dev),
        "loop": lambda a, b: _loop(a, b, sizes),
        "torch_grouped_mm": lambda a, b: _grouped_mm(a, b, offsets),
    }
    want = _loop(x, w, sizes).float()
    row: dict[str, float] = {}
    flop = 2.0 * groups * m * n * k
    for name, fn in impls.items():
        try:
            err = (fn(x, w).float() - want).abs().max().item()
            row[f"{name}_fwd_ms"] = time_ms(lambda fn=fn: fn(x, w), device)
            row[f"{name}_fwdbwd_ms"] = time_ms(_train(fn, x, w, grad), device)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. torch._grouped_mm unsupported here
            print(f"  {name}: unavailable ({str(exc).splitlines()[0][:100]})")
            continue
        row[f"{name}_max_abs_err_vs_loop"] = err
        row[f"{name}_fwd_tflops"] = flop / row[f"{name}_fwd_ms"] / 1e9
        row[f"{name}_fwdbwd_tflops"] = 3 * flop / row[f"{name}_fwdbwd_ms"] / 1e9
    return row


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = require_cuda_or_exit(args.smoke)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows = []
    header = f"{'G':>4} {'M':>5} {'N':>5} {'K':>5} | {'pass':6} | {'posttrain':>16} {'loop':>16} {'grouped_mm':>16} | vs loop  vs gmm"
    print(header)
    for groups, m, n, k in shapes:
        row = {"G": groups, "M": m, "N": n, "K": k, **bench_shape(groups, m, n, k, device)}
        rows.append(row)
        for phase in ("fwd", "fwdbwd"):
            cells = []
            for impl in ("posttrain", "loop", "torch_grouped_mm"):
                ms = row.get(f"{impl}_{phase}_ms")
                tf = row.get(f"{impl}_{phase}_tflops")
                cells.append(f"{ms * 1e3:8.1f}us {tf:5.0f}TF" if ms else f"{'n/a':>16}")
            ours = row.get(f"posttrain_{phase}_ms")
            vs_loop = row.get(f"loop_{phase}_ms", float("nan")) / ours if ours else float("nan")
            vs_gmm = row.get(f"torch_grouped_mm_{phase}_ms", float("nan")) / ours if ours else float("nan")
            print(
                f"{groups:>4} {m:>5} {n:>5} {k:>5} | {phase:6} | {' '.join(cells)} | {vs_loop:6.2f}x {vs_gmm:6.2f}x"
            )
    if args.smoke:
        print("smoke run: no result file written (interpreter timings are not performance numbers)")
        return
    first = rows[0]
    write_result(
        "moe_grouped_gemm",
        device,
        {
            "baseline": "per-expert torch.matmul loop (forward), bf16 G=16 M=1024 N=2048 K=5120",
            "value": first["posttrain_fwd_ms"] * 1e3,
            "baseline_value": first["loop_fwd_ms"] * 1e3,
            "unit": "us",
            "ratio": first["loop_fwd_ms"] / first["posttrain_fwd_ms"],
            "raw": rows,
        },
    )


if __name__ == "__main__":
    main()
