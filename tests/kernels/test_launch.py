"""What a first GPU run breaks unless the launch layer handles it, played on CPU.

- The TMA scratch allocator is per thread (Triton >= 3.5 keeps it in a ContextVar) and autograd runs
  the backward of CUDA tensors on its own device thread.
- The autotuner launches a kernel once per benchmark run of every config: a kernel that adds into a
  caller's buffer must have that buffer restored.
- float32 operands double the shared memory of a tile: pruning must keep configs that fit 227 KB.
"""

from __future__ import annotations

import inspect
import re
import threading

import pytest
import torch

from posttrain.kernels import gather_scatter, grouped_gemm, index_shuffling, launch, swiglu
from posttrain.kernels import reference as ref

triton = pytest.importorskip("triton")
_allocation = pytest.importorskip("triton.runtime._allocation")

KERNEL_MODULES = (gather_scatter, grouped_gemm, index_shuffling, swiglu)


def _autotuned_kernels() -> list[tuple[str, launch.LazyKernel]]:
    """Every autotuned kernel of the package, by module and name."""
    return [
        (f"{module.__name__.rsplit('.', 1)[-1]}.{name}", value)
        for module in KERNEL_MODULES
        for name, value in vars(module).items()
        if isinstance(value, launch.LazyKernel) and value._autotune_configs is not None
    ]


def test_a_launch_on_a_second_thread_finds_the_tma_allocator(
    monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """A TMA-path launch prepared on a new thread (as autograd's device thread is) has an allocator.

    On a Hopper GPU the launch really builds device-side descriptors (and raised before the fix);
    on CPU the interpreter takes the same code path (POSTTRAIN_INTERPRET_TMA).
    """
    monkeypatch.setenv("POSTTRAIN_INTERPRET_TMA", "1")
    x = torch.randn(20, 32, device=device)
    w = torch.randn(2, 16, 32, device=device)
    sizes = torch.tensor([12, 8], dtype=torch.int32, device=device)
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
    assert scratch.numel() == 256 and scratch.data_ptr() % 128 == 0
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


def _accumulated_args(fn: object) -> set[str]:
    """Pointer arguments a kernel adds into: the first argument of each ``tl.atomic_add``."""
    return set(re.findall(r"tl\.atomic_(?:add|max|min|and|or|xor)\(\s*(\w+)", inspect.getsource(fn)))


@pytest.mark.parametrize("name_kernel", _autotuned_kernels(), ids=lambda nk: nk[0])
def test_autotuned_kernels_restore_what_they_accumulate_into(name_kernel: tuple[str, launch.LazyKernel]) -> None:
    """Every autotuned kernel lists the buffers it accumulates into in restore_value / reset_to_zero."""
    name, kernel = name_kernel
    tuner = kernel._build(interpret=False)  # what a CUDA launch gets: triton.autotune(triton.jit(fn))
    protected = set(tuner.restore_value) | set(tuner.reset_to_zero)
    pointers = {arg.split("+")[0].strip() for arg in _accumulated_args(kernel.fn)}
    assert pointers <= protected, f"{name} accumulates into {pointers - protected} without a restore"


def test_the_forward_kernel_accumulates_through_atomics() -> None:
    """Guards the scan above: the grouped GEMMs are found and the scatter epilogue is seen."""
    assert {"grouped_gemm._FWD", "grouped_gemm._WGRAD"} <= {name for name, _ in _autotuned_kernels()}
    assert _accumulated_args(grouped_gemm._grouped_gemm_kernel) == {"out_ptr"}


def test_autotuning_a_scatter_launch_leaves_the_output_as_one_launch_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autotuner's benchmark launches (two per config here) must not add into ``out`` again.

    Triton's autotuner around the interpreted kernel, on CPU, with a benchmarker that only launches.
    """
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also on a GPU machine: this test runs on CPU tensors

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=3)
        for bm in (16, 32)
    ]

    def bench_twice(kernel_call, quantiles):  # Triton's benchmarker, minus the timing
        kernel_call()
        kernel_call()
        return [1.0, 1.0, 1.0]

    kernel = grouped_gemm._FWD.autotune(InterpretedFunction(grouped_gemm._FWD.fn), configs, bench_twice)
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, n_out, sizes_list = 9, 32, 24, [5, 0, 7, 6]
    rows = sum(sizes_list)
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.randn(len(sizes_list), n_out, hidden, generator=gen)
    a_idx = torch.randint(0, tokens, (rows,), generator=gen, dtype=torch.int32)
    c_idx = torch.randint(0, tokens, (rows,), generator=gen, dtype=torch.int32)
    scale = torch.rand(rows, generator=gen)
    sizes = torch.tensor(sizes_list, dtype=torch.int32)
    out = torch.zeros(tokens, n_out)
    with launch._interpretable_triton_language():
        kernel[(3,)](
            x, w, out, sizes, a_idx, c_idx, scale,
            rows, n_out, hidden, len(sizes_list), triton.next_power_of_2(rows),
            x.stride(0), x.stride(1), w.stride(0), w.stride(2), w.stride(1), out.stride(0), out.stride(1),
            USE_TMA=False, B_N_CONTIGUOUS=False, A_GATHER=True, SCATTER=True, HAS_SCALE=True,
            UPCAST_DOT=True, INPUT_PRECISION="ieee",
        )
    rows_out = ref.grouped_gemm(x[a_idx.long()], w, sizes) * scale[:, None]
    want = torch.zeros(tokens, n_out).index_add_(0, c_idx.long(), rows_out)
    # Without the restore: 1 + 2 configs x 2 benchmark launches = 5x the truth.
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


SMEM_PER_BLOCK = 232448  # H100 / H200, bytes


def _smem_needed(config: object, in_bytes: int, out_bytes: int, wgrad: bool) -> int:
    """The issue's estimate: stages x (both operand tiles) x element size, plus the output tile."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    operands, out_tile = (bn * bm + bm * bk, bn * bk) if wgrad else (bm * bk + bk * bn, bm * bn)
    return config.num_stages * operands * in_bytes + out_tile * out_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m_bucket", [1, 16, 64, 256, 1024, 4096, 16384, 131072])
@pytest.mark.parametrize("groups", [1, 8, 64, 256])
def test_every_pruned_config_fits_shared_memory(dtype: torch.dtype, m_bucket: int, groups: int) -> None:
    """For each dtype and (M_BUCKET, G) key the pruning keeps configs, all within the H100's 227 KB."""
    operand = torch.empty(0, dtype=dtype)
    fp32 = torch.empty(0, dtype=torch.float32)
    key = {"M_BUCKET": m_bucket, "G": groups}
    cases = {  # kernel, named arguments the pruning sees, output tensor, weight-gradient tiling
        "forward": (grouped_gemm._FWD, {"x_ptr": operand, "out_ptr": operand}, operand, False),
        "forward_scatter": (grouped_gemm._FWD, {"x_ptr": operand, "out_ptr": fp32}, fp32, False),
        "wgrad": (grouped_gemm._WGRAD, {"x_ptr": operand, "dw_ptr": operand}, operand, True),
    }
    for name, (kernel, tensors, out, wgrad) in cases.items():
        kept = kernel._prune(kernel._autotune_configs(), {**tensors, **key})
        assert kept, name
        for config in kept:
            need = _smem_needed(config, dtype.itemsize, out.element_size(), wgrad)
            assert need <= SMEM_PER_BLOCK - 2048, f"{name} {config}: {need} bytes"
