"""Weight sync, trainer side: versioned, fixed-size buckets of flattened tensors, and the probe.

After every optimizer step the trainer's FULL weights go to every rollout worker, tagged with a
policy version. Rank 0 of the trainer gathers the full state dict (``get_model_state_dict(...,
full_state_dict=True, cpu_offload=True)``) and hands its ``(name, tensor)`` pairs to
:class:`WeightSender`, which packs them into :class:`WeightBucket` records: one flat ``uint8``
payload of about ``bucket_bytes`` plus a header naming each tensor's dtype, shape and byte range.
The receiver (``posttrain.rollout.weight_receiver``) unpacks the same format.

Invariants (each one is checked in code, and tests break it on purpose):

1. Coverage: in one version every parameter name the receiver serves is sent exactly once. The
   sender refuses a duplicate name; the receiver refuses an unknown or duplicate name and, at the
   last bucket, refuses a version that left any expected name out.
2. Dtype and shape: every tensor's dtype and shape equal what the receiver serves (no silent cast,
   no silent reshape). Cast on the sender with ``wire_dtype`` if trainer and engine differ.
3. Versions strictly increase: the sender refuses to send a version <= the last one it sent, the
   receiver refuses to load a version <= the one it serves.
4. A partial update is never served: the receiver checks every bucket header before loading its
   bytes, and an engine whose update failed half-way refuses to generate until a complete
   version arrives (it does not fall back to a mix of old and new layers).
5. After a sync, the engine's logprobs on a fixed sequence match the trainer's, judged on the
   mean and p99 of the per-token gaps above a floor measured at version 0, when both sides hold
   the same weights (:func:`measure_floor`; :func:`judge_probe` raises :class:`WeightSyncProbeError`).
6. Content: each bucket carries :func:`payload_fingerprint` of its bytes, computed by the sender;
   the receiver recomputes it before loading, and folds the buckets' fingerprints in order into a
   version digest (:func:`fold_digest`) that the publisher compares with the sender's after every
   sync. A logprob probe moves by ~4e-4 nats after one AdamW step at lr 1e-6 (under its fp32
   tolerance), so a skipped or stale sync is caught by the digest, not the probe.

Buckets hold the payload as a numpy array so that Ray's object store ships it without a copy
(numpy arrays are zero-copy in plasma, torch tensors are pickled). A tensor larger than
``bucket_bytes`` travels alone in a bucket of its own size.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.config.errors import PosttrainError

# Byte alignment of each tensor inside a payload: keeps every typed view aligned.
_ALIGN_BYTES = 64


class WeightSyncError(PosttrainError, RuntimeError):
    """A weight update broke one of the invariants in this module's docstring."""


class WeightSyncProbeError(WeightSyncError):
    """After a sync, the engine's logprobs disagree with the trainer's beyond tolerance."""


class WeightSyncFingerprintError(WeightSyncProbeError):
    """After a sync, a worker's version digest is not the one the trainer sent."""


_DIGEST_MASK = (1 << 52) - 1  # digests travel as exact float64 metrics
_FINGERPRINT_ROW = 1024  # words (8 KiB): rows of this many words are summed per column


