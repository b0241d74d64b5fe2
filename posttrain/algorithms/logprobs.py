"""Per-token log-probabilities, entropy and masked reductions.

Conventions (shared by every loss in ``posttrain.algorithms``):
- ``B`` batch, ``T`` tokens, ``V`` vocabulary. Masks are bool or 0/1 tensors of shape ``BT``.
- Masked positions may hold garbage (NaN, inf) in any input: every reduction selects with
  ``torch.where`` (never multiplies by the mask), so garbage can leak into neither the value nor
  the gradient.
- Logprobs are natural-log probabilities (nats), computed in fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch

# Rows of (B*T) processed at once: bounds the fp32 temporaries to chunk x V floats.
DEFAULT_CHUNK_TOKENS = 4096


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _row_blocks(batch: int, length: int, chunk: int):
    """(b, slice) blocks covering a [batch, length] grid, at most ``chunk`` positions each."""
    for b in range(batch):
        for start in range(0, length, chunk):
            yield b, slice(start, start + chunk)


class _TokenLogprobs(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits), in blocks of positions, fp32 math.

    Saves only the logits (in their own dtype, as given: no copy of a sliced ``logits[:, :-1]``),
    labels and the fp32 logsumexp per position; the softmax is recomputed block by block in
    backward. A plain ``log_softmax(logits.float())`` keeps a fp32 ``B*T*V`` tensor for backward.
    """

    @staticmethod
    def forward(ctx, logits_BTV: torch.Tensor, labels_BT: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        B, T, _ = logits_BTV.shape
        lse_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BTV.device)
        picked_BT = torch.empty_like(lse_BT)
        for b, rows in _row_blocks(B, T, chunk):
            block = logits_BTV[b, rows].float()
            lse_BT[b, rows] = torch.logsumexp(block, dim=-1)
            picked_BT[b, rows] = block.gather(-1, labels_BT[b, rows].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits_BTV, labels_BT, lse_BT)
        ctx.chunk = chunk
        return picked_BT - lse_BT

    @staticmethod
    def backward(ctx, grad_BT: torch.Tensor):  # type: ignore[override]
        logits_BTV, labels_BT, lse_BT = ctx.saved_tensors
        grad_logits_BTV = torch.empty(logits_BTV.shape, dtype=logits_BTV.dtype, device=logits_BTV.device)
        for b, rows in _row_blocks(logits_BTV.shape[0], logits_BTV.shape[1], ctx.chunk):
            g_t1 = grad_BT[b, rows].float().unsqueeze(-1)
            # d/dlogits [logit_y - lse] = onehot(y) - softmax
            block = -torch.exp(logits_BTV[b, rows].float() - lse_BT[b, rows].unsqueeze(-1)) * g_t1
            block.scatter_add_(-1, labels_BT[b, rows].unsqueeze(-1), g_t1)
            grad_logits_BTV[b, rows] = block.to(logits_BTV.dtype)
        return grad_logits_BTV, None, None


