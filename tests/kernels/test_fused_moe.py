"""Fused MoE experts (gather in GEMM1's A loads, weighted scatter-add in GEMM2's epilogue) against
the reference op with the same signature and against autograd through the unfused reference ops.

Tolerances: float32 everywhere except the bf16 case. The kernels and the references accumulate in
float32 in different orders (and the scatter-add sums k rows with atomics): measured max |diff|
2e-6 on values up to 26 (fp32). bf16: the kernels round h, g and dh to bf16 where the reference
keeps float32, so results agree to a few bf16 steps (2**-8 relative each).
"""

from __future__ import annotations

import pytest
import torch

from posttrain.kernels import moe_experts
from posttrain.kernels import reference as ref
from posttrain.kernels import triton_ops as tri
from posttrain.kernels.ops import validate_expert_ids


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int, seed: int, transposed: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    weights, index = torch.topk(torch.randn(tokens, experts, generator=gen).softmax(-1), top_k)
    gate_up = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen)
    down = 0.2 * torch.randn(experts, hidden, inter, generator=gen)
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return x, index, weights, gate_up, down


def _unfused_reference(x, index, weights, gate_up, down, transposed):
    """Autograd through the plain-torch ops, one step at a time ([S, H] tensors and all)."""
    indices = ref.sort_by_expert(index, gate_up.shape[0])
    rows = ref.gather_mul(x, indices)
    y = ref.expert_mlp(rows, gate_up, down, indices.token_counts, transposed)
    return ref.scatter_add(y, indices, ref.dense_scales(weights, index, gate_up.shape[0]))


def _fwd_bwd(fn, x, index, weights, gate_up, down, device):
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (x, weights, gate_up, down)]
    out = fn(leaves[0], index.to(device), *leaves[1:])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(device, out.dtype)
    out.backward(grad)
    return [out] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "transposed"),
    [(23, 6, 2, False), (23, 6, 2, True), (17, 5, 3, False), (9, 4, 1, False)],
    ids=["k2_w_GNK", "k2_w_GKN", "k3", "k1"],
)
def test_fused_experts_match_unfused_reference(
    tokens: int, experts: int, top_k: int, transposed: bool, device: torch.device
) -> None:
    x, index, weights, gate_up, down = _problem(tokens, experts, top_k, 32, 20, tokens + top_k, transposed)
    index[index == experts - 1] = 0 if top_k == 1 else index[index == experts - 1]  # k1: last expert empty
    want = _fwd_bwd(lambda *a: _unfused_reference(*a, transposed), x, index, weights, gate_up, down, device)
    for impl in ("triton", "reference"):
        got = _fwd_bwd(
            lambda a, i, w, gu, dn, impl=impl: moe_experts(a, i, w, gu, dn, transposed_w=transposed, impl=impl),
            x, index, weights, gate_up, down, device,
        )
        for name, a, b in zip(("out", "dx", "dweights", "dgate_up", "ddown"), got, want, strict=True):
            # measured max |diff| <= 2.1e-6 on values up to 26
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=lambda m, n=name, i=impl: f"{i} {n}: {m}")
    if top_k == 1:
        assert torch.count_nonzero(got[3][experts - 1]) == 0  # the empty expert gets no gradient


def test_fused_experts_bf16(device: torch.device) -> None:
    """bf16 weights and activations against the float32 reference on the same (bf16-valued) inputs.

    The kernels round h, a, g and dh to bf16 between stages (2**-9 relative each, compounding over
    three GEMMs and SwiGLU). Measured norm-wise relative error: 0.9-1.5e-2 for the fused kernels,
    1.1-1.7e-2 for the unfused kernel chain this replaces; bound 2.5e-2.
    """
    x, index, weights, gate_up, down = _problem(40, 8, 2, 64, 48, 5)
    args = [t.bfloat16() if t.is_floating_point() and t is not weights else t for t in (x, index, weights, gate_up, down)]
    exact = [t.float() if t.is_floating_point() else t for t in args]
    got = _fwd_bwd(lambda *a: moe_experts(*a, impl="triton"), *args, device)
    want = _fwd_bwd(lambda *a: moe_experts(*a, impl="reference"), *exact, device)
    for name, a, b in zip(("out", "dx", "dweights", "dgate_up", "ddown"), got, want, strict=True):
        assert a.dtype == (torch.float32 if name == "dweights" else torch.bfloat16)
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2.5e-2, f"{name}: relative error {rel:.3g}"


def test_fused_kernel_ops_match_reference_op_signature(device: torch.device) -> None:
    """triton_ops.fused_experts_{forward,backward} == reference.fused_experts_{forward,backward}."""
    x, index, weights, gate_up, down = (t.to(device) for t in _problem(19, 6, 2, 24, 16, 3))
    indices = ref.sort_by_expert(index, 6)
    scales = torch.rand(38, generator=torch.Generator().manual_seed(1)).to(device)
    args = (x, gate_up, down, indices.token_counts, indices.token_indices, scales)
    out_t, h_t = tri.fused_experts_forward(*args)
    out_r, h_r = ref.fused_experts_forward(*args)
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_t, h_r, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for a, b in zip(tri.fused_experts_backward(grad, *args, h_r), ref.fused_experts_backward(grad, *args, h_r), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backward_saves_nothing_of_shape_routed_rows_by_hidden(device: torch.device) -> None:
    """Saved for backward: inputs, weights, indices, row scales and h [S, 2I]; never an [S, H] tensor."""
    tokens, top_k, hidden, inter = 16, 2, 40, 12
    x, index, weights, gate_up, down = (t.to(device) for t in _problem(tokens, 4, top_k, hidden, inter, 7))
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3], impl="triton")
    assert (tokens * top_k, 2 * inter) in saved  # h: what SwiGLU's backward needs
    assert (tokens * top_k, hidden) not in saved
    # the unfused composition does save [S, H] tensors: the check above can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _unfused_reference(leaves[0], index, leaves[1], leaves[2], leaves[3], False)
    assert (tokens * top_k, hidden) in saved
    out.sum().backward()


@pytest.mark.parametrize("bad", [-1, 4], ids=["minus_one", "num_experts"])
def test_out_of_range_expert_ids_are_a_clear_error(bad: int, device: torch.device) -> None:
    x, index, weights, gate_up, down = (t.to(device) for t in _problem(6, 4, 2, 16, 8, 2))
    index[3, 1] = bad
    with pytest.raises(ValueError, match=rf"expert id {bad}, outside \[0, 4\)"):
        moe_experts(x, index, weights, gate_up, down, impl="triton")
    with pytest.raises(ValueError, match="outside"):
        validate_expert_ids(index, 4)
    validate_expert_ids(index.clamp(0, 3), 4)  # in range: no error
