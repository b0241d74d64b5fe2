"""Gather-mul, scatter-add, SwiGLU and the composed MoE experts against the reference, with grads.

Tolerances: these kernels compute in float32 and round once, like the reference; float32 results
agree to accumulation order, bfloat16 results to one output rounding step.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.kernels import moe_experts
from posttrain.kernels import reference as ref
from posttrain.kernels import triton_ops as tri


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(fn, *inputs: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Output and input gradients of fn(*inputs) under a fixed random output gradient."""
    leaves = [_leaf(t) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
    return [out] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("with_scales", [False, True])
def test_gather_mul(with_scales: bool, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    tokens, experts, hidden, top_k = 29, 6, 40, 3
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    idx = ref.index_shuffling(torch.randn(tokens, experts, generator=gen).to(device), top_k)
    scales = torch.rand(tokens, experts, generator=gen).to(device)
    if with_scales:
        got = _grads(lambda a, s: tri.gather_mul(a, idx, s), x, scales)
        want = _grads(lambda a, s: ref.gather_mul(a, idx, s), x, scales)
        # d scales is only defined where a pair exists; the reference's is zero elsewhere too.
    else:
        got = _grads(lambda a: tri.gather_mul(a, idx), x)
        want = _grads(lambda a: ref.gather_mul(a, idx), x)
    for a, b in zip(got, want, strict=True):
        # measured max |diff|: 0 (out), 4.8e-7 (dx, values <= 6.3), 1.9e-6 (dscales, values <= 14)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_shared", [False, True])
def test_scatter_add(with_shared: bool, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(2)
    tokens, experts, hidden, top_k = 31, 5, 24, 2
    idx = ref.index_shuffling(torch.randn(tokens, experts, generator=gen).to(device), top_k)
    y = torch.randn(tokens * top_k, hidden, generator=gen).to(device)
    scales = torch.rand(tokens, experts, generator=gen).to(device)
    shared = torch.randn(tokens, hidden, generator=gen).to(device)
    if with_shared:
        got = _grads(lambda a, s, sh: tri.scatter_add(a, idx, s, sh), y, scales, shared)
        want = _grads(lambda a, s, sh: ref.scatter_add(a, idx, s, sh), y, scales, shared)
    else:
        got = _grads(lambda a, s: tri.scatter_add(a, idx, s), y, scales)
        want = _grads(lambda a, s: ref.scatter_add(a, idx, s), y, scales)
    for a, b in zip(got, want, strict=True):
        # measured max |diff|: 2.4e-7 (out), 0 (dy), 9.5e-7 (dscales, values <= 9.7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu(dtype: torch.dtype, device: torch.device) -> None:
    h = (3 * torch.randn(19, 2 * 37, generator=torch.Generator().manual_seed(3))).to(device, dtype)
    got = _grads(tri.swiglu, h)
    want = _grads(ref.swiglu, h)
    # measured max |diff|: fp32 3.8e-6 on values <= 38; bf16 0.25 on values <= 38 and 0.062 on
    # grads <= 18: one bf16 rounding step (both compute in float32, rounding points differ)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2**-7, 1e-2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("transposed", [False, True], ids=["w_GNK", "w_GKN"])
def test_moe_experts_end_to_end(transposed: bool, device: torch.device) -> None:
    """Routed SwiGLU experts, all kernels composed, forward and every gradient, fp32."""
    gen = torch.Generator().manual_seed(4)
    tokens, hidden, inter, experts, top_k = 23, 32, 20, 6, 2
    x = torch.randn(tokens, hidden, generator=gen).to(device)
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    weights, index = torch.topk(logits.softmax(-1), top_k)
    gate_up = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen).to(device)
    down = 0.2 * torch.randn(experts, hidden, inter, generator=gen).to(device)
    index[:, 0] = torch.where(index[:, 0] == 5, 4, index[:, 0])  # make expert 5 rarer
    index[:, 1] = torch.where(index[:, 1] == 5, (index[:, 0] + 1) % 5, index[:, 1])  # expert 5 empty
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()

    def run(impl: str):
        return lambda a, w, gu, dn: moe_experts(a, index, w, gu, dn, transposed_w=transposed, impl=impl)

    got = _grads(run("triton"), x, weights, gate_up, down)
    want = _grads(run("reference"), x, weights, gate_up, down)
    for a, b in zip(got, want, strict=True):
        # measured max |diff| 1.3e-6 on values <= 26 (fp32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(got[3][5]) == 0  # the empty expert has no gradient