def as_tensor(payload: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A payload as a flat tensor, without a copy. Payloads from Ray's object store are read-only
    NumPy arrays; the views of them are only ever read, so torch's not-writable warning is noise."""
    if not isinstance(payload, np.ndarray):
        return payload
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(payload)


def payload_fingerprint(payload: torch.Tensor | np.ndarray) -> int:
    """A 52-bit content fingerprint of a bucket payload (uint8, length a multiple of 64 bytes).

    Two wrapping int64 sums over the payload's 8-byte words: the plain sum and one weighted by
    the word's position in its 64-byte line (1..8). Any change of one word changes the plain
    sum; swapping words within a line changes the weighted one. One pass over the bytes, on
    whatever device the payload is (the same code on both sides of a transfer), with no
    temporary the size of the payload: the words are summed per column of 8 KiB rows, then the
    columns per position in a line (the same sums, in wrapping arithmetic; 7 ms for 64 MiB on
    one CPU core, against 44 ms for multiplying every word by its weight first).
    """
    flat = as_tensor(payload)
    if flat.numel() == 0:
        return 0
    words = flat.view(torch.int64)
    rows = words.numel() // _FINGERPRINT_ROW * _FINGERPRINT_ROW
    columns_8 = words[:rows].view(-1, _FINGERPRINT_ROW).sum(0).view(-1, 8).sum(0)
    if rows < words.numel():
        columns_8 += words[rows:].view(-1, 8).sum(0)
    plain = int(columns_8.sum())
    weighted = int((columns_8 * torch.arange(1, 9, dtype=torch.int64, device=words.device)).sum())
    return ((plain * 0x9E3779B1) ^ weighted) & _DIGEST_MASK


def fold_digest(fingerprints: Iterable[int]) -> int:
    """The version digest: bucket fingerprints folded in bucket order (order matters)."""
    digest = 0
    for fp in fingerprints:
        digest = (digest * 1099511628211 + fp + 1) & _DIGEST_MASK
    return digest


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the wire spelling of a dtype)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; raises ValueError on an unknown name."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight bucket header")
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """Header entry of one tensor in a bucket: bytes ``[offset, offset + nbytes)`` of the payload."""

    name: str
    dtype: str  # wire spelling, see dtype_name()
    shape: tuple[int, ...]
    offset: int  # bytes
    nbytes: int  # bytes


