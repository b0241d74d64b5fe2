"""When and how posttrain's Triton kernels run.

Triton decides between compiling a kernel and interpreting it (``TRITON_INTERPRET=1``) when
``triton.jit`` is applied. posttrain applies it lazily, at the first launch, so the decision follows
the environment at launch time rather than at import time: a test can switch the interpreter on
with ``monkeypatch.setenv`` without leaking it into other tests, whatever was imported first.

Rules:

- CUDA tensors: compiled kernels (or interpreted ones when ``TRITON_INTERPRET=1``).
- CPU tensors: interpreted kernels when ``TRITON_INTERPRET=1``; otherwise Triton cannot run them and
  callers fall back to :mod:`posttrain.kernels.reference` (see :func:`triton_available`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# Programs of a persistent kernel under the interpreter: small, but more than one so the
# round-robin tile loop is exercised.
INTERPRETER_NUM_PROGRAMS = 3


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Whether posttrain's Triton kernels can run on tensors living on ``device``."""
    if not _triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def num_programs(device: torch.device) -> int:
    """Grid size of a persistent kernel: one program per SM on CUDA, a few in the interpreter."""
    if device.type == "cuda" and not interpreter_enabled():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_NUM_PROGRAMS


def use_tma(device: torch.device) -> bool:
    """Device-side TMA descriptors: Hopper or newer and a Triton that has them.

    ``POSTTRAIN_DISABLE_TMA=1`` forces the pointer path (for A/B benchmarks and debugging);
    ``POSTTRAIN_INTERPRET_TMA=1`` runs the TMA path under the interpreter (tests).
    """
    if os.environ.get("POSTTRAIN_DISABLE_TMA") == "1":
        return False
    if interpreter_enabled():
        # The interpreter emulates descriptors; tests opt in to exercise the TMA code path on CPU.
        return os.environ.get("POSTTRAIN_INTERPRET_TMA") == "1"
    if device.type != "cuda":
        return False
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor") and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Scratch for device-side TMA descriptors (128 bytes per program), on the current device.

    Aligned as Triton asks (the CUDA caching allocator already aligns to 512 bytes; the host
    allocator of the CPU interpreter does not).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    buffer = torch.empty(size + alignment, dtype=torch.int8, device=device)
    offset = -buffer.data_ptr() % alignment
    return buffer[offset : offset + size]


def current_allocator() -> Any:
    """The allocator Triton would use for a launch from this thread.

    Since Triton 3.5 it lives in a ``contextvars.ContextVar`` (``triton.runtime._allocation``): each
    thread starts with Triton's null allocator, whatever another thread installed.
    """
    from triton.runtime import _allocation

    return _allocation._allocator.get()


def prepare_tma() -> None:
    """Install the TMA scratch allocator for the calling thread, unless one is already set.

    Called before every launch that builds device-side descriptors, not once per process: autograd
    runs the backward of CUDA tensors on its own device thread, which would otherwise see the null
    allocator and raise "Kernel requires a runtime memory allocation, but no allocator was set". An
    allocator the caller installed on this thread (anything but the null one) is kept.
    """
    import triton
    from triton.runtime import _allocation

    if isinstance(current_allocator(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


@contextlib.contextmanager
def _interpretable_triton_language() -> Iterator[None]:
    """Make triton.language's own ``@triton.jit`` helpers (tl.sum, tl.cdiv, ...) interpretable.

    Triton builds those helpers when it is imported: if ``TRITON_INTERPRET`` was not set then, they
    are compiled-only and an interpreted kernel calling them fails ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). For the duration of one interpreted launch, swap them for
    interpreted twins, then put the originals back.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped: list[tuple[object, str, object]] = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swapped.append((module, attr, value))
                setattr(module, attr, _interpreted_twin(value, InterpretedFunction))
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


_TWINS: dict[int, Any] = {}


def _interpreted_twin(jit_fn: Any, interpreted_cls: type) -> Any:
    twin = _TWINS.get(id(jit_fn))
    if twin is None:
        twin = _TWINS[id(jit_fn)] = interpreted_cls(jit_fn.fn)
    return twin


# Set to "1" to launch every autotuned kernel with its first config that survives pruning (no
# benchmarking, one compile per key): correctness runs on a cold cache, where tuning costs minutes.
SINGLE_CONFIG_ENV = "POSTTRAIN_AUTOTUNE_SINGLE_CONFIG"


class LazyKernel:
    """A Triton kernel source whose ``triton.jit`` (and optional autotune) is applied at first launch.

    One compiled object is kept per interpreter mode. Kernels wrapped this way must not call other
    ``@triton.jit`` helpers: the kernels in this package are self-contained for that reason.

    ``restore_value`` names the arguments the kernel accumulates into (read-modify-write): the
    autotuner launches the kernel once per benchmark run of each config, so without a restore each
    of those launches would add into the caller's buffer again.
    """

    def __init__(
        self,
        fn: Callable[..., None],
        autotune_configs: Callable[[], Sequence[Any]] | None = None,
        autotune_key: Sequence[str] = (),
        early_config_prune: Callable[..., list[Any]] | None = None,
        restore_value: Sequence[str] = (),
    ) -> None:
        self.fn = fn
        self._autotune_configs = autotune_configs
        self._autotune_key = list(autotune_key)
        self._prune = early_config_prune
        self.restore_value = list(restore_value)
        self._built: dict[bool, Any] = {}

    def _pruned(self, configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        kept = self._prune(configs, named_args, **kwargs) if self._prune is not None else list(configs)
        if os.environ.get(SINGLE_CONFIG_ENV) == "1":
            return kept[:1]
        return kept

    def autotune(
        self, kernel: Any, configs: Sequence[Any] | None = None, do_bench: Callable[..., Any] | None = None
    ) -> Any:
        """``kernel`` (a jitted or interpreted function) under this kernel's autotuner.

        ``configs`` replaces the config list and ``do_bench`` Triton's benchmarker (tests run the
        autotuner on CPU with small configs and a benchmarker that just launches).
        """
        import triton

        extra = {"do_bench": do_bench} if do_bench is not None else {}
        chosen = configs if configs is not None else self._autotune_configs()
        return triton.autotune(
            configs=list(chosen),
            key=self._autotune_key,
            prune_configs_by={"early_config_prune": self._pruned},
            restore_value=self.restore_value or None,
            **extra,
        )(kernel)

    def _build(self, interpret: bool) -> Any:
        import triton

        kernel = triton.jit(self.fn)
        if self._autotune_configs is not None and not interpret:
            kernel = self.autotune(kernel)
        return kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        interpret = interpreter_enabled()
        if interpret not in self._built:
            self._built[interpret] = self._build(interpret)
        launch = self._built[interpret][grid]
        if not interpret:
            return launch

        def interpreted_launch(*args: Any, **kwargs: Any) -> Any:
            with _interpretable_triton_language():
                return launch(*args, **kwargs)

        return interpreted_launch

    @property
    def autotuned(self) -> bool:
        """True when the current mode launches through ``triton.autotune`` (block sizes come from it)."""
        return self._autotune_configs is not None and not interpreter_enabled()


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()
