"""The per-device memory plan (``posttrain plan``, posttrain/plan.py), #23 item 6.

- Qwen2.5-1.5B on the GPU recipe (2 x 80 GiB, colocated): fits, with figures checked by hand;
- Qwen3-30B-A3B on 1 x 80 GiB: does not fit, and the plan names the knobs that make it fit;
- on CPU the plan's trainer figure agrees with the measured peak RSS rise within 25%.

The two configs are the published config.json files of the Hugging Face checkpoints (fields the
model builder reads); no weights exist anywhere in these tests: the plan builds the model on the
meta device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.engine.memory import can_measure_peak

QWEN25_1P5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
GIB = 2**30


def _model_dir(tmp_path, name: str, config: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _plan(repo_root, overrides):
    from posttrain.config.loader import load_recipe
    from posttrain.plan import plan_recipe

    cfg, _ = load_recipe(os.path.join(repo_root, "recipes/grpo_gpu_qwen_1p5b.yaml"), overrides)
    return plan_recipe(cfg)


def test_qwen25_1p5b_fits_two_80gb_gpus_colocated(tmp_path, repo_root, run_cli):
    path = _model_dir(tmp_path, "qwen1p5b", QWEN25_1P5B)
    plan = _plan(repo_root, [f"model.path={path}"])
    m = plan.inputs.model
    # Qwen2.5-1.5B: 1.54B parameters (the model card), the embedding tied to the head
    assert m.params == 1_543_714_304 and m.trainable == m.params
    (gpu,) = plan.devices
    assert gpu.count == 2 and plan.capacity == 80 * GIB
    train, generate = gpu.phases["train"], gpu.phases["generate"]
    # fp32 masters, FSDP over 2 ranks: 4 bytes x P / 2 each for params and grads, 8 x P / 2 for AdamW
    assert train["trainer params"] == (m.params + 1) // 2 * 4 and train["grads"] == train["trainer params"]
    assert train["optimizer state"] == 2 * train["trainer params"]
    # micro-batch 8 x 1536 tokens (prompt 1024 + 512 new, capped by max_model_len) x vocab, bf16
    assert plan.inputs.tokens_per_micro_batch == 8 * 1536
    # fused LM head (the default): blocks of 4M fp32 logits, never [tokens, vocab]
    assert plan.inputs.fused_head and train["logits"] == 4 * (1 << 22) * 4
    unfused = _plan(repo_root, [f"model.path={path}", "model.fused_lm_head=false"]).devices[0].phases["train"]
    assert unfused["logits"] >= 2 * 8 * 1536 * 151936 * 2  # logits + their gradient, bf16: 7 GiB
    # offload: nothing of the trainer on the device while the engine generates; bf16 engine weights
    assert generate["trainer params"] == generate["optimizer state"] == 0
    assert generate["engine weights"] == m.params * 2
    assert plan.fits and 40 * GIB < gpu.peak()[1] < 80 * GIB
    code, out, _ = run_cli("plan", os.path.join(repo_root, "recipes/grpo_gpu_qwen_1p5b.yaml"), f"model.path={path}")
    assert code == 0 and "verdict: fits" in out and "GPU (trainer rank + engine) x2" in out


def test_qwen3_30b_a3b_does_not_fit_one_80gb_gpu_and_names_the_knob(tmp_path, repo_root, run_cli):
    path = _model_dir(tmp_path, "qwen30b", QWEN3_30B_A3B)
    one_gpu = [f"model.path={path}", "trainer.world_size=1", "rollout.num_workers=1"]
    plan = _plan(repo_root, one_gpu)
    m = plan.inputs.model
    assert 30.4e9 < m.params < 30.6e9  # 30.5B total (3.3B active)
    assert m.mlp_width == 8 * 768  # activations follow the routed experts, not the dense width
    (gpu,) = plan.devices
    train = gpu.phases["train"]
    assert train["trainer params"] == m.params * 4  # 122 GB of fp32 masters on one device
    assert not plan.fits and gpu.peak()[1] > 80 * GIB
    # the engine's bf16 weights (61 GB) exceed 0.4 x 80 GiB: the budget check says so
    assert any("gpu_memory_utilization" in p for p in gpu.problems)
    assert plan.knobs and all("trainer.world_size=" in k for k in plan.knobs)
    # each suggestion, applied, fits
    from posttrain.plan import KNOB_KEYS

    for knob in plan.knobs:
        overrides = [kv for kv in knob.split("  (")[0].split() if kv.split("=")[0] in (*KNOB_KEYS.values(), "rollout.num_workers")]
        assert _plan(repo_root, [f"model.path={path}", *overrides]).fits, knob
    code, out, _ = run_cli("plan", os.path.join(repo_root, "recipes/grpo_gpu_qwen_1p5b.yaml"), *one_gpu)
    assert code == 5 and "DOES NOT FIT" in out and "turn one of" in out and "trainer.world_size=" in out


# --- plan vs measured, on CPU ---------------------------------------------------------------------

SPEC = dict(arch="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
            vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
MICRO, T, ACCUM = 4, 128, 2


def _cpu_plan_bytes() -> int:
    """The plan's trainer figure for SPEC on one CPU rank, fp32, no mixed precision, unfused head."""
    from posttrain.models.factory import TinyModelSpec
    from posttrain.models.loading import ModelConfig
    from posttrain.plan import PlanInputs, build_plan, meta_shape

    shape, _ = meta_shape(ModelConfig(factory=TinyModelSpec(**SPEC)))
    inputs = PlanInputs(model=shape, engine_model_params=shape.params, param_bytes=4, compute_bytes=4, mixed_precision=False,
                        world_size=1, tokens_per_micro_batch=MICRO * T, rows_per_micro_batch=MICRO,
                        activation_checkpointing=False, offload=False, reference=False, critic=False,
                        fused_head=False, gpu_memory_gib=80, on_gpu=False)  # fmt: skip
    (dev,) = build_plan(inputs).devices
    _, peak = dev.peak()  # the larger of forward/backward and the optimizer step
    return peak