@dataclass
class WeightBucket:
    """One bucket of one policy version.

    ``payload`` is a flat ``uint8`` array of ``payload.nbytes`` bytes; ``metas`` says where each
    tensor lies in it. ``is_last`` marks the final bucket of the version, and that bucket carries
    ``total_tensors`` (the number of tensors sent in the whole version) so the receiver can check
    coverage before it commits.
    """

    version: int
    index: int  # 0-based position within the version
    metas: list[TensorMeta]
    payload: np.ndarray | torch.Tensor  # uint8 [nbytes] (a torch tensor on the collective path)
    is_last: bool = False
    total_tensors: int = -1  # set on the last bucket only
    fingerprint: int | None = None  # payload_fingerprint(payload), set by the sender

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` views into the payload (no copy; read-only if the payload is)."""
        flat = as_tensor(self.payload)
        for meta in self.metas:
            raw = flat[meta.offset : meta.offset + meta.nbytes]
            yield meta.name, raw.view(dtype_from_name(meta.dtype)).view(meta.shape)


@dataclass
class SyncStats:
    """What one version cost on the sender: sizes in bytes, times in seconds."""

    version: int
    num_tensors: int = 0
    num_buckets: int = 0
    bytes: int = 0  # tensor bytes (payload bytes minus alignment padding)
    pack_s: float = 0.0  # time spent copying tensors into payloads
    fingerprints: list[int] = dataclasses.field(default_factory=list)  # per bucket, in order

    @property
    def digest(self) -> int:
        return fold_digest(self.fingerprints)


def _aligned(n: int) -> int:
    return (n + _ALIGN_BYTES - 1) // _ALIGN_BYTES * _ALIGN_BYTES


def _materialize(tensor: torch.Tensor) -> torch.Tensor:
    # A DTensor (FSDP2 shard) is gathered here; a plain tensor passes through.
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


class WeightSender:
    """Packs a full state dict into versioned buckets (trainer rank 0).

    Args:
        bucket_bytes: target payload size of a bucket in bytes (tensors are never split; a
            tensor larger than this gets a bucket of its own). Default 8 MiB: on the 25M-parameter bench
            model (2 CPU cores) 4-128 MiB synced within 10% of each other on a quiet machine
            (0.08-0.09 s); under load the >32 MiB ones, whose fresh allocations page-fault on every
            sync, were up to 3x slower (bench/weight_sync.py sweeps this).
        wire_dtype: cast floating-point tensors to this dtype before packing (e.g. bf16 for a
            bf16 engine fed by an fp32 trainer); None sends each tensor in its own dtype.
    """

    def __init__(self, bucket_bytes: int = 8 << 20, wire_dtype: torch.dtype | None = None) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.wire_dtype = wire_dtype
        self.last_version: int | None = None
        self.last_stats: SyncStats | None = None

    def buckets(
        self,
        state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        version: int,
    ) -> Iterator[WeightBucket]:
        """Yield the buckets of ``version`` (lazily: one bucket is packed ahead of the consumer).

        Raises WeightSyncError if ``version`` is not above the last version sent, or if a name
        repeats. ``self.last_stats`` holds the sizes and packing time once the iterator is done.
        """
        if self.last_version is not None and version <= self.last_version:
            raise WeightSyncError(
                f"weight version {version} is not above the last version sent ({self.last_version}); "
                "versions must strictly increase (pass the trainer's step count + 1)"
            )
        self.last_version = version
        items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
        stats = SyncStats(version=version)
        seen: set[str] = set()
        pending: list[tuple[str, torch.Tensor]] = []
        pending_bytes = 0
        previous: WeightBucket | None = None
        for name, tensor in items:
            if name in seen:
                raise WeightSyncError(
                    f"parameter {name!r} appears twice in the state dict of version {version}"
                )
            seen.add(name)
            tensor = _materialize(tensor).detach()
            if self.wire_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.wire_dtype)
            size = _aligned(tensor.numel() * tensor.element_size())
            if pending and pending_bytes + size > self.bucket_bytes:
                bucket = self._pack(pending, version, stats)
                if previous is not None:
                    yield previous
                previous = bucket
                pending, pending_bytes = [], 0
            pending.append((name, tensor))
            pending_bytes += size
        if pending or previous is None:
            bucket = self._pack(pending, version, stats)
            if previous is not None:
                yield previous
            previous = bucket
        previous.is_last = True
        previous.total_tensors = stats.num_tensors
        self.last_stats = stats
        yield previous

    def _pack(self, items: list[tuple[str, torch.Tensor]], version: int, stats: SyncStats) -> WeightBucket:
        start = time.perf_counter()
        metas: list[TensorMeta] = []
        offset = 0
        for name, tensor in items:
            nbytes = tensor.numel() * tensor.element_size()
            metas.append(TensorMeta(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
            offset = _aligned(offset + nbytes)
        payload = np.empty(offset, dtype=np.uint8)
        flat = torch.from_numpy(payload)
        for meta, (_, tensor) in zip(metas, items, strict=True):
            flat[meta.offset : meta.offset + meta.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            stats.bytes += meta.nbytes
        stats.num_tensors += len(items)
        stats.pack_s += time.perf_counter() - start
        fingerprint = payload_fingerprint(payload)
        if offset:  # an empty bucket adds nothing to the digest (as on the receiver)
            stats.fingerprints.append(fingerprint)
        bucket = WeightBucket(version, stats.num_buckets, metas, payload, fingerprint=fingerprint)
        stats.num_buckets += 1
        return bucket


def probe_logprob_gap(engine_logprobs: list[list[float]], trainer_logprobs: list[list[float]]) -> float:
    """Largest absolute difference (nats) between two sets of per-token logprobs.

    Both arguments are ``[num_sequences][num_scored_tokens]`` for the same token sequences (the
    engine's from ``score_tokens``, the trainer's from its forward). NaN anywhere gives ``inf``.
    """
    if len(engine_logprobs) != len(trainer_logprobs):
        raise ValueError(
            f"probe got {len(engine_logprobs)} engine sequences and {len(trainer_logprobs)} trainer sequences"
        )
    gap = 0.0
    for i, (a, b) in enumerate(zip(engine_logprobs, trainer_logprobs, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"probe sequence {i}: engine scored {len(a)} tokens, trainer {len(b)}")
        for x, y in zip(a, b, strict=True):
            d = abs(x - y)
            if math.isnan(d):
                return math.inf
            gap = max(gap, d)
    return gap


@dataclass(frozen=True)
class GapStats:
    """Per-token absolute logprob gaps (nats) of a probe, summarised: mean, p99 (nearest rank), max."""

    mean: float
    p99: float
    max: float


@dataclass(frozen=True)
class ProbeFloor:
    """The gap between engine and trainer when both hold the same weights (nats): what their
    kernels alone make (attention implementation, summation order, the compute dtype), measured
    at version 0 and recorded as ``sync/probe_floor_mean`` / ``sync/probe_floor_p99``."""

    mean: float
    p99: float


def probe_gap_stats(engine_logprobs: list[list[float]], trainer_logprobs: list[list[float]]) -> GapStats:
    """:class:`GapStats` of every token of every probe sequence (a NaN anywhere: all ``inf``)."""
    probe_logprob_gap(engine_logprobs, trainer_logprobs)  # shape checks
    gaps = sorted(abs(x - y) for a, b in zip(engine_logprobs, trainer_logprobs, strict=True) for x, y in zip(a, b, strict=True))
    if not gaps:
        return GapStats(0.0, 0.0, 0.0)
    if any(math.isnan(g) for g in gaps):
        return GapStats(math.inf, math.inf, math.inf)
    p99 = gaps[max(0, math.ceil(0.99 * len(gaps)) - 1)]
    return GapStats(sum(gaps) / len(gaps), p99, gaps[-1])


# Tolerances of the probe, in nats, above the floor (mean and p99 each). fp32 on CPU: vLLM's CPU
# kernels and HF eager differ only in summation order (attention, matmul blocking): measured
# 4.8e-7 on the tiny Qwen2; 1e-3 leaves wide margin yet is far below the gap between two
# differently seeded models (0.70). bf16/fp16 keep 8/11 mantissa bits, so the same reordering
# moves logprobs by ~1e-2, and vLLM's bf16 attention against HF SDPA by up to ~0.3 on single
# tokens (vLLM's issue tracker): judged on a max, a bf16 probe would trip on a correct sync.
# Hence a floor measured at version 0 and the mean and p99, not the max.
PROBE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.bfloat16: 1e-1,
    torch.float16: 5e-2,
}


def check_probe(
    engine_logprobs: list[list[float]],
    trainer_logprobs: list[list[float]],
    version: int,
    dtype: torch.dtype = torch.float32,
    tolerance: float | None = None,
    floor: ProbeFloor | None = None,
) -> float:
    """Return the largest per-token gap; raise WeightSyncProbeError (see :func:`judge_probe`)."""
    return judge_probe(engine_logprobs, trainer_logprobs, version, dtype, tolerance, floor).max


def judge_probe(
    engine_logprobs: list[list[float]],
    trainer_logprobs: list[list[float]],
    version: int,
    dtype: torch.dtype = torch.float32,
    tolerance: float | None = None,
    floor: ProbeFloor | None = None,
) -> GapStats:
    """The probe's :class:`GapStats`; raises WeightSyncProbeError when its mean or its p99 exceeds
    the ``floor``'s (None: 0) by more than ``tolerance`` (default ``PROBE_TOLERANCE[dtype]``, nats).
    The max is reported, not judged: single tokens differ by kernel noise in bf16."""
    tol = PROBE_TOLERANCE[dtype] if tolerance is None else tolerance
    floor = floor or ProbeFloor(0.0, 0.0)
    gap = probe_gap_stats(engine_logprobs, trainer_logprobs)
    if not (gap.mean <= floor.mean + tol and gap.p99 <= floor.p99 + tol):
        raise WeightSyncProbeError(
            f"after weight sync to version {version}, engine and trainer logprobs differ by {gap.mean:.3g} nats on "
            f"average, {gap.p99:.3g} at p99 (floor at version 0: {floor.mean:.3g} / {floor.p99:.3g}; tolerance "
            f"{tol:g} above it for {dtype_name(dtype)}): the engine is not serving the trainer's weights. "
            "Check that every parameter was sent (names match the engine's checkpoint) and that the "
            "engine's dtype matches the trainer's."
        )
    return gap


def measure_floor(
    engine_logprobs: list[list[float]], trainer_logprobs: list[list[float]], dtype: torch.dtype = torch.float32,
    tolerance: float | None = None,
) -> ProbeFloor:
    """The :class:`ProbeFloor` of two sides that hold the same weights. A floor whose mean is
    already above the tolerance means the two sides do not compute the same model (a wrong
    checkpoint, tokenizer or dtype) and would blind every later check: WeightSyncProbeError."""
    tol = PROBE_TOLERANCE[dtype] if tolerance is None else tolerance
    gap = probe_gap_stats(engine_logprobs, trainer_logprobs)
    if not gap.mean <= tol:
        raise WeightSyncProbeError(
            f"before any weight update (both sides on their initial weights), engine and trainer logprobs differ by "
            f"{gap.mean:.3g} nats on average (tolerance {tol:g} for {dtype_name(dtype)}): they do not run the same model.\n"
            "  fix: point the engine and the trainer at the same checkpoint and dtype (rollout.engine.dtype, model.dtype)"
        )
    return ProbeFloor(gap.mean, gap.p99)
