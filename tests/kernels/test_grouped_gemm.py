"""Persistent grouped GEMM (forward, dX, dW) against the plain-torch reference.

Tolerances: the kernel and the reference both accumulate in float32 and round once to the output
dtype, so they differ by accumulation order only: float32 at ~1e-6 relative, bfloat16 by at most
one rounding step (2**-8 relative, half an ulp each way) of the output.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.kernels import reference as ref
from posttrain.kernels import triton_ops as tri

# (rtol, atol) per dtype. Measured max |kernel - reference| over these cases (CPU interpreter):
# float32 3.8e-6 on values up to ~26 (1.5e-7 relative); bfloat16 0.125 on values up to ~26, i.e.
# a single bf16 rounding step (ulp is 0.125 in [16, 32)); the TMA path the same.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 1e-2)}

CASES = {
    "zero_sized_groups": ([5, 0, 33, 1, 0], 0),
    "one_group_takes_all": ([0, 0, 40, 0], 0),
    "tail_rows_past_sum": ([3, 17, 0, 9], 11),
    "single_group": ([21], 0),
}


def _run(impl, x: torch.Tensor, w: torch.Tensor, sizes: torch.Tensor, transposed: bool, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = impl.grouped_gemm(x, w, sizes, transposed)
    out.backward(grad)
    return out, x.grad, w.grad


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("transposed", [False, True], ids=["w_GNK", "w_GKN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_gemm_forward_backward(
    case: str, transposed: bool, dtype: torch.dtype, device: torch.device
) -> None:
    sizes_list, tail = CASES[case]
    gen = torch.Generator().manual_seed(len(sizes_list) + tail)
    groups, n_out, k_in = len(sizes_list), 24, 40  # neither a multiple of the 32-wide interpreter blocks
    rows = sum(sizes_list) + tail
    x = torch.randn(rows, k_in, generator=gen).to(device, dtype)
    w_shape = (groups, k_in, n_out) if transposed else (groups, n_out, k_in)
    w = torch.randn(w_shape, generator=gen).to(device, dtype)
    sizes = torch.tensor(sizes_list, dtype=torch.int32, device=device)
    grad = torch.randn(rows, n_out, generator=gen).to(device, dtype)

    got = _run(tri, x, w, sizes, transposed, grad)
    want = _run(ref, x, w, sizes, transposed, grad)
    rtol, atol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "dx", "dw"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    if tail:
        assert torch.count_nonzero(got[0][-tail:]) == 0  # rows past sum(m_sizes) are zero
        assert torch.count_nonzero(got[1][-tail:]) == 0
    for g, size in enumerate(sizes_list):
        if size == 0:
            assert torch.count_nonzero(got[2][g]) == 0  # empty groups get a zero weight gradient


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter-only: on GPU the TMA path is picked by capability"
)
def test_tma_path_under_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device-side TMA descriptor path, emulated by the interpreter (16-byte aligned strides)."""
    monkeypatch.setenv("POSTTRAIN_INTERPRET_TMA", "1")
    gen = torch.Generator().manual_seed(5)
    sizes = torch.tensor([7, 0, 20, 3], dtype=torch.int32)
    x = torch.randn(35, 32, generator=gen).bfloat16()  # 5 tail rows
    for transposed in (False, True):
        w = torch.randn((4, 32, 48) if transposed else (4, 48, 32), generator=gen).bfloat16()
        got = tri.grouped_gemm(x, w, sizes, transposed)
        torch.testing.assert_close(got, ref.grouped_gemm(x, w, sizes, transposed), rtol=2**-7, atol=1e-2)
        assert torch.count_nonzero(got[30:]) == 0


def test_grouped_gemm_rejects_mismatched_shapes(device: torch.device) -> None:
    x = torch.randn(4, 8, device=device)
    w = torch.randn(2, 6, 7, device=device)
    with pytest.raises(ValueError, match="grouped_gemm"):
        tri.grouped_gemm(x, w, torch.tensor([2, 2], dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: autotuned compiled kernels at real sizes"
)
def test_grouped_gemm_realistic_bf16_on_gpu() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = torch.tensor([300, 0, 1024, 7, 512, 0, 129, 60], dtype=torch.int32, device="cuda")
    x = torch.randn(2100, 1024, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(8, 768, 1024, device="cuda", generator=gen) / 32).bfloat16()
    grad = torch.randn(2100, 768, device="cuda", generator=gen).bfloat16()
    got = _run(tri, x, w, sizes, False, grad)
    want = _run(ref, x, w, sizes, False, grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2e-2)
