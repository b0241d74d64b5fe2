"""Index shuffling kernel == topk + stable sort by expert + bincount (exact integer equality)."""

from __future__ import annotations

import pytest
import torch

from posttrain.kernels import reference as ref
from posttrain.kernels import triton_ops as tri


def _assert_same(got: ref.ShuffledIndices, want: ref.ShuffledIndices) -> None:
    for name, a, b in zip(ref.ShuffledIndices._fields, got, want, strict=True):
        assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k"),
    [(1, 4, 1), (37, 8, 2), (130, 16, 4), (65, 5, 3), (300, 128, 8)],
)
def test_index_shuffling_matches_reference(
    tokens: int, experts: int, top_k: int, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(tokens * experts + top_k)
    scores = torch.randn(tokens, experts, generator=gen).to(device)
    _assert_same(tri.index_shuffling(scores, top_k), ref.index_shuffling(scores, top_k))


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(50, 6, 2), (257, 16, 1)])
def test_sort_by_expert_matches_reference_with_empty_experts(
    tokens: int, experts: int, top_k: int, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(7)
    # Only the odd experts are used: even ones get zero tokens.
    top_k_index = (2 * torch.randint(0, experts // 2, (tokens, top_k), generator=gen) + 1).to(device)
    got = tri.sort_by_expert(top_k_index, experts)
    _assert_same(got, ref.sort_by_expert(top_k_index, experts))
    assert int(got.token_counts[0::2].sum()) == 0


def test_one_expert_takes_every_token(device: torch.device) -> None:
    top_k_index = torch.full((40, 1), 3, device=device)
    got = tri.sort_by_expert(top_k_index, 4)
    assert got.token_counts.tolist() == [0, 0, 0, 40]
    assert got.token_indices.tolist() == list(range(40))  # stable: token order kept


def test_slot_positions_invert_the_shuffle(device: torch.device) -> None:
    scores = torch.randn(33, 8, generator=torch.Generator().manual_seed(3)).to(device)
    got = tri.index_shuffling(scores, 2)
    top_k_index = torch.topk(scores, 2).indices
    slots = got.slot_positions.long()
    assert torch.equal(
        got.token_indices[slots].long(), torch.arange(33, device=device)[:, None].expand(33, 2)
    )
    assert torch.equal(got.expert_indices[slots].long(), top_k_index)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: programs only run concurrently on a GPU"
)
@pytest.mark.parametrize(("experts", "top_k"), [(16, 1), (128, 8)])
def test_index_shuffling_concurrent_programs_on_gpu(experts: int, top_k: int) -> None:
    """Hundreds of programs race on the completion counter; the result must stay exact every time."""
    gen = torch.Generator(device="cuda").manual_seed(experts)
    for _ in range(20):
        scores = torch.rand(8192, experts, device="cuda", generator=gen)
        _assert_same(tri.index_shuffling(scores, top_k), ref.index_shuffling(scores, top_k))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_feeds_index_shuffling(score_func: str, device: torch.device) -> None:
    logits = torch.randn(21, 8, generator=torch.Generator().manual_seed(9)).to(device)
    routed = ref.route(logits, top_k=3, score_func=score_func, renormalize=True)
    torch.testing.assert_close(routed.top_k_weights.sum(-1), torch.ones(21, device=device))
    raw = ref.route(logits, top_k=3, score_func=score_func, renormalize=False)
    assert torch.equal(raw.top_k_weights, torch.gather(raw.scores, 1, raw.top_k_index))
    shuffled = tri.index_shuffling(routed.scores, 3)
    assert torch.equal(shuffled.expert_indices[shuffled.slot_positions.long()].long(), routed.top_k_index)


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(200, 64, 6), (97, 16, 2)])
def test_index_shuffling_ties(tokens: int, experts: int, top_k: int, device: torch.device) -> None:
    """Scores with many equal values: same experts and values as torch.topk, ties taken lower
    expert first (torch.topk's own order among ties is unspecified: on CPU it is not index order),
    then the stable argsort of the pairs, exactly."""
    gen = torch.Generator().manual_seed(tokens)
    scores = torch.randint(0, 3, (tokens, experts), generator=gen).float().to(device)
    got = tri.index_shuffling(scores, top_k)
    _assert_same(got, ref.index_shuffling(scores, top_k))
    chosen = got.expert_indices[got.slot_positions.long()].long()  # [T, k] in choice order
    values, _ = torch.topk(scores, top_k)
    assert torch.equal(torch.gather(scores, 1, chosen), values)  # a valid top-k, best first
    # within equal values the lower expert comes first
    same = values[:, 1:] == values[:, :-1]
    assert bool((chosen[:, 1:] > chosen[:, :-1])[same].all())
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(got.token_indices.long(), order // top_k)


def test_index_shuffling_matches_topk_argsort_without_ties(device: torch.device) -> None:
    """Distinct scores (a random permutation per token): identical to torch.topk + stable argsort."""
    gen = torch.Generator().manual_seed(11)
    tokens, experts, top_k = 500, 64, 6
    scores = torch.argsort(torch.rand(tokens, experts, generator=gen), dim=1).float().to(device)
    got = tri.index_shuffling(scores, top_k)
    flat = torch.topk(scores, top_k).indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    assert torch.equal(got.expert_indices.long(), flat[order])
    assert torch.equal(got.token_indices.long(), order // top_k)
    assert torch.equal(got.token_counts.long(), torch.bincount(flat, minlength=experts))
