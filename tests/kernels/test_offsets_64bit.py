"""Grouped GEMM element offsets past 2**31 (rows x stride, group x stride, gathered rows, scattered
rows, dW rows), interpreted on CPU with small tiles and 2**30-element strides.

The probe runs in a fresh process: an int32 offset wraps negative and reads before the buffer,
which can kill the process (the pre-fix kernel segfaults here), and the interpreter must be on
from the start. Pointer and TMA-descriptor paths both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offsets_64bit_probe.py")
CASES = ("x_rows", "w_groups", "out_rows", "gather_scatter", "wgrad_rows")


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_offsets_past_2_31_elements(tma: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("POSTTRAIN_DISABLE_TMA", None)
    if tma:
        env["POSTTRAIN_INTERPRET_TMA"] = "1"
    else:
        env.pop("POSTTRAIN_INTERPRET_TMA", None)
    proc = subprocess.run([sys.executable, PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    for case in CASES:
        assert f"OK {case}" in proc.stdout
