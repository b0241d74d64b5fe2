"""One trainer rank of online RL: policy (FSDP2), optional frozen reference and critic.

A plain class with a few typed verbs (``forward(ForwardBatch) -> ForwardOutputs``,
``train(TrainBatch) -> metrics``, ``push_weights``, ``probe``, ``save``/``load``, ``export``);
:class:`posttrain.rl.trainers.TrainerGroup` runs one per rank as a Ray actor and calls every verb
on all ranks at once (the verbs are collectives). Each rank gets its share of the rows; counts
that normalise the loss are global (computed over the whole mini-batch before sharding).
"""

from __future__ import annotations

import os
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.nn.functional as F

from posttrain.algorithms.logprobs import (
    entropy_from_logits,
    processed_token_logprobs,
    token_logprobs,
)
from posttrain.algorithms.policy_loss import policy_loss, value_loss
from posttrain.diagnose import where_now
from posttrain.engine.checkpoint import export_hf, find_checkpoint, load_checkpoint, save_checkpoint
from posttrain.engine.dist import device_for_rank, init_rank
from posttrain.engine.head_logprobs import model_logprobs
from posttrain.engine.packing import forward as packed_forward
from posttrain.engine.packing import next_token, packed_micro_batches, row_lengths
from posttrain.engine.trainer import OptimConfig, TrainEngine, TrainerConfig
from posttrain.models.loading import ModelConfig, apply_moe_kernels, load_causal_lm, load_tokenizer
from posttrain.models.lora import BaseReference, adapter_wire_tensors
from posttrain.rl import offload
from posttrain.rl.config import OnlineRLConfig, SyncConfig
from posttrain.sync.collective import CollectiveSender
from posttrain.sync.group import GroupInfo, UpdateGroup
from posttrain.sync.group import join as join_group
from posttrain.sync.names import engine_tensors
from posttrain.types import ForwardBatch, ForwardOutputs, TrainBatch
from posttrain.weight_sync import WeightSender, dtype_from_name


@dataclass
class TrainerSpec:
    """Everything a trainer rank is built from (the same for every rank but ``rank``)."""

    world: int
    store_path: str  # rendezvous of this process group (a fresh one after every restart)
    model: ModelConfig
    trainer: TrainerConfig
    algo: OnlineRLConfig
    sync: SyncConfig
    cpus: float  # this rank's torch threads (placement.phase_threads: the node's cores when phases alternate)
    collective_timeout_s: float | None = None
    # The distribution the rollout engine sampled from (and reported behaviour logprobs of):
    # logits / temperature, then top-p. The trainer's logprobs and entropy are of the same one.
    temperature: float = 1.0
    top_p: float = 1.0


def _shifted_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    """Raw (T=1) logprob of token t at position t (position 0: 0): what the probe compares."""
    return F.pad(token_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:]), (1, 0))


def _state_value(values: torch.Tensor, _next_ids: torch.Tensor) -> torch.Tensor:
    """``next_token``'s fn for a value head: V(state before token t) is the output where t-1 was read."""
    return values


# Names of dropout probabilities, in configs and as module attributes across model families:
# attention_dropout / hidden_dropout / classifier_dropout (Llama, Qwen, BERT-likes), attn_pdrop /
# resid_pdrop / embd_pdrop (GPT-2, Phi), hidden_dropout_prob (BERT), dropout_rate (T5).
_DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_prob|drop_rate", re.IGNORECASE)


def _zero_dropout_probs(obj: Any) -> int:
    """Set every float attribute of ``obj`` whose name is a dropout probability to 0; the count."""
    hits = 0
    for name, value in list(vars(obj).items()):
        if _DROPOUT_NAME.search(name) and isinstance(value, float) and value != 0.0:
            setattr(obj, name, 0.0)
            hits += 1
    return hits


def _configs(config: Any) -> Iterator[Any]:
    """A config and its nested sub-configs (text_config, vision_config, ...)."""
    from transformers import PretrainedConfig

    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _configs(value)


