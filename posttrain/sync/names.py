"""Trainer parameter names and layouts -> the rollout engine's checkpoint names and layouts.

The trainer's state dict is what ``posttrain.models`` built; the engine serves the Hugging Face
checkpoint layout. For dense models they are the same. :func:`engine_tensors` is the one place
where they may differ, applied on the sender before packing (all trainer ranks, same order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def engine_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(trainer name, tensor)`` -> ``(engine name, tensor)``, in the trainer's order."""
    yield from tensors