def token_logprobs(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Log-probability of each label under the logits, in fp32.

    ``logits_BTV[b, t]`` must already be the distribution that predicts ``labels_BT[b, t]`` (the
    caller shifts: ``token_logprobs(logits[:, :-1], input_ids[:, 1:])``; the slice is not copied).
    Labels < 0 (e.g. -100 padding) give 0.

    Returns ``logprobs_BT`` (fp32, nats). Memory: fp32 temporaries are ``chunk_tokens x V``; the
    backward recomputes the softmax per block instead of keeping a fp32 ``B*T*V`` copy.
    """
    if logits_BTV.dim() != 3 or logits_BTV.shape[:-1] != labels_BT.shape:
        raise ValueError(f"logits {tuple(logits_BTV.shape)} do not match labels {tuple(labels_BT.shape)}")
    valid_BT = labels_BT >= 0
    safe_labels_BT = torch.where(valid_BT, labels_BT, 0)
    logprobs_BT = _TokenLogprobs.apply(logits_BTV, safe_labels_BT, chunk_tokens)
    return torch.where(valid_BT, logprobs_BT, 0.0)


@torch.no_grad()
def sampled_token_logprobs(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Forward-only logprob of each label under the distribution the sampler drew from
    (``softmax(logits / temperature)``, top-p filtered as ``processed_token_logprobs`` does),
    in blocks of about ``chunk_tokens`` positions along T. Returns ``logprobs_BT``, fp32 nats.

    For old and reference logprobs: the scaled (and, with top-p, sorted) copies of the logits
    exist for one block at a time (``chunk_tokens x V``), never for all ``B x T`` positions, and
    no entropy is computed. Same values as the training path's logprobs (same conventions:
    the caller shifts; labels < 0 give 0; temperature 0 or 1 leaves the logits unscaled).
    """
    if logits_BTV.dim() != 3 or logits_BTV.shape[:-1] != labels_BT.shape:
        raise ValueError(f"logits {tuple(logits_BTV.shape)} do not match labels {tuple(labels_BT.shape)}")
    B, T, _ = logits_BTV.shape
    out_BT = torch.zeros(B, T, dtype=torch.float32, device=logits_BTV.device)
    step = max(1, chunk_tokens // max(B, 1))
    for start in range(0, T, step):
        cols = slice(start, start + step)
        block, labels = logits_BTV[:, cols], labels_BT[:, cols]
        if top_p < 1.0:
            out_BT[:, cols] = processed_token_logprobs(block, labels, temperature, 0, top_p, chunk_tokens)[0]
        else:
            scaled = block if temperature in (0.0, 1.0) else block / temperature
            out_BT[:, cols] = token_logprobs(scaled, labels, chunk_tokens)
    return out_BT


def entropy_from_logits(logits_BTV: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, fp32, nats. Returns ``entropy_BT``.

    Differentiable (for an entropy bonus); under ``torch.no_grad`` (metrics) it only ever holds
    ``chunk_tokens x V`` fp32 temporaries.
    """
    flat_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    pieces = []
    for start in range(0, flat_NV.shape[0], chunk_tokens):
        logp = torch.log_softmax(flat_NV[start : start + chunk_tokens].float(), dim=-1)
        # -inf logits (banned tokens) have p = 0: take 0 * log 0 = 0 instead of NaN.
        logp = torch.where(torch.isneginf(logp), 0.0, logp)
        pieces.append(-(logp.exp() * logp).sum(-1))
    entropy_N = torch.cat(pieces) if pieces else flat_NV.new_zeros(0, dtype=torch.float32)
    return entropy_N.view(logits_BTV.shape[:-1])


# vLLM's threshold below which a temperature means greedy (vllm/sampling_params.py _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5


def sampler_keep_mask(scaled_NV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Tokens the sampler may draw after top-k then top-p, as vLLM's CPU/PyTorch sampler decides.

    ``scaled_NV`` are fp32 logits already divided by the temperature. Rules (vLLM 0.32
    ``apply_top_k_only`` / ``apply_top_k_top_p_pytorch``, the same as HF's warpers):
    - top-k keeps every token whose logit is >= the k-th largest logit, so ties at the k-th value
      are all kept (possibly more than k tokens). ``top_k <= 0`` or ``>= V`` disables it.
    - top-p sorts the (top-k-filtered) logits ascending, takes the cumulative softmax and drops
      the prefix whose cumulative mass is ``<= 1 - p`` (``1 - p`` computed in fp32 as vLLM does);
      the largest token is always kept. Among tokens tied at the boundary, the sort order decides,
      exactly as in vLLM (same ``torch.sort`` call). ``top_p >= 1`` disables it.
    Returns ``keep_NV`` (bool).
    """
    V = scaled_NV.shape[-1]
    use_k = 0 < top_k < V
    use_p = top_p < 1.0 - GREEDY_TEMPERATURE  # vLLM enables top-p for p < 1 - 1e-5
    if not use_p:
        if not use_k:
            return torch.ones_like(scaled_NV, dtype=torch.bool)
        kth_N1 = scaled_NV.topk(top_k, dim=-1).values[:, -1:]
        return scaled_NV >= kth_N1
    sorted_NV, order_NV = scaled_NV.sort(dim=-1, descending=False)
    if use_k:
        kth_N1 = sorted_NV[:, V - top_k : V - top_k + 1]
        sorted_NV = sorted_NV.masked_fill(sorted_NV < kth_N1, -torch.inf)
    cum_NV = sorted_NV.softmax(dim=-1).cumsum(dim=-1)
    one_minus_p = 1.0 - torch.tensor(top_p, dtype=torch.float32, device=scaled_NV.device)
    drop_sorted_NV = cum_NV <= one_minus_p
    drop_sorted_NV[:, -1] = False  # at least one token
    drop_sorted_NV |= torch.isneginf(sorted_NV)  # removed by top-k
    keep_NV = torch.empty_like(drop_sorted_NV)
    keep_NV.scatter_(-1, order_NV, ~drop_sorted_NV)
    return keep_NV


def _processed_block(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_NV with -inf outside the kept set, keep_NV) of one block, fp32."""
    scaled = logits_NV.float() / temperature
    keep = sampler_keep_mask(scaled, top_k, top_p)
    # The sampled token was in the sampler's kept set by construction; if the trainer's numerics
    # put it just outside, keep it rather than return -inf (a NaN ratio downstream).
    keep.scatter_(-1, labels_N.unsqueeze(-1), True)
    logp = torch.log_softmax(scaled.masked_fill(~keep, -torch.inf), dim=-1)
    return logp, keep


class _ProcessedTokenLogprobs(torch.autograd.Function):
    """(log p(label), entropy) under softmax(filter(logits / T)), block by block in fp32.

    Saves the logits (own dtype, no copy), labels and the two outputs; backward recomputes each
    block's filtered softmax. With p the kept distribution, u = logits / T and the mask constant:
    d logp_y / du = onehot(y) - p, d H / du = -p (log p + H), both 0 outside the kept set.
    """

    @staticmethod
    def forward(ctx, logits_BTV, labels_BT, temperature, top_k, top_p, chunk):  # type: ignore[override]
        B, T, _ = logits_BTV.shape
        logprobs_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BTV.device)
        entropy_BT = torch.empty_like(logprobs_BT)
        for b, rows in _row_blocks(B, T, chunk):
            logp, keep = _processed_block(logits_BTV[b, rows], labels_BT[b, rows], temperature, top_k, top_p)
            logprobs_BT[b, rows] = logp.gather(-1, labels_BT[b, rows].unsqueeze(-1)).squeeze(-1)
            entropy_BT[b, rows] = -torch.where(keep, logp.exp() * logp, 0.0).sum(-1)
        ctx.save_for_backward(logits_BTV, labels_BT, entropy_BT)
        ctx.settings = (temperature, top_k, top_p, chunk)
        return logprobs_BT, entropy_BT

    @staticmethod
    def backward(ctx, grad_logprobs_BT, grad_entropy_BT):  # type: ignore[override]
        logits_BTV, labels_BT, entropy_BT = ctx.saved_tensors
        temperature, top_k, top_p, chunk = ctx.settings
        grad_BTV = torch.empty(logits_BTV.shape, dtype=logits_BTV.dtype, device=logits_BTV.device)
        for b, rows in _row_blocks(logits_BTV.shape[0], logits_BTV.shape[1], chunk):
            logp, keep = _processed_block(logits_BTV[b, rows], labels_BT[b, rows], temperature, top_k, top_p)
            p = logp.exp()
            g_lp = grad_logprobs_BT[b, rows].float().unsqueeze(-1) if grad_logprobs_BT is not None else 0.0
            g_h = grad_entropy_BT[b, rows].float().unsqueeze(-1) if grad_entropy_BT is not None else 0.0
            safe_logp = torch.where(keep, logp, 0.0)
            block = -p * g_lp - p * (safe_logp + entropy_BT[b, rows].unsqueeze(-1)) * g_h
            if grad_logprobs_BT is not None:
                block.scatter_add_(-1, labels_BT[b, rows].unsqueeze(-1), g_lp)
            grad_BTV[b, rows] = (torch.where(keep, block, 0.0) / temperature).to(logits_BTV.dtype)
        return grad_BTV, None, None, None, None, None


def processed_token_logprobs(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each label and entropy under the distribution the sampler drew from.

    That distribution is ``softmax(filter(logits / temperature))`` with vLLM's top-k then top-p
    filter (see ``sampler_keep_mask``): what vLLM returns with
    ``logprobs_mode="processed_logprobs"`` and what the HF engine's ``generate`` scores give.
    ``temperature < 1e-5`` is vLLM's greedy mode, whose processed logprobs are the raw
    ``log_softmax(logits)`` with no filter: that is what is returned then.

    Same conventions as ``token_logprobs``: the caller shifts (``logits[:, :-1], ids[:, 1:]``);
    labels < 0 give 0 (logprob and entropy). A label the filter would drop (possible only when the
    trainer's logits differ from the sampler's) is kept in the set instead of getting -inf.

    Returns ``(logprobs_BT, entropy_BT)``, fp32 nats, both differentiable w.r.t. the logits.
    Memory: fp32 temporaries of ``chunk_tokens x V`` (a few of them, for the sort); nothing of
    size ``B*T*V`` is kept for backward but the logits themselves.
    """
    if logits_BTV.dim() != 3 or logits_BTV.shape[:-1] != labels_BT.shape:
        raise ValueError(f"logits {tuple(logits_BTV.shape)} do not match labels {tuple(labels_BT.shape)}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature < GREEDY_TEMPERATURE:
        temperature, top_k, top_p = 1.0, 0, 1.0
    valid_BT = labels_BT >= 0
    safe_labels_BT = torch.where(valid_BT, labels_BT, 0)
    logprobs_BT, entropy_BT = _ProcessedTokenLogprobs.apply(
        logits_BTV, safe_labels_BT, float(temperature), int(top_k), float(top_p), chunk_tokens
    )
    return torch.where(valid_BT, logprobs_BT, 0.0), torch.where(valid_BT, entropy_BT, 0.0)


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out positions replaced by 0 (``torch.where``: NaN there cannot leak).

    Apply to *inputs* before any arithmetic: ``where`` zeroes the gradient of the unselected
    branch, but a NaN computed from a masked input would still poison the chain rule upstream.
    """
    return torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is true (over ``dim``, or everything when None)."""
    selected = zero_masked(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, denom: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the masked positions.

    ``denom`` replaces the local count (pass the global valid-token count to normalise a micro-batch
    as part of a larger batch). With ``denom=None`` and an empty mask the result is 0, not NaN.
    """
    total = masked_sum(x, mask)
    if denom is None:
        denom = _as_bool(mask).sum().clamp(min=1)
    return total / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked positions; masked-out positions become 0.

    ``var`` is the unbiased (Bessel-corrected) variance, as in TRL/verl ``masked_whiten``. With
    ``shift_mean=False`` the mean is added back (only rescaled). Fewer than 2 valid positions:
    returns zeros (no spread to normalise by).
    """
    m = _as_bool(mask)
    count = m.sum()
    if count < 2:
        return torch.zeros_like(x)
    x = zero_masked(x, m)
    mean = masked_sum(x, m) / count
    var = masked_sum((x - mean) ** 2, m) / (count - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return zero_masked(out, m)
