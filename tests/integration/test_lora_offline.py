"""LoRA end to end offline: SFT and DPO train adapters only (loss falls), the export is a PEFT
adapter, and ``posttrain export --merge`` writes a full model with the adapted model's logits."""

from __future__ import annotations

import json
import os

import torch

from posttrain.cli import main as cli_main
from posttrain.config.loader import load_recipe
from posttrain.metrics import read_metrics
from posttrain.offline.runner import run_offline

LORA = "model.lora={r: 8, alpha: 16}"


def _overrides(tmp, name, steps, extra=()):
    return [
        "model.factory.hidden_size=32", "model.factory.num_layers=2", "model.factory.num_heads=2", "model.factory.num_kv_heads=1",
        "model.factory.intermediate_size=64", "data.train.num_examples=128", "data.eval.num_examples=8",
        f"trainer.max_steps={steps}", "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.schedule.warmup_steps=0",
        f"run.output_dir={tmp}", f"run.name={name}", "logging.wandb.enabled=false", "logging.progress=false",
        "eval.every_steps=0", "checkpoint.every_steps=0", LORA, *extra,
    ]


def _run(recipe, overrides):
    import yaml

    cfg, resolved = load_recipe(recipe, overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:  # what `posttrain run` writes
        yaml.safe_dump(resolved, f, sort_keys=False)
    run_offline(cfg, resolved, run_dir)
    return cfg, run_dir, [m for m in read_metrics(run_dir) if "loss" in m]


def test_lora_sft_trains_and_merge_export_round_trips(tmp_path, repo_root):
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import load_causal_lm
    from posttrain.models.lora import load_adapter

    cfg, run_dir, steps = _run(os.path.join(repo_root, "recipes/sft_tiny_arith.yaml"), _overrides(tmp_path, "sft", 12, ["trainer.optim.lr=1e-2"]))
    losses = [m["loss"] for m in steps]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    hf = os.path.join(run_dir, "hf")
    assert sorted(f for f in os.listdir(hf) if f.startswith("adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(hf, "adapter_config.json")) as f:
        assert json.load(f)["r"] == 8
    # the adapted model (base rebuilt from the config + the exported adapter) vs the merged export
    adapted = load_causal_lm(cfg.model)
    load_adapter(adapted, hf)
    assert cli_main(["export", run_dir, "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "hf_merged"))
    base = load_causal_lm(type(cfg.model)(factory=cfg.model.factory))
    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (a - m).abs().max() < 1e-4
    assert (a - b).abs().max() > 1e-2  # training moved the adapted model away from the base


def test_lora_dpo_uses_base_as_reference_and_learns(tmp_path, repo_root):
    _, _, steps = _run(
        os.path.join(repo_root, "recipes/dpo_tiny_arith.yaml"),
        _overrides(tmp_path, "dpo", 20, ["trainer.optim.lr=1e-2", "algorithm.loss.beta=1.0", "checkpoint.export_hf=false"]),
    )
    losses = [m["loss"] for m in steps]
    # B = 0 at the start: policy == adapters-off reference, so the first sigmoid-DPO loss is log 2
    assert abs(losses[0] - 0.693147) < 1e-4, losses[0]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.03, losses  # per-step batches are noisy: the mean of the last 5
