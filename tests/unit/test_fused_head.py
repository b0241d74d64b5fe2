"""The fused LM head + logprob (posttrain.algorithms.fused_head, posttrain.engine.head_logprobs)
gives the unfused path's values and gradients (fp32, within 1e-5) for the RL policy loss, SFT
and DPO, on padded and packed (shared-prefix) rows, tied and untied heads, LoRA and MoE, and
never keeps more than one block of [*, V] for backward."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.fused_head import fused_head_logprobs
from posttrain.algorithms.logprobs import processed_token_logprobs
from posttrain.algorithms.policy_loss import PolicyLossConfig, policy_loss
from posttrain.engine.head_logprobs import model_logprobs, supports_fused_head
from posttrain.engine.packing import pack
from posttrain.models.factory import TinyModelSpec, build_tiny_model
from posttrain.models.lora import LoRAConfig, apply_lora

V = 300
TOL = dict(rtol=1e-5, atol=1e-5)
# (temperature, top_p, top_k): plain, temperature, vLLM's top-p, top-k then top-p, greedy
SETTINGS = [(1.0, 1.0, 0), (0.7, 1.0, 0), (0.7, 0.9, 0), (0.8, 0.95, 20), (0.0, 1.0, 0)]


@pytest.mark.parametrize("temperature,top_p,top_k", SETTINGS)
def test_fused_matches_logits_then_processed_logprobs(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, V, bias=True)
    labels = torch.randint(0, V, (3, 7), generator=g)
    labels[1, 4] = -100  # ignored: 0, no gradient
    w_lp, w_ent = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)

    def run(fused: bool):
        hidden.grad = None
        head.zero_grad()
        if fused:  # blocks of 4 positions: 21 do not divide evenly
            lp, ent = fused_head_logprobs(hidden, head, list(head.parameters()), labels, temperature, top_k, top_p, True, 4 * V)
        else:
            lp, ent = processed_token_logprobs(head(hidden), labels, temperature, top_k, top_p)
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        return lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert run(True)[0][1, 4] == 0


def _batch(packed: bool, vocab: int = V) -> dict[str, torch.Tensor]:
    """4 right-padded rows, three sharing a 12-token prompt (a GRPO group), one shorter."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (4, 20), generator=g)
    ids[1, :12] = ids[0, :12]
    ids[2, :12] = ids[0, :12]
    mask = torch.ones_like(ids)
    mask[3, 15:] = 0
    mask[1, 18:] = 0
    batch = {"input_ids_BT": ids * mask, "attention_mask_BT": mask, "loss_mask_BT": mask.clone()}
    batch["loss_mask_BT"][:, :12] = 0
    if packed:  # the prompt held once, each sample a child piece
        batch.update(pack(batch["input_ids_BT"], mask, min_shared=4))
        assert (batch["packed_parent_S"] >= 0).any()
    return batch


def _model(arch: str = "llama", tie: bool = True, lora: bool = False) -> torch.nn.Module:
    spec = TinyModelSpec(arch=arch, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         vocab_size=V, tie_word_embeddings=tie)  # fmt: skip
    model = build_tiny_model(spec)
    if lora:  # the head itself wrapped: a LoRA adapter on lm_head
        apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert supports_fused_head(model)
    return model


def _grads(model: torch.nn.Module, loss_fn) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.detach()


