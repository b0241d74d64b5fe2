"""The MoE custom ops under torch.library's checks and a Qwen3-MoE layer under
torch.compile(fullgraph=True) on CPU (the reference path inside the ops: no interpreter needed)."""

from __future__ import annotations

import pytest
import torch
from test_moe_model import _tiny_config  # tests/kernels is on sys.path (pytest prepend mode)
from transformers import Qwen3MoeForCausalLM

import posttrain.kernels.ops  # noqa: F401  (registers torch.ops.posttrain.*)
from posttrain.models.moe_experts import set_moe_kernels


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU without TRITON_INTERPRET: impl="auto" resolves to the plain-torch reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _op_args(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens, experts, top_k, hidden, inter = 7, 4, 2, 8, 6
    index = torch.topk(torch.randn(tokens, experts, generator=gen), top_k).indices
    counts, _, token_indices, _ = torch.ops.posttrain.sort_by_expert(index, experts, "reference")
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, requires_grad=True)
    down = torch.randn(experts, hidden, inter, generator=gen, requires_grad=True)
    scales = torch.rand(tokens * top_k, generator=gen, requires_grad=True)
    return index, (x, gate_up, down, counts, token_indices, scales, False, "reference")


def test_custom_ops_pass_opcheck(no_interpreter: None) -> None:
    """Schema, fake (meta) impls, autograd registration and tracing, as torch.library checks them."""
    index, args = _op_args()
    torch.library.opcheck(torch.ops.posttrain.sort_by_expert.default, (index, 4, "reference"))
    torch.library.opcheck(torch.ops.posttrain.moe_experts_fwd.default, args)


def test_custom_op_gradients_match_finite_differences(no_interpreter: None) -> None:
    _, args = _op_args(1)
    double = tuple(a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def out_only(x, gate_up, down, scales):
        return torch.ops.posttrain.moe_experts_fwd(x, gate_up, down, double[3], double[4], scales, False, "reference")[0]

    assert torch.autograd.gradcheck(out_only, (double[0], double[1], double[2], double[5]), eps=1e-6, atol=1e-5)


def test_qwen3_moe_layer_compiles_fullgraph(no_interpreter: None) -> None:
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_tiny_config())
    layer = model.model.layers[0].mlp
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))

    def fwd_bwd(fn):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.pow(2).sum().backward()
        return out.detach(), leaf.grad, layer.experts.gate_up_proj.grad.clone(), layer.gate.weight.grad.clone()

    set_moe_kernels(model, "eager")
    want = fwd_bwd(layer)
    set_moe_kernels(model, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    got = fwd_bwd(compiled)
    for a, b in zip(got, want, strict=True):
        # measured max |diff| 1.9e-9 (fp32; per-expert loop vs grouped reference order)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
