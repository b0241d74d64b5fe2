"""What a first GPU run breaks unless the launch layer handles it, played on CPU.

- The TMA scratch allocator is per thread (Triton >= 3.5 keeps it in a ContextVar) and autograd runs
  the backward of CUDA tensors on its own device thread.
- The autotuner launches a kernel once per benchmark run of every config: a kernel that adds into a
  caller's buffer must have that buffer restored.
- float32 operands double the shared memory of a tile: pruning must keep configs that fit 227 KB.
"""

from __future__ import annotations

import threading

import pytest
import torch

from posttrain.kernels import grouped_gemm, launch
from posttrain.kernels import reference as ref

triton = pytest.importorskip("triton")
_allocation = pytest.importorskip("triton.runtime._allocation")

def test_a_launch_on_a_second_thread_finds_the_tma_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMA-path launch prepared on a new thread (as autograd's device thread is) has an allocator."""
    monkeypatch.setenv("POSTTRAIN_INTERPRET_TMA", "1")  # the interpreter takes the TMA code path
    x = torch.randn(20, 32)
    w = torch.randn(2, 16, 32)
    sizes = torch.tensor([12, 8], dtype=torch.int32)
    grouped_gemm.grouped_gemm_forward(x, w, sizes)  # main thread first: a once-per-process setup ran here
    seen: dict[str, object] = {}

    def backward_thread() -> None:
        try:
            seen["out"] = grouped_gemm.grouped_gemm_forward(x, w, sizes)
            seen["allocator"] = _allocation._allocator.get()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread below)
            seen["error"] = exc

    thread = threading.Thread(target=backward_thread)
    thread.start()
    thread.join()
    assert "error" not in seen, seen.get("error")
    assert not isinstance(seen["allocator"], _allocation.NullAllocator), "second thread kept Triton's null allocator"
    scratch = seen["allocator"](256, 128, None)
    assert scratch.numel() >= 256 and scratch.data_ptr() % 128 == 0
    torch.testing.assert_close(seen["out"], ref.grouped_gemm(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_prepare_tma_keeps_an_allocator_the_caller_set() -> None:
    """The caller's own allocator on this thread wins over posttrain's scratch allocator."""
    mine = []

    def custom(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        mine.append(size)
        return torch.empty(size, dtype=torch.int8)

    def in_thread() -> None:
        triton.set_allocator(custom)
        launch.prepare_tma()
        mine.append(_allocation._allocator.get() is custom)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert mine == [True]