def disable_dropout(model: torch.nn.Module) -> int:
    """Switch off every dropout of ``model``, whatever its family; returns how many were on.

    Walks the modules: every ``nn.Dropout`` (and its 1d/2d/3d/alpha kinds) gets ``p = 0``, and every
    float attribute named like a dropout probability (``self.attention_dropout``, read by the
    attention functions as ``dropout=... if self.training``) is zeroed; so is every such key of the
    model's config and its sub-configs (code that reads the config at forward time)."""
    hits = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0.0:
            module.p, hits = 0.0, hits + 1
        hits += _zero_dropout_probs(module)
    config = getattr(model, "config", None)
    for sub in _configs(config) if config is not None else ():
        hits += _zero_dropout_probs(sub)
    return hits


def critic_model(model_cfg: ModelConfig, policy_config: Any) -> torch.nn.Module:
    """PPO's value model: a 1-label token-classification head on the policy's backbone, with every
    dropout off (value clipping compares its values with the deterministic ones of the forward)."""
    import copy

    from transformers import AutoConfig, AutoModelForTokenClassification

    src = model_cfg.path
    config = AutoConfig.from_pretrained(src, local_files_only=True) if src else copy.deepcopy(policy_config)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # token-classification heads default to 0.1 when the config has none
    for sub in _configs(config):  # before construction: layers built from these probabilities
        _zero_dropout_probs(sub)
    if src:
        critic = AutoModelForTokenClassification.from_pretrained(src, config=config, local_files_only=True)
    else:
        critic = AutoModelForTokenClassification.from_config(config)
    disable_dropout(critic)  # after: whatever a family hard-codes or names otherwise
    apply_moe_kernels(critic, model_cfg.moe_kernels)  # an MoE backbone runs the same experts as the policy
    return critic


