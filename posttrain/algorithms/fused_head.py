"""The LM head and the per-token logprob (and entropy) fused, chunked over tokens.

``fused_head_logprobs(hidden, head, params, labels, ...)`` gives what
``processed_token_logprobs(head(hidden), labels, ...)`` gives, without the ``[M, V]`` logits ever
existing: the head runs on ``rows`` positions at a time (``rows x V`` about ``chunk_elements``),
each block is reduced to its label's logprob and its entropy at once, and the block is dropped.
The backward (a custom ``autograd.Function``) recomputes each block's logits from the saved hidden
states, forms the logits' gradient from the upstream gradients of logprob and entropy, and pushes
it through the head (``torch.autograd.grad`` on the block), so neither the logits nor their
gradient is alive for more than one block. Cost: the head's matmul runs twice (forward and
backward recompute) plus its two backward matmuls, 4 instead of 3.

The head is any callable ``[n, H] -> [n, V]`` (an ``nn.Linear``, a LoRA-wrapped linear, a tied
embedding's linear); ``params`` are the tensors it reads that need a gradient. The distribution
is the sampler's: ``softmax(filter(logits / temperature))`` with vLLM's top-k then top-p filter
(``posttrain.algorithms.logprobs.sampler_keep_mask``); temperature below 1e-5 is greedy (raw
logits, no filter), as ``processed_token_logprobs``. Labels < 0 give 0 (logprob and entropy).

Only tensors here: no model, no packing. ``posttrain.engine.head_logprobs`` runs a model's
forward with its head replaced by this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from posttrain.algorithms.logprobs import GREEDY_TEMPERATURE, sampler_keep_mask

# fp32 elements of one block's logits (16 MiB): rows per block = this // V. A block's temporaries
# (logits, fp32 copy, log-softmax, its gradient) are a few of these whatever V or the batch is.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

Head = Callable[[torch.Tensor], torch.Tensor]


def _filters(vocab: int, top_k: int, top_p: float) -> bool:
    return 0 < top_k < vocab or top_p < 1.0 - GREEDY_TEMPERATURE


def _block_logp(
    logits_nV: torch.Tensor, labels_n: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-softmax of the block's sampler distribution, fp32 [n, V]; the kept set or None: all)."""
    scaled = logits_nV.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    keep = None
    if _filters(scaled.shape[-1], top_k, top_p):
        keep = sampler_keep_mask(scaled, top_k, top_p)
        keep.scatter_(-1, labels_n.unsqueeze(-1), True)  # the sampled token was kept (see logprobs.py)
        scaled = scaled.masked_fill(~keep, -torch.inf)
    return torch.log_softmax(scaled, dim=-1), keep


def _safe(logp: torch.Tensor) -> torch.Tensor:
    """log p with -inf (p = 0: filtered or banned) replaced by 0, so p * log p is 0, not NaN."""
    return torch.where(torch.isneginf(logp), 0.0, logp)


def _blocks(m: int, rows: int):
    for start in range(0, m, rows):
        yield slice(start, min(start + rows, m))


