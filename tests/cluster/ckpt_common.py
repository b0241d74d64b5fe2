"""A tiny trainer engine for checkpoint tests (one rank, CPU)."""

from __future__ import annotations

import torch

from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig
from posttrain.models.factory import TinyModelSpec, build_tiny_model

SPEC = TinyModelSpec(
    arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3
)


def tiny_engine(seed: int = 0) -> TrainEngine:
    """Call inside ``launch``: the engine needs a process group."""
    torch.manual_seed(seed)
    cfg = TrainerConfig(max_steps=4, global_batch_size=2, micro_batch_size=2, optim=OptimConfig(lr=1e-2))
    return TrainEngine(build_tiny_model(SPEC), cfg, torch.device("cpu"))