def _assert_same(fused, unfused) -> None:
    (gf, lf), (gu, lu) = fused, unfused
    assert gf.keys() == gu.keys() and gf, (gf.keys(), gu.keys())
    torch.testing.assert_close(lf, lu, **TOL)
    for name in gu:
        torch.testing.assert_close(gf[name], gu[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "arch,tie,lora,packed,temperature,top_p",
    [
        ("llama", True, False, False, 0.7, 1.0),
        ("llama", True, False, True, 0.7, 0.9),
        ("qwen2", False, False, True, 1.0, 1.0),
        ("qwen3_moe", True, False, True, 0.7, 1.0),
        ("llama", False, True, True, 0.7, 0.9),
    ],
)
def test_rl_policy_loss_gradients_equal_the_unfused_path(arch, tie, lora, packed, temperature, top_p):
    model = _model(arch, tie, lora)
    batch = _batch(packed)
    g = torch.Generator().manual_seed(2)
    adv, behaviour = torch.randn(4, 20, generator=g), -2.0 + 0.1 * torch.randn(4, 20, generator=g)
    ref = -2.0 + 0.1 * torch.randn(4, 20, generator=g)
    cfg = PolicyLossConfig(entropy_coef=0.01, kl_coef=0.05)  # entropy bonus: the entropy's gradient too
    count = float(batch["loss_mask_BT"].sum())

    def loss(fused: bool):
        lp, ent = model_logprobs(model, batch, temperature, top_p, entropy="grad", fused=fused)
        return policy_loss(lp, lp.detach(), behaviour, adv, batch["loss_mask_BT"], cfg, num_tokens=count, num_seqs=4.0,
                           ref_logprobs_BT=ref, entropy_BT=ent)[0]  # fmt: skip

    _assert_same(_grads(model, lambda: loss(True)), _grads(model, lambda: loss(False)))


class _Frozen:
    """The ``forward(fn)`` verb of a frozen TrainEngine (which needs a process group) for DPO."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def forward(self, fn):
        return fn(self.model)


@pytest.mark.parametrize("packed", [False, True])
def test_sft_and_dpo_gradients_equal_the_unfused_path(packed):
    from posttrain.offline.dpo import DPO, DPOConfig
    from posttrain.offline.sft import SFT, SFTConfig

    model = _model("qwen2", tie=False)
    batch = _batch(packed)
    sft = SFT(SFTConfig())

    def sft_loss(fused: bool):
        sft.fused = fused
        return sft.loss(model, batch, 40.0)[0]

    _assert_same(_grads(model, lambda: sft_loss(True)), _grads(model, lambda: sft_loss(False)))

    # DPO: rows 0, 1 chosen, 2, 3 rejected; the reference a frozen copy with other weights
    dpo = DPO(DPOConfig())
    reference = _model("qwen2", tie=False)
    torch.nn.init.normal_(reference.lm_head.weight, std=0.05)
    dpo.reference = _Frozen(reference.requires_grad_(False))

    def dpo_loss(fused: bool):
        dpo.fused = fused
        return dpo.loss(model, batch, 2.0)[0]

    _assert_same(_grads(model, lambda: dpo_loss(True)), _grads(model, lambda: dpo_loss(False)))


@pytest.mark.parametrize("packed", [False, True])
def test_forward_only_logprobs_equal_the_unfused_forward_verb(packed):
    model = _model("llama")
    batch = _batch(packed)
    with torch.no_grad():
        for temperature, top_p, _ in SETTINGS:
            fused = model_logprobs(model, batch, temperature, top_p, fused=True)[0]
            unfused = model_logprobs(model, batch, temperature, top_p, fused=False)[0]
            torch.testing.assert_close(fused, unfused, **TOL)
            assert fused.shape == batch["input_ids_BT"].shape and bool((fused[:, 0] == 0).all())


def test_no_vocabulary_sized_tensor_beyond_one_block_is_kept_for_backward():
    """What autograd saves: the unfused path keeps the [B, T, V] logits; the fused one, hidden
    states and blocks of at most ``chunk_elements // V`` positions (none of them here)."""
    model = _model("llama")
    batch = _batch(packed=False)
    biggest = {}

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == V:
            biggest[mode] = max(biggest.get(mode, 0), t.numel() // V)  # positions of a [*, V] tensor
        return t

    for mode in ("fused", "unfused"):
        biggest[mode] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            lp, _ = model_logprobs(model, batch, 0.7, entropy="grad", fused=mode == "fused", chunk_elements=8 * V)
        lp.sum().backward()
    assert biggest["unfused"] >= 4 * 19, biggest  # the whole micro-batch's logits
    # the fused path saves the head weight [V, H] transposed at most (positions counted as H = 32)
    assert biggest["fused"] <= 32, biggest


def test_a_head_whose_weight_is_swapped_before_backward_fails_loudly():
    """As an FSDP root resharded between forward and backward would: the recomputed blocks would
    not use the captured weight, whose gradient would silently be left out."""
    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    lp, _ = fused_head_logprobs(hidden, head.forward, [head.weight], torch.randint(0, V, (5,)))
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        lp.sum().backward()