class _FusedHeadLogprobs(torch.autograd.Function):
    """(logprob of each label, entropy) of softmax(filter(head(hidden) / T)), block by block.

    Saves the hidden states [M, H], labels and the entropy [M]; backward recomputes the blocks. With
    p the kept distribution and u = logits / T: d logp_y / du = onehot(y) - p and
    d H / du = -p (log p + H), both 0 outside the kept set; d / dlogits = d / du / T.
    """

    @staticmethod
    def forward(ctx, hidden_MH, labels_M, head, settings, *params):  # type: ignore[override]
        temperature, top_k, top_p, rows, want_entropy = settings
        M = hidden_MH.shape[0]
        # a head with dropout (a LoRA adapter on it) must draw the same masks in the recompute
        ctx.rng = _rng_state(hidden_MH.device)
        logprobs_M = torch.zeros(M, dtype=torch.float32, device=hidden_MH.device)
        entropy_M = torch.zeros_like(logprobs_M)
        for sl in _blocks(M, rows):
            logp, _ = _block_logp(head(hidden_MH[sl]), labels_M[sl], temperature, top_k, top_p)
            logprobs_M[sl] = logp.gather(-1, labels_M[sl].unsqueeze(-1)).squeeze(-1)
            if want_entropy:
                entropy_M[sl] = -(logp.exp() * _safe(logp)).sum(-1)
        ctx.save_for_backward(hidden_MH, labels_M, entropy_M)
        ctx.head, ctx.settings, ctx.params = head, settings, params
        ctx.set_materialize_grads(False)  # an unused output (a detached entropy) gets None, not zeros
        return logprobs_M, entropy_M

    @staticmethod
    def backward(ctx, grad_logprobs_M, grad_entropy_M):  # type: ignore[override]
        hidden_MH, labels_M, entropy_M = ctx.saved_tensors
        want_hidden = ctx.needs_input_grad[0]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:], strict=True) if need]
        grad_hidden = torch.zeros_like(hidden_MH) if want_hidden else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        if grad_logprobs_M is None and grad_entropy_M is None:
            return grad_hidden, None, None, None, *[None] * len(ctx.params)
        with _rng_restored(hidden_MH.device, ctx.rng):
            _backward_blocks(ctx, hidden_MH, labels_M, entropy_M, grad_logprobs_M, grad_entropy_M, params, grad_params, grad_hidden)
        it = iter(grad_params)
        out_params = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        return grad_hidden, None, None, None, *out_params


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _rng_restored(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _grad_logits(ctx, logits_nV, labels_n, entropy_n, grad_lp_n, grad_ent_n) -> torch.Tensor:
    """d loss / d logits of one block (fp32 [n, V]) from the upstream gradients of its logprobs and
    entropies (either may be None): -p (g_lp + g_H (log p + H)) + g_lp onehot(y), over T. Outside
    the kept set p = 0 exactly, so that term is 0 there without a mask."""
    temperature, top_k, top_p, _, _ = ctx.settings
    logp, _ = _block_logp(logits_nV, labels_n, temperature, top_k, top_p)
    p = logp.exp()
    if grad_ent_n is not None:
        coef = _safe(logp).add_(entropy_n.unsqueeze(-1)).mul_(grad_ent_n.unsqueeze(-1))
        del logp
        if grad_lp_n is not None:
            coef.add_(grad_lp_n.unsqueeze(-1))
        grad = coef.mul_(p).neg_()
        del p
    else:
        del logp
        grad = p.mul_(-grad_lp_n.unsqueeze(-1))
    if grad_lp_n is not None:
        grad.scatter_add_(-1, labels_n.unsqueeze(-1), grad_lp_n.unsqueeze(-1))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _plain_linear(head: Head) -> torch.nn.Linear | None:
    """The ``nn.Linear`` whose own forward ``head`` is (the usual LM head, tied or not): its
    gradients are two matmuls, no autograd graph needed. None for anything else (LoRA)."""
    owner = getattr(head, "__self__", None)
    return owner if type(owner) is torch.nn.Linear and getattr(head, "__func__", None) is torch.nn.Linear.forward else None


def _check_same_params(head: Head, params: list[torch.Tensor]) -> None:
    """The head's parameters in backward must be the tensors the forward captured: a wrapper that
    swapped them in between (an FSDP root resharded after forward) would otherwise leave their
    gradient silently out (autograd finds them unused in the recomputed block)."""
    owner = getattr(head, "__self__", head)
    if not isinstance(owner, torch.nn.Module):
        return
    current = {id(p) for p in owner.parameters()}
    if any(id(p) not in current for p in params):
        raise RuntimeError(
            "fused LM head: the head's parameters changed between forward and backward (resharded?); "
            "set model.fused_lm_head=false, or keep the module that owns the head gathered until backward"
        )


def _backward_blocks(ctx, hidden_MH, labels_M, entropy_M, grad_logprobs_M, grad_entropy_M, params, grad_params, grad_hidden) -> None:
    """The backward's block loop: recompute a block's logits, form their gradient, push it
    through the head into ``grad_hidden`` and ``grad_params`` (in place)."""
    rows = ctx.settings[3]
    want_hidden = grad_hidden is not None
    linear = _plain_linear(ctx.head)
    _check_same_params(ctx.head, params)
    for sl in _blocks(hidden_MH.shape[0], rows):
        g_lp = grad_logprobs_M[sl] if grad_logprobs_M is not None else None
        g_ent = grad_entropy_M[sl] if grad_entropy_M is not None else None
        if linear is not None:  # x W^T + b: grad_x = G W, grad_W += G^T x, grad_b += sum G
            x = hidden_MH[sl]
            with torch.no_grad():
                grad_u = _grad_logits(ctx, ctx.head(x), labels_M[sl], entropy_M[sl], g_lp, g_ent).to(linear.weight.dtype)
                if want_hidden:
                    grad_hidden[sl] = grad_u @ linear.weight
                for j, p in enumerate(params):
                    if p is linear.weight:  # one [V, H] buffer, accumulated in place (no per-block copy)
                        if grad_params[j] is None:
                            grad_params[j] = grad_u.t() @ x.to(p.dtype)
                        else:
                            grad_params[j].addmm_(grad_u.t(), x.to(p.dtype))
                    elif p is linear.bias:
                        part = grad_u.sum(0)
                        grad_params[j] = part if grad_params[j] is None else grad_params[j].add_(part)
            continue
        with torch.enable_grad():
            x = hidden_MH[sl].detach().requires_grad_(want_hidden)
            logits = ctx.head(x)
        with torch.no_grad():
            grad_u = _grad_logits(ctx, logits.detach(), labels_M[sl], entropy_M[sl], g_lp, g_ent)
        inputs = ([x] if want_hidden else []) + params
        grads = torch.autograd.grad(logits, inputs, grad_u.to(logits.dtype), allow_unused=True)
        del logits, grad_u
        if want_hidden:
            grad_hidden[sl] = grads[0]
            grads = grads[1:]
        for j, g in enumerate(grads):
            if g is not None:
                grad_params[j] = g if grad_params[j] is None else grad_params[j] + g


def fused_head_logprobs(
    hidden: torch.Tensor,
    head: Head,
    params: Sequence[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each label, and (with ``entropy``) the entropy, under the sampler's distribution
    of ``head(hidden)``, never holding more than one block of logits.

    ``hidden`` [..., H] (any leading shape, e.g. ``[B, T-1, H]`` already shifted by the caller),
    ``labels`` [...] the ids those positions predict (< 0: ignored, gives 0). ``head`` maps
    ``[n, H] -> [n, V]``; ``params``: the tensors it reads that should receive a gradient (the head
    weight, tied or not, LoRA adapters); frozen ones may be left out. Blocks hold
    ``max(1, chunk_elements // V)`` positions.

    Returns ``(logprobs, entropy)`` of shape ``labels.shape``, fp32 nats; the entropy is zeros
    unless ``entropy``. Both differentiable w.r.t. ``hidden`` and ``params``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature < GREEDY_TEMPERATURE:  # vLLM's greedy mode: processed logprobs are the raw ones
        temperature, top_k, top_p = 1.0, 0, 1.0
    hidden_MH = hidden.reshape(-1, hidden.shape[-1])
    labels_M = labels.reshape(-1)
    valid_M = labels_M >= 0
    safe_M = torch.where(valid_M, labels_M, 0)
    if hidden_MH.shape[0] == 0:
        zero = hidden_MH.new_zeros(labels.shape, dtype=torch.float32) + 0.0 * hidden_MH.sum()
        return zero, zero.clone()
    vocab = _vocab_size(head, hidden_MH)
    rows = max(1, chunk_elements // vocab)
    settings = (float(temperature), int(top_k), float(top_p), rows, bool(entropy))
    params = [p for p in params if p.requires_grad]
    lp_M, ent_M = _FusedHeadLogprobs.apply(hidden_MH, safe_M, head, settings, *params)
    lp_M = torch.where(valid_M, lp_M, 0.0)
    ent_M = torch.where(valid_M, ent_M, 0.0)
    return lp_M.view(labels.shape), ent_M.view(labels.shape)


def _vocab_size(head: Head, hidden_MH: torch.Tensor) -> int:
    """V: the head's ``out_features`` when it says so, else one row through it."""
    owner = getattr(head, "__self__", head)  # a bound ``forward`` of a module
    v = getattr(owner, "out_features", None)
    if v is None:
        with torch.no_grad():
            v = head(hidden_MH[:1]).shape[-1]
    return int(v)
