"""The device a weight transfer runs on: current device, streams and events, behind one small API.

GPU rules this plays (DESIGN.md, "GPU rules the code must obey"):

- CUDA's current device is per thread. A member of an update group captures its device when it
  joins (in the thread that joins: vLLM's worker main thread, where vLLM set it) and every thread
  that touches the group afterwards calls :meth:`Device.make_current` first.
- NCCL work (and a CUDA IPC copy) completes on the communication stream. A consumer on another
  stream reads the payload only after waiting on an event recorded on the communication stream,
  and a pooled buffer is written again only after an event recorded where its reader ran.

:class:`Device` does this with CUDA streams and events; on CPU every operation is synchronous
and the same calls are no-ops (:class:`HostEvent`), so CPU runs the same code path. Tests pass
their own :class:`Device` subclass (a per-thread fake current device, deferred fake streams) to
check that the code calls what a GPU needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch


class Event(Protocol):
    def record(self, stream: Any) -> None: ...
    def wait(self, stream: Any) -> None: ...
    def synchronize(self) -> None: ...


class HostEvent:
    """A CPU "event": host work is done when the call returns, so there is nothing to order."""

    def record(self, stream: Any) -> None:
        pass

    def wait(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaEvent:
    def __init__(self) -> None:
        self._event = torch.cuda.Event()

    def record(self, stream: Any) -> None:
        self._event.record(stream)

    def wait(self, stream: Any) -> None:
        stream.wait_event(self._event)

    def synchronize(self) -> None:
        self._event.synchronize()


class Device:
    """One transfer device: ``torch.device`` plus the per-thread and per-stream rules above.

    Build it with :func:`capture` in the thread whose current device is the one to use.
    """

    def __init__(self, device: torch.device) -> None:
        self.torch_device = device

    @property
    def type(self) -> str:
        return self.torch_device.type

    @property
    def index(self) -> int | None:
        return self.torch_device.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and type(other) is type(self) and other.torch_device == self.torch_device

    def __hash__(self) -> int:
        return hash(self.torch_device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"

    def make_current(self) -> None:
        """Set this device as the calling thread's current device (CPU: nothing to set)."""
        if self.type == "cuda":
            torch.cuda.set_device(self.torch_device)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of ``nbytes`` on this device (contents undefined)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def new_stream(self) -> Any:
        """A stream of its own for communication (CPU: None, host work is synchronous)."""
        return torch.cuda.Stream(self.torch_device) if self.type == "cuda" else None

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.torch_device) if self.type == "cuda" else None

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        """Run the block's device work on ``stream``."""
        if stream is None or self.type != "cuda":
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def new_event(self) -> Event:
        return _CudaEvent() if self.type == "cuda" else HostEvent()

    def keep_for(self, tensor: torch.Tensor, stream: Any) -> None:
        """``tensor`` (allocated on another stream) is read on ``stream``: the caching allocator must
        not hand its memory out again before that stream's queued reads ran (CPU: nothing)."""
        if stream is not None and tensor.is_cuda:
            tensor.record_stream(stream)


def capture(kind: str) -> Device:
    """The calling thread's current device of ``kind`` (``"cuda"`` or ``"cpu"``), captured now.

    Call it where a worker joins a group: later threads (a receiving thread, a Ray method thread)
    have their own current device, which vLLM never set.
    """
    if kind == "cuda":
        return Device(torch.device("cuda", torch.cuda.current_device()))
    return Device(torch.device("cpu"))
