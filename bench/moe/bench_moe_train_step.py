"""End-to-end training step of a small Qwen3-MoE model, per experts implementation.

One step = forward + backward + AdamW on a bf16 model; reports tokens/s for transformers' "eager"
(per-expert loop), "grouped_mm" (torch._grouped_mm, the transformers default) and posttrain's
"triton" kernels, and checks their first-step losses agree.

    python bench/moe/bench_moe_train_step.py          # CUDA: writes bench/results/moe_train_step.json
    python bench/moe/bench_moe_train_step.py --smoke  # CPU interpreter, tiny model, no result file

Result ``ratio`` = grouped_mm step time / triton step time (>1: posttrain faster).
"""

from __future__ import annotations

import torch
from moe_bench_common import parse_args, require_cuda_or_exit, time_ms, write_result
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from posttrain.models.moe_experts import set_moe_kernels

KINDS = ("eager", "grouped_mm", "triton")


def _config(smoke: bool) -> tuple[Qwen3MoeConfig, int, int]:
    """Model config, batch size, sequence length."""
    if smoke:
        size = {
            "hidden_size": 64,
            "moe_intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 128,
        }
        return Qwen3MoeConfig(intermediate_size=96, **size), 1, 16
    size = {
        "hidden_size": 1024,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 8192,
    }
    return Qwen3MoeConfig(intermediate_size=2816, max_position_embeddings=4096, **size), 4, 2048


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = require_cuda_or_exit(args.smoke)
    config, batch, seq = _config(args.smoke)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    rows = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(config).to(device, torch.bfloat16)
        set_moe_kernels(model, kind)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
        first_loss = model(input_ids=tokens, labels=tokens).loss.item()

        def step(model: Qwen3MoeForCausalLM = model, optim: torch.optim.Optimizer = optim) -> None:
            model(input_ids=tokens, labels=tokens).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        ms = time_ms(step, device)
        rows[kind] = {"step_ms": ms, "tokens_per_s": batch * seq / ms * 1e3, "first_loss": first_loss}
        print(
            f"{kind:>10}: {ms:9.2f} ms/step  {rows[kind]['tokens_per_s']:10.0f} tok/s  first loss {first_loss:.4f}"
        )
        del model, optim
    if args.smoke:
        print("smoke run: no result file written (interpreter timings are not performance numbers)")
        return
    write_result(
        "moe_train_step",
        device,
        {
            "baseline": "transformers grouped_mm experts (torch._grouped_mm), same model and batch",
            "value": rows["triton"]["tokens_per_s"],
            "baseline_value": rows["grouped_mm"]["tokens_per_s"],
            "unit": "tokens/s",
            "ratio": rows["triton"]["tokens_per_s"] / rows["grouped_mm"]["tokens_per_s"],
            "model": config.to_diff_dict(),
            "batch": batch,
            "seq_len": seq,
            "raw": rows,
        },
    )


if __name__ == "__main__":
    main()