def _measure() -> float:
    """In this fresh process: the peak RSS rise over building the model and its engine and two
    optimizer steps of ACCUM micro-batches (the second step has AdamW's state, the steady state)."""
    import torch

    torch.set_num_threads(1)
    from posttrain.algorithms.logprobs import token_logprobs
    from posttrain.engine.dist import launch
    from posttrain.engine.memory import PeakRSS
    from posttrain.engine.trainer import TrainEngine, TrainerConfig
    from posttrain.models.factory import TinyModelSpec, build_tiny_model

    def loss_fn(model, b, count):  # the unfused path: [B, T, V] logits, then the chunked logprob
        ids = b["input_ids_BT"]
        lp = token_logprobs(model(input_ids=ids, attention_mask=b["attention_mask_BT"]).logits[:, :-1], ids[:, 1:])
        return -lp.sum() / count, {}

    g = torch.Generator().manual_seed(0)
    mbs = [{"input_ids_BT": torch.randint(0, SPEC["vocab_size"], (MICRO, T), generator=g),
            "attention_mask_BT": torch.ones(MICRO, T, dtype=torch.long)} for _ in range(ACCUM)]  # fmt: skip
    cfg = TrainerConfig(max_steps=4, global_batch_size=MICRO * ACCUM, micro_batch_size=MICRO)
    out = {}

    def rank(_r, _w):
        # warm-up: the libraries' own allocations (autograd, thread pools) before the baseline
        small = TrainEngine(build_tiny_model(TinyModelSpec()), cfg, torch.device("cpu"))
        small.train_step([{k: v[:, :8] % 100 for k, v in mb.items()} for mb in mbs], loss_fn, lambda b: 1.0)
        del small
        with PeakRSS() as m:
            engine = TrainEngine(build_tiny_model(TinyModelSpec(**SPEC)), cfg, torch.device("cpu"))
            for _ in range(2):
                engine.train_step(mbs, loss_fn, lambda b: float(b["attention_mask_BT"].sum()))
        out["rise"] = m.extra_bytes

    launch(rank, 1)
    return out["rise"]


@pytest.mark.skipif(not can_measure_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_plan_matches_measured_peak_rss_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["rise"]
    planned = _cpu_plan_bytes()
    assert abs(planned - measured) <= 0.25 * measured, f"plan {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


if __name__ == "__main__":
    print(json.dumps({"rise": _measure()}))
