"""LoRA module invariants: merge == adapted forward, adapters off == base, only adapters train."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.engine.dist import launch
from posttrain.engine.trainer import TrainEngine, TrainerConfig
from posttrain.models.factory import TinyModelSpec, build_tiny_model
from posttrain.models.lora import (
    LoRAConfig,
    LoRATargetError,
    adapter_wire_tensors,
    adapters_disabled,
    apply_lora,
    lora_modules,
    merge_lora,
)

SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _adapted(targets=None, seed: int = 0):
    base = build_tiny_model(SPEC)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(r=4, alpha=8.0, **({"target_modules": targets} if targets else {}))
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at 0 (adapted == base): give it values so the tests can fail
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return base, model


def _ids():
    return torch.randint(4, 100, (3, 12), generator=torch.Generator().manual_seed(1))


def test_merge_equals_adapted_forward():
    _, model = _adapted()
    ids = _ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = merge_lora(copy.deepcopy(model))
        assert not list(lora_modules(merged))
        out = merged(input_ids=ids).logits
    assert (adapted - out).abs().max() < 1e-4  # fp32, one re-association of a rank-4 product
    # and the adapter does change the model (the test above could not pass with a no-op merge)
    assert (adapted - _adapted()[0](input_ids=ids).logits).abs().max() > 1e-2


def test_disabled_adapter_equals_base():
    base, model = _adapted()
    ids = _ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with adapters_disabled(model):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert (after - want).abs().max() > 1e-2  # re-enabled on exit


def test_only_adapters_get_grads_and_optimizer_state():
    _, model = _adapted(["q_proj", "v_proj"])
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_wire_tensors_carry_scaled_b():
    _, model = _adapted(["q_proj"])
    wire = dict(adapter_wire_tensors(model))
    name, m = next(iter(lora_modules(model)))
    assert torch.equal(wire[f"{name}.weight:lora_A"], m.lora_A.detach())
    assert torch.allclose(wire[f"{name}.weight:lora_B"] @ wire[f"{name}.weight:lora_A"], m.delta())


def test_unknown_target_is_an_error_naming_the_layers():
    with pytest.raises(LoRATargetError, match="q_proj"):
        apply_lora(build_tiny_model(SPEC), LoRAConfig(target_modules=["query"]))


def _fsdp_step(rank: int, world: int, out: dict) -> None:
    _, model = _adapted()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    cfg = TrainerConfig(global_batch_size=3, micro_batch_size=3, mixed_precision="bf16", max_steps=2)
    engine = TrainEngine(model, cfg, torch.device("cpu"))
    assert engine.sharded  # FSDP2 fully_shard (bf16 mixed precision forces it on one rank)
    (group,) = engine.optimizer.param_groups
    out["optimizer_params"] = len(group["params"])
    ids = _ids()
    loss_fn = lambda m, mb, n: (m(input_ids=mb["ids"], labels=mb["ids"]).loss, {})  # noqa: E731
    engine.train_step([{"ids": ids}], loss_fn, lambda mb: 1.0)
    full = engine.full_state_dict()
    out["base_changed"] = max(float((full[n] - v).abs().max()) for n, v in base_before.items() if n in full)
    out["lora_changed"] = max(float((full[n] - v).abs().max()) for n, v in lora_before.items())


def test_fsdp2_trains_adapters_only():
    out: dict = {}
    launch(_fsdp_step, 1, args=(out,), backend="gloo")
    assert out["optimizer_params"] == 2 * 7 * SPEC.num_layers  # A and B of 7 projections per layer
    assert out["base_changed"] == 0.0
    assert out["lora_changed"] > 0.0