class _Schedulers:
    def __init__(self, engines: dict[str, TrainEngine]) -> None:
        self.engines = engines

    def state_dict(self) -> dict[str, Any]:
        return {name: {"scheduler": e.scheduler.state_dict(), "step": e.step} for name, e in self.engines.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, e in self.engines.items():
            e.scheduler.load_state_dict(state[name]["scheduler"])
            e.step = state[name]["step"]


class _TrainState:
    """The trainable engines of a rank (policy, critic) as the one engine the checkpoint code saves.

    ``step`` is the RL step (the engines' own optimizer-step counters travel with the schedulers)."""

    def __init__(self, policy: TrainEngine, critic: TrainEngine | None) -> None:
        self.engines = {"policy": policy, **({"critic": critic} if critic is not None else {})}
        self.scheduler = _Schedulers(self.engines)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {name: e.state_dict() for name, e in self.engines.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, e in self.engines.items():
            e.load_state_dict(state[name])


class TrainerWorker:
    def __init__(self, rank: int, spec: TrainerSpec) -> None:
        init_rank(rank, spec.world, spec.store_path, spec.trainer.backend, spec.collective_timeout_s)
        torch.set_num_threads(max(1, int(spec.cpus)))  # after init_rank, which sets cores // world
        model_cfg, trainer_cfg, algo = spec.model, spec.trainer, spec.algo
        self.rank, self.world, self.algo, self.trainer_cfg = rank, spec.world, algo, trainer_cfg
        self.model_cfg = model_cfg
        self.device = device_for_rank(rank)
        torch.manual_seed(0)
        policy = load_causal_lm(model_cfg)
        self.model_config, self.model_class = policy.config, type(policy)
        self.policy = TrainEngine(policy, trainer_cfg, self.device)
        self.reference = None
        if algo.use_reference:  # LoRA: the policy with its adapters off, no second copy
            self.reference = BaseReference(self.policy) if model_cfg.lora else TrainEngine(load_causal_lm(model_cfg), trainer_cfg, self.device, trainable=False)
        self.temperature, self.top_p = spec.temperature, spec.top_p
        # The reference at the sampler's temperature only (as verl's compute_ref_log_prob: logits /
        # rollout temperature, no top-p), a distribution; algorithm.reference_logprobs=sampler
        # applies the sampler's top-p too (not a distribution: see OnlineRLConfig).
        self.reference_top_p = spec.top_p if algo.reference_logprobs == "sampler" else 1.0
        self.critic = None
        if algo.critic is not None:
            critic = critic_model(model_cfg, policy.config)
            ccfg = TrainerConfig(**{**trainer_cfg.__dict__, "optim": OptimConfig(lr=algo.critic.lr)})
            self.critic = TrainEngine(critic, ccfg, self.device)
        self.sender = WeightSender(bucket_bytes=spec.sync.bucket_mb << 20)
        self.update_group: UpdateGroup | None = None  # rank 0, with sync.transport=collective
        self._collective_sender: CollectiveSender | None = None

    # -- forward-only ------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> ForwardOutputs:
        """Old (current policy, if ``batch.want_old``), reference logprobs and critic values of this
        rank's rows, in micro-batches of ``trainer.micro_batch_size`` rows (or packed ones of
        ``trainer.max_tokens_per_micro_batch`` tokens): the logits of one micro-batch are alive at a
        time, never [B, T, V] for the whole batch."""
        rows = {"input_ids_BT": batch.input_ids_BT, "attention_mask_BT": batch.attention_mask_BT}
        if self.trainer_cfg.max_tokens_per_micro_batch is None:
            size = self.trainer_cfg.micro_batch_size
            parts = [self._forward_micro({k: v[i : i + size] for k, v in rows.items()}, batch.want_old)
                     for i in range(0, batch.input_ids_BT.shape[0], size)]  # fmt: skip
            joined = {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}
            return ForwardOutputs(**joined)
        plans = self.policy.plan_micro_batches(row_lengths(batch.attention_mask_BT).tolist(), batch.input_ids_BT)
        joined = {}
        for p, mb in zip(plans, packed_micro_batches(rows, plans, loss_keys=()), strict=True):
            part = self._forward_micro(mb, batch.want_old)
            if p.dummy:
                continue
            for k, v in part.items():  # back to the rows' places, zeros on padding
                joined.setdefault(k, v.new_zeros(batch.input_ids_BT.shape))[p.rows, : v.shape[1]] = v
        return ForwardOutputs(**joined)

    def _forward_micro(self, mb: dict[str, torch.Tensor], want_old: bool) -> dict[str, torch.Tensor]:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        out = {}
        ref_top_p, fused = self.reference_top_p, self.model_cfg.fused_lm_head  # fused: LM head + logprob in chunks
        if want_old:
            lp = self.policy.forward(lambda m: model_logprobs(m, mb, self.temperature, self.top_p, fused=fused)[0])
            out["old_logprobs_BT"] = lp.cpu()
        if self.reference is not None:
            lp = self.reference.forward(lambda m: model_logprobs(m, mb, self.temperature, ref_top_p, fused=fused)[0])
            out["ref_logprobs_BT"] = lp.cpu()
        if self.critic is not None:
            # values_BT[t] = V(state before token t) = the critic's output at position t-1
            v = self.critic.forward(lambda m: next_token(_state_value, packed_forward(m, mb).logits[..., 0].float(), mb))
            out["values_BT"] = v.cpu()
        return out

    def _sampled(self, logits: torch.Tensor, ids: torch.Tensor, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprob of each id under the logits read just before it, and the entropy there, under
        the distribution the engine sampled from (``logits / temperature``, top-p filtered). The
        entropy carries a gradient only with ``entropy_grad`` (an entropy bonus in the loss)."""
        if self.top_p < 1.0:  # a filtered distribution: vLLM's top-p rules
            lp, ent = processed_token_logprobs(logits, ids, self.temperature, 0, self.top_p)
            ent = ent if entropy_grad else ent.detach()
        else:  # softmax(logits / T) unfiltered: the same values on the plain path, at half the cost
            scaled = logits if self.temperature in (0.0, 1.0) else logits / self.temperature
            lp = token_logprobs(scaled, ids)
            if entropy_grad:
                ent = entropy_from_logits(scaled)
            else:
                with torch.no_grad():
                    ent = entropy_from_logits(scaled.detach())
        return lp, ent

    # -- training ----------------------------------------------------------------------------
    def _policy_loss(self, model, mb: dict[str, Any], _count: float):
        entropy_grad = self.algo.loss.entropy_coef > 0
        lp, ent = model_logprobs(model, mb, self.temperature, self.top_p, entropy="grad" if entropy_grad else "metric",
                                 fused=self.model_cfg.fused_lm_head)  # fmt: skip (no [B, T, V] logits: engine/head_logprobs.py)
        # No recomputed old logprobs (one mini-batch): the policy before this update is this forward's.
        old = mb["old_logprobs_BT"] if "old_logprobs_BT" in mb else lp.detach()
        return policy_loss(
            lp, old, mb["behaviour_logprobs_BT"], mb["advantages_BT"], mb["loss_mask_BT"], self.algo.loss,
            num_tokens=mb["num_tokens"], num_seqs=mb["num_seqs"], ref_logprobs_BT=mb.get("ref_logprobs_BT"), entropy_BT=ent,
        )

    def _value_loss(self, model, mb: dict[str, Any], _count: float):
        values = next_token(_state_value, packed_forward(model, mb).logits[..., 0].float(), mb)
        return value_loss(values, mb["values_BT"], mb["returns_BT"], mb["loss_mask_BT"], self.algo.critic.value_clip, mb["num_tokens"])

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step (policy, and critic for PPO) on this rank's rows of a mini-batch."""
        if self.trainer_cfg.max_tokens_per_micro_batch is None:
            size = self.trainer_cfg.micro_batch_size
            micro = [batch.select(slice(i, i + size)).tensors() for i in range(0, batch.size, size)]
        else:  # packed: the loss still sees [B, T] tensors and the global counts (see packing.next_token)
            plans = self.policy.plan_micro_batches(row_lengths(batch.attention_mask_BT).tolist(), batch.input_ids_BT)
            micro = packed_micro_batches(batch.tensors(), plans)
        count = lambda mb: float(mb["loss_mask_BT"].sum())  # noqa: E731 (unused: counts are global)
        metrics = self.policy.train_step(micro, self._policy_loss, count)
        metrics["system/trainer_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this rank's peak so far
        metrics["system/train_threads"] = float(torch.get_num_threads())
        if self.critic is not None:
            cm = self.critic.train_step(micro, self._value_loss, count)
            metrics.update({f"critic/{k}": v for k, v in cm.items()})
        return metrics

    # -- weights -----------------------------------------------------------------------------
    def push_weights(self, version: int, wire_dtype: str | None = None) -> tuple[list, dict[str, float]] | None:
        """Collective gather; rank 0 packs buckets into Ray's object store and returns their refs."""
        import ray

        t0 = time.perf_counter()
        # LoRA: only the adapters travel (the workers merge them into their base weights)
        full = adapter_wire_tensors(self.policy.model) if self.model_cfg.lora else self.policy.full_state_dict().items()
        gather_s = time.perf_counter() - t0
        if self.rank != 0:
            return None
        self.sender.wire_dtype = None if wire_dtype is None else dtype_from_name(wire_dtype)
        refs = [ray.put(b) for b in self.sender.buckets(engine_tensors(full, self.model_config.model_type), version)]
        stats = self.sender.last_stats
        return refs, {"sync/gather_s": gather_s, "sync/pack_s": stats.pack_s, "sync/bytes": float(stats.bytes),
                      "sync/buckets": float(stats.num_buckets), "sync/digest": float(stats.digest)}  # fmt: skip

    def join_update_group(self, info: GroupInfo | None) -> None:
        """Rank 0 joins the model-update group as its sender (rank 0); the other ranks only gather.
        ``ipc``: every rank with a colocated engine sends to it over its own pair group (None: no engine)."""
        if info is not None and self.rank != 0 and info.backend != "ipc":
            return
        if self.update_group is not None:
            self.update_group.close()
        self.update_group = None if info is None else join_group(info, 0)

    def broadcast_weights(self, version: int, wire_dtype: str | None, restore: bool = False) -> dict[str, float] | None:
        """Collective: every rank gathers one tensor at a time; rank 0 sends bucket by bucket over
        the update group (two buckets alive at most). Rank 0 returns the sync stats."""
        wire = None if wire_dtype is None else dtype_from_name(wire_dtype)
        sender = self._collective_sender
        if sender is None or sender.wire_dtype != wire:  # kept from sync to sync: its payload buffers are reused
            sender = self._collective_sender = CollectiveSender(self.sender.bucket_bytes, wire)
        sender.last_version = self.sender.last_version
        t0 = time.perf_counter()
        handles = getattr(self.update_group, "handles", 0)  # ipc: payloads handed over as memory handles
        source = adapter_wire_tensors(self.policy.model) if self.model_cfg.lora else self.policy.model.state_dict().items()
        stats = sender.send(self.update_group, engine_tensors(source, self.model_config.model_type), version, restore)
        handles = getattr(self.update_group, "handles", 0) - handles
        self.sender.last_version = version
        if self.rank != 0:
            return None
        return {"sync/gather_s": stats.gather_s, "sync/pack_s": stats.pack_s, "sync/send_wait_s": stats.wait_s,
                "sync/send_s": time.perf_counter() - t0, "sync/bytes": float(stats.bytes), "sync/buckets": float(stats.num_buckets),
                "sync/sender_peak_bytes": float(stats.peak_bytes), "sync/digest": float(stats.digest),
                "sync/ipc_handles": float(handles)}  # fmt: skip

    def probe(self, token_ids: list[list[int]]) -> list[list[float]]:
        """The trainer's per-token logprobs of fixed sequences (tokens 1..L-1), to compare with the engine."""
        out = []
        for ids in token_ids:
            t = torch.tensor([ids], device=self.device)
            lp = self.policy.forward(lambda m, t=t: _shifted_logprobs(m(input_ids=t).logits, t))
            out.append(lp[0, 1:].tolist())
        return out

    def export(self, out_dir: str) -> str:
        export_hf(out_dir, self.policy, self.model_config, load_tokenizer(self.model_cfg), self.model_class, base_model=self.model_cfg.path)
        return out_dir

    # -- colocated: devices shared with the rollout engines (posttrain.rl.offload) ---------------
    def offload(self) -> dict[str, float]:
        return offload.offload(e for e in (self.policy, self.reference, self.critic) if e is not None)

    def onload(self) -> dict[str, float]:
        return offload.onload((e for e in (self.policy, self.reference, self.critic) if e is not None), self.device)

    def node(self) -> dict[str, str]:
        """Where this rank runs: Ray node id and address."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> _TrainState:
        return _TrainState(self.policy, self.critic)

    def save(self, root: str, step: int, extra: dict[str, Any], keep_last: int) -> str:
        """Collective: policy (and critic) weights, optimizers, schedulers, RNG, plus ``extra``
        (the controller's state), atomically under ``root/step_N``."""
        return save_checkpoint(root, step, self._state(), extra, keep_last)

    def load(self, path: str) -> dict[str, Any]:
        """Collective: restore what ``save`` wrote (``path`` verified by ``find_checkpoint``); the
        ``extra`` given to ``save`` (this rank's RNG and scheduler state stay here)."""
        state = load_checkpoint(path, self._state())
        return {k: v for k, v in state.items() if k not in ("rng", "scheduler")}

    def find(self, resume: str, root: str) -> str | None:
        """Collective: the checkpoint to resume from (see ``find_checkpoint``); the ranks share the hashing."""
        return find_checkpoint(resume, root)

    @ray.method(concurrency_group="diag")
    def where(self) -> dict[str, Any]:
        """Where this rank is now (answers while a verb is blocked; see posttrain.diagnose)."""
        return where_now()

    def param_dtype(self) -> torch.dtype:
        return dtype_from_name(self.model_cfg.dtype)

    def pid(self) -> int:
        return os.getpid()
