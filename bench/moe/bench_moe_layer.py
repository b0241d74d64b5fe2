"""A DeepSeek-V3-16B-like routed-experts layer, forward + backward: posttrain's fused kernels vs
transformers' per-expert loop ("eager") and torch._grouped_mm ("grouped_mm").

64 experts, top-6, hidden 2048, expert intermediate 1408, bf16; T in {8192, 16384} tokens, routing
balanced (random scores) or skewed (a quarter of the experts take ~3/4 of the pairs). Each
implementation runs through the same transformers experts module (Qwen3MoeExperts), switched with
``config._experts_implementation``, and is checked against the per-expert loop first.

    python bench/moe/bench_moe_layer.py          # CUDA: writes bench/results/moe_layer.json
    python bench/moe/bench_moe_layer.py --smoke  # CPU, Triton interpreter, tiny shapes, no file

Result ``ratio`` = per-expert loop time / posttrain time, forward + backward, T=16384 balanced
(>1: posttrain faster; the issue's goal is >= 2). ``raw`` has every row, torch._grouped_mm too.
"""

from __future__ import annotations

import torch
from moe_bench_common import parse_args, require_cuda_or_exit, time_ms, write_result
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import posttrain.models.moe_experts  # noqa: F401  (registers "posttrain_triton")

FULL = {"experts": 64, "top_k": 6, "hidden": 2048, "inter": 1408, "tokens": [8192, 16384]}
SMOKE = {"experts": 8, "top_k": 2, "hidden": 32, "inter": 24, "tokens": [48]}
KINDS = {"posttrain": "posttrain_triton", "loop": "eager", "grouped_mm": "grouped_mm"}


def routing(tokens: int, experts: int, top_k: int, skew: bool, device: torch.device, gen: torch.Generator):
    """(top_k_index [T, k], top_k_weights [T, k]) from random router scores; skew boosts E/4 experts."""
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    if skew:
        logits[:, : experts // 4] += 2.0
    weights, index = torch.topk(logits.softmax(-1), top_k)
    return index, weights / weights.sum(-1, keepdim=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = require_cuda_or_exit(args.smoke)
    shape = SMOKE if args.smoke else FULL
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"],
        moe_intermediate_size=shape["inter"],
        num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
    )
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(config).to(device, dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    rows = []
    for tokens in shape["tokens"]:
        for skew in (False, True):
            gen = torch.Generator(device=device).manual_seed(tokens + skew)
            index, weights = routing(tokens, shape["experts"], shape["top_k"], skew, device, gen)
            x = torch.randn(tokens, shape["hidden"], device=device, dtype=dtype, generator=gen)
            grad = torch.randn(tokens, shape["hidden"], device=device, dtype=dtype, generator=gen)
            leaf_x = x.clone().requires_grad_()
            leaf_w = weights.clone().requires_grad_()

            def fwd(kind: str, x=leaf_x, index=index, w=leaf_w) -> torch.Tensor:
                config._experts_implementation = KINDS[kind]
                return experts(x, index, w)

            def fwd_bwd(kind: str, grad=grad) -> None:
                fwd(kind).backward(grad)

            want = fwd("loop").float()
            counts = torch.bincount(index.reshape(-1), minlength=shape["experts"])
            row = {"T": tokens, "skew": skew, "counts_min_max": [int(counts.min()), int(counts.max())]}
            for kind in KINDS:
                got = fwd(kind).float()
                row[f"{kind}_rel_err_vs_loop"] = ((got - want).norm() / want.norm()).item()
                with torch.no_grad():
                    row[f"{kind}_fwd_ms"] = time_ms(lambda k=kind: fwd(k), device)
                row[f"{kind}_fwd_bwd_ms"] = time_ms(lambda k=kind: fwd_bwd(k), device)
                experts.zero_grad(set_to_none=True)
                leaf_x.grad = leaf_w.grad = None
            for base in ("loop", "grouped_mm"):
                row[f"speedup_fwd_bwd_vs_{base}"] = row[f"{base}_fwd_bwd_ms"] / row["posttrain_fwd_bwd_ms"]
                row[f"speedup_fwd_vs_{base}"] = row[f"{base}_fwd_ms"] / row["posttrain_fwd_ms"]
            rows.append(row)
            print(
                f"T={tokens:>6} skew={skew!s:5} | fwd+bwd ms: posttrain {row['posttrain_fwd_bwd_ms']:.2f} "
                f"loop {row['loop_fwd_bwd_ms']:.2f} grouped_mm {row['grouped_mm_fwd_bwd_ms']:.2f} | "
                f"rel err vs loop {row['posttrain_rel_err_vs_loop']:.2e}"
            )
            # fp32 smoke: the kernels and the loop differ by summation order only
            assert row["posttrain_rel_err_vs_loop"] < (1e-5 if args.smoke else 3e-2), row
    if args.smoke:
        print("smoke run: no result file written (interpreter timings are not performance numbers)")
        return
    head = next(r for r in rows if r["T"] == 16384 and not r["skew"])
    write_result(
        "moe_layer",
        device,
        {
            "baseline": "transformers per-expert loop (eager), fwd+bwd, E=64 top-6 H=2048 I=1408 bf16, T=16384 balanced",
            "value": head["posttrain_fwd_bwd_ms"],
            "baseline_value": head["loop_fwd_bwd_ms"],
            "unit": "ms",
            "ratio": head["speedup_fwd_bwd_vs_loop"],
            "ratio_vs_torch_grouped_mm": head["speedup_fwd_bwd_vs_grouped_mm"],
            "raw": rows,
        },
    )


if __name__ == "__main__":
    main()
