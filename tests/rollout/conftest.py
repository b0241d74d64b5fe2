"""Fixtures for the rollout tests: two tiny Qwen2 models that differ only in their seed."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.factory import TinyModelSpec, build_tiny_model, save_tiny_model
from posttrain.models.tokenizer import build_char_tokenizer
from posttrain.types import PromptRecord

PROBE_TEXT = "the quick brown fox: 12+34=46"


@pytest.fixture(scope="session")
def model_a_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(TinyModelSpec(seed=0), str(tmp_path_factory.mktemp("tiny_a")))


@pytest.fixture(scope="session")
def model_b() -> torch.nn.Module:
    return build_tiny_model(TinyModelSpec(seed=1)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def probe_ids(tokenizer) -> list[int]:
    return tokenizer.encode(PROBE_TEXT)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[PromptRecord]:
    texts = ["2+2=", "sort 3 1 2:", "hello"]
    return [PromptRecord(ordinal=i, text=t, token_ids=tokenizer.encode(t)) for i, t in enumerate(texts)]
