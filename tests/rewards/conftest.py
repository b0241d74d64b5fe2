"""Shared helpers for reward tests: building Groups of completions from plain strings."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from posttrain.types import Completion, Group, PromptRecord


def make_group(prompt: str, completions: list[str], ordinal: int = 0, **fields: object) -> Group:
    """A Group whose completions' token ids are one per character (as with the char tokenizer)."""
    record = PromptRecord(
        ordinal=ordinal, text=prompt, token_ids=[ord(c) for c in prompt], fields=dict(fields)
    )
    comps = [
        Completion(
            prompt=record,
            sample_index=i,
            token_ids=[ord(c) for c in text],
            text=text,
            logprobs=[0.0] * len(text),
            versions=[0] * len(text),
            finish_reason="stop",
        )
        for i, text in enumerate(completions)
    ]
    return Group(prompt=record, completions=comps)


@pytest.fixture
def group_of() -> Callable[..., Group]:
    return make_group


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny sequence-classification checkpoint (one label) with the char tokenizer: a reward model."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.factory import TinyModelSpec, build_config
    from posttrain.models.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("rm")
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config = build_config(spec)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return str(path)
