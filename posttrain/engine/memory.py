"""Host memory measurement on Linux: the rise of a process's peak RSS over a block of code.

``/proc/self/clear_refs`` (write ``5``) resets the peak (VmHWM) to the current RSS; the rise is
VmHWM at the end minus VmRSS at the start. Benchmarks and memory tests use it to show what one
operation holds at its peak (a weight sync's buckets, a forward's logits).
"""

from __future__ import annotations

import os

CLEAR_REFS = "/proc/self/clear_refs"


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def can_measure_peak() -> bool:
    return os.access(CLEAR_REFS, os.W_OK)


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.extra_bytes``: the rise of the peak RSS over the RSS at
    entry, in bytes."""

    def __enter__(self) -> PeakRSS:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.start = status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.extra_bytes = (status_kib("VmHWM") - self.start) * 1024
