"""posttrain's MoE kernels inside a tiny transformers Qwen3-MoE: training parity and router metrics."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from posttrain.kernels import ops as kernel_ops
from posttrain.models.factory import TinyModelSpec
from posttrain.models.loading import ModelConfig, apply_moe_kernels, load_sequence_classifier
from posttrain.models.moe_experts import (
    TRITON_EXPERTS_KEY,
    router_aux_metrics,
    set_moe_kernels,
    track_router_metrics,
)


def _tiny_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=64,
    )


def _model(device: torch.device) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(_tiny_config()).to(device)


def _train_losses(kind: str, device: torch.device, steps: int = 4) -> list[float]:
    model = _model(device)
    set_moe_kernels(model, kind)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~25 s on 2 CPU cores: every kernel of 2 layers x 4 steps runs interpreted
def test_triton_experts_train_like_eager(device: torch.device) -> None:
    eager = _train_losses("eager", device)
    triton = _train_losses("triton", device)
    assert eager[-1] < eager[0]  # it learns, so the comparison covers gradients too
    # measured max |diff| over the 4 steps on CPU: 0.0 (bitwise equal, fp32, loss 4.15 -> 3.10);
    # the margin is for GPUs, where eager uses cuBLAS and the kernels another summation order
    assert triton == pytest.approx(eager, abs=1e-4)


def test_set_moe_kernels_switches_dispatch(device: torch.device) -> None:
    model = _model(device)
    set_moe_kernels(model, "triton")
    assert model.config._experts_implementation == TRITON_EXPERTS_KEY
    set_moe_kernels(model, "grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    config = _tiny_config()
    set_moe_kernels(config, "triton")
    assert config._experts_implementation == TRITON_EXPERTS_KEY
    with pytest.raises(ValueError, match="model.moe_kernels"):
        set_moe_kernels(model, "cutlass")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is a CPU-without-interpreter behaviour")
def test_triton_falls_back_to_reference_on_cpu_without_interpreter(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(kernel_ops, "_warned", set())  # the log line is once per process
    model = _model(torch.device("cpu"))
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    set_moe_kernels(model, "eager")
    want = model(input_ids=tokens).logits
    set_moe_kernels(model, "triton")
    with caplog.at_level(logging.WARNING, logger="posttrain.kernels.ops"):
        got = model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any("plain-torch reference" in r.getMessage() for r in caplog.records)


def test_router_aux_metrics_match_transformers_aux_loss(device: torch.device) -> None:
    model = _model(device)
    set_moe_kernels(model, "triton")
    assert track_router_metrics(model) == 2
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3)).to(device)
    out = model(input_ids=tokens, output_router_logits=True)
    metrics = router_aux_metrics(model)
    # measured |diff|: 0.0 (aux loss 2.049, top-2): same statistics, same float32 reductions
    assert metrics["moe/aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)
    fracs = [metrics[f"moe/load_frac/expert_{e}"] for e in range(4)]
    assert sum(fracs) == pytest.approx(1.0)
    assert max(fracs) <= metrics["moe/max_load_frac"] + 1e-7
    assert router_aux_metrics(model) == {}  # read resets


def _mixtral() -> PreTrainedModel:
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config)


def _deepseek_v3() -> PreTrainedModel:
    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return DeepseekV3ForCausalLM(config)


@pytest.mark.parametrize("build", [_mixtral, _deepseek_v3], ids=["mixtral", "deepseek_v3"])
def test_other_moe_families_forward_like_eager(build, device: torch.device) -> None:
    """Mixtral and DeepSeek-V3 (sigmoid group routing, shared expert) share the experts interface."""
    torch.manual_seed(0)
    model = build().to(device)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4)).to(device)
    set_moe_kernels(model, "eager")
    want = model(input_ids=tokens).logits
    set_moe_kernels(model, "triton")
    assert track_router_metrics(model) == 1
    got = model(input_ids=tokens).logits
    # measured max |diff|: 3e-8 for both (fp32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert router_aux_metrics(model)["moe/aux_loss"] > 0


def _olmoe() -> PreTrainedModel:
    config = OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    return OlmoeForCausalLM(config)


@pytest.mark.parametrize(
    "build",
    [_mixtral, _deepseek_v3, _olmoe, lambda: Qwen3MoeForCausalLM(_tiny_config())],
    ids=["mixtral", "deepseek_v3", "olmoe", "qwen3_moe"],
)
def test_moe_detected_by_module_structure(build) -> None:
    """DeepSeek-V3 has no config.num_experts (n_routed_experts), Mixtral num_local_experts: the
    experts modules are found by their 3-D weights, and every kind is applied, eager included."""
    torch.manual_seed(0)
    model = build()
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default, not the loop
    apply_moe_kernels(model, "triton")
    assert model.config._experts_implementation == TRITON_EXPERTS_KEY
    apply_moe_kernels(model, "eager")
    assert model.config._experts_implementation == "eager"
    apply_moe_kernels(model, "grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"


def test_dense_models_are_left_alone() -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(config)
    apply_moe_kernels(model, "triton")  # no experts: nothing to set, no error
    assert getattr(model.config, "_experts_implementation", None) != TRITON_EXPERTS_KEY


def test_eager_is_the_per_expert_loop() -> None:
    """"eager" runs the experts class's own forward (its per-expert loop), not torch._grouped_mm."""
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_tiny_config())
    apply_moe_kernels(model, "eager")
    experts = model.model.layers[0].mlp.experts
    calls = []
    original = torch.nn.functional.linear

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    hidden = torch.randn(6, 64)
    idx = torch.tensor([[0, 1]] * 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", counting_linear)
        experts(hidden, idx, torch.full((6, 2), 0.5))
    assert len(calls) == 4  # two experts hit x (gate_up, down): the loop
    model(input_ids=tokens)


def test_reward_model_gets_the_kernels() -> None:
    cfg = ModelConfig(factory=TinyModelSpec(arch="qwen3_moe", num_experts=4, num_experts_per_tok=2), moe_kernels="triton")
    model = load_sequence_classifier(cfg)
    assert model.config._experts_implementation == TRITON_EXPERTS_KEY
    cfg.moe_kernels = "eager"
    assert load_sequence_classifier(cfg).config._experts_implementation == "eager"


def test_router_metrics_do_not_call_bincount(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """bincount sizes its output from the max id, a host sync on CUDA; the counts use scatter_add."""
    model = _model(device)
    set_moe_kernels(model, "eager")
    track_router_metrics(model)

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount called in the router metrics")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    model(input_ids=torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6)).to(device))
    monkeypatch.undo()
    fracs = [v for k, v in router_aux_metrics(model).items() if k.startswith("moe/load_frac/")]
    assert sum(fracs) == pytest.approx(1.0)
