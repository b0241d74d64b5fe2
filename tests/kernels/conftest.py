"""Kernel tests run the Triton kernels compiled on CUDA, interpreted (TRITON_INTERPRET=1) on CPU.

posttrain applies ``triton.jit`` at the first launch (posttrain.kernels.launch.LazyKernel), so the
interpreter is switched on per test with monkeypatch: nothing leaks into other test folders,
whatever imported triton or posttrain first.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_interpreter_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpret Triton kernels when there is no GPU; leave the environment alone otherwise."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
