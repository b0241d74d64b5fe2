"""The FSDP2 trainer engine: shard, forward/backward with global-count normalisation, step.

Verbs: ``train_step`` (micro-batches -> one optimizer step), ``full_state_dict`` (gather for
export / weight sync), ``state_dict``/``load_state_dict`` (sharded, for checkpoints). It knows
nothing of algorithms beyond the ``loss_fn``/``count_fn`` it is handed, and imports no Ray.

Gradient accumulation is exact: every micro-batch loss is normalised by the GLOBAL count (all
micro-batches, all ranks) and the backward is scaled by the world size to undo FSDP's average over ranks, so k
micro-batches on r ranks give the same update as one batch of the same samples.

Models larger than one device: a sharded engine never moves an unsharded model to its device.
Rank 0 holds the loaded weights on the host (other ranks build the model on the meta device,
``posttrain.models.loading``); every rank turns its model into a meta skeleton, applies
``fully_shard``, allocates only its own shards on the device (``to_empty``) and receives them from
rank 0 (``set_model_state_dict(full_state_dict, broadcast_from_rank0)``). Gradients are
reduce-scattered after every micro-batch, so what accumulates is each rank's gradient shard, never
an unsharded fp32 gradient of the whole model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from posttrain.engine.packing import MicroPlan, equalize, pair_rows, plan, plan_pairs, uses_varlen
from posttrain.engine.schedule import ScheduleConfig, build_scheduler
from posttrain.metrics import metric_reduction

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch, float], tuple[torch.Tensor, dict[str, float]]]
CountFn = Callable[[Batch], float]


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainerConfig:
    """Optimisation and parallelism. Batch sizes count samples (pairs for DPO / reward models)."""

    max_steps: int = 100  # optimizer steps
    global_batch_size: int = 32  # samples per optimizer step, over all ranks
    micro_batch_size: int = 8  # samples per forward/backward on one rank
    world_size: int = 1  # FSDP2 ranks
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    mixed_precision: Literal["auto", "none", "bf16"] = "auto"  # auto: bf16 on GPU, none on CPU
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Sequence packing (posttrain.engine.packing): rows packed into micro-batches of at most this
    # many tokens, micro_batch_size then unused by the update. None: padded micro-batches of
    # micro_batch_size rows.
    max_tokens_per_micro_batch: int | None = None
    # Packed rows that begin with at least this many equal tokens (a GRPO group's samples of one
    # prompt) hold that prefix once, each row attending to it (exact; posttrain.engine.packing).
    # 0 disables. Not with flash-attention varlen on GPU, which cannot express it.
    share_prefix_min_tokens: int = 16
    # Online RL with cluster.placement=colocated: parameters and optimizer state go to host memory
    # while the rollout engines generate and come back before the trainer's next verb
    # (posttrain/rl/offload.py). On a CPU rank both are host memory: the calls run, nothing moves.
    offload: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> tuple[str, str, str] | None:
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            return (
                "global_batch_size",
                f"{self.global_batch_size} is not divisible by micro_batch_size*world_size = {per_step}",
                f"make global_batch_size a multiple of {per_step}",
            )
        if self.max_steps <= 0:
            return ("max_steps", "must be positive", "set trainer.max_steps >= 1")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch <= 0:
            return (
                "max_tokens_per_micro_batch",
                f"{self.max_tokens_per_micro_batch} must be positive",
                "set it to a token budget (e.g. 4096), or null for padded micro-batches",
            )
        return None

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (HF decoder layers)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    return []


def shard_model(model: torch.nn.Module, mesh, mixed_precision: bool) -> torch.nn.Module:
    """FSDP2: shard each transformer block, then the root (embeddings, head)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def on_meta(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a skeleton (every parameter on the meta device, no bytes held)."""
    return all(p.is_meta for p in model.parameters())


def to_meta_skeleton(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Turn ``model`` into a meta-device skeleton in place; returns what it held on the host.

    Returns ``(state_dict, extra_buffers)``: the full state dict (the original tensors, no copy)
    and the non-persistent buffers (rotary ``inv_freq`` ...), which ``load_state_dict`` does not
    restore. Tied parameters stay tied (one meta Parameter per original), which ``Module.to("meta")``
    would not guarantee. A model already on meta gives meta tensors (names and shapes only).
    """
    state = model.state_dict()
    persistent = set(state)
    extra = {n: b for n, b in model.named_buffers() if n not in persistent}
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device="meta")
    return state, extra


def materialize_sharded(
    model: torch.nn.Module, mesh, mixed_precision: bool, device: torch.device, source: bool
) -> torch.nn.Module:
    """Shard ``model`` and fill its shards on ``device`` without ever placing it whole there.

    ``source``: this rank holds the real weights (rank 0); the other ranks' models may be meta
    skeletons already. Collective: every rank of the mesh calls it. Peak device memory is this
    rank's shards plus one tensor in flight; rank 0 keeps the full weights on the host until the
    broadcast ends.
    """
    world = mesh.size()
    state, extra = to_meta_skeleton(model)  # on other ranks: meta tensors, only their names count
    shard_model(model, mesh, mixed_precision)
    model.to_empty(device=device)  # allocates the local shards (and replicated buffers) only
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_model_state_dict(model, state if source else {}, options=options)
    # Non-persistent buffers are not in the state dict: rank 0's values, broadcast.
    buffers = dict(model.named_buffers())
    for name in sorted(extra):
        target = buffers[name]
        if source:
            target.copy_(extra[name])
        if world > 1:
            dist.broadcast(target, src=0)
    return model


class TrainEngine:
    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, device: torch.device, trainable: bool = True) -> None:
        self.cfg, self.device = cfg, device
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != cfg.world_size:
            raise RuntimeError(f"trainer.world_size={cfg.world_size} but {world} ranks joined")
        self.mesh = init_device_mesh(device.type, (world,))
        use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
        # One rank without mixed precision gains nothing from FSDP's all-gathers: keep the plain
        # module (same maths; bench/sft_throughput.py measures the difference).
        self.sharded = world > 1 or use_bf16
        if self.sharded:
            # fully_shard before anything reaches the device; rank 0's weights are the source.
            source = (dist.get_rank() == 0) if dist.is_initialized() else True
            if source and on_meta(model):
                raise RuntimeError("rank 0 must hold the loaded weights; its model is on the meta device")
            self.model = materialize_sharded(model, self.mesh, use_bf16, device, source)
        else:
            if on_meta(model):
                raise RuntimeError("a one-rank engine without sharding needs a loaded model, not a meta skeleton")
            self.model = model.to(device)
        self.step = 0
        self.optimizer = self.scheduler = None
        if trainable:
            o = cfg.optim
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
            self.scheduler = build_scheduler(self.optimizer, cfg.max_steps, cfg.schedule)
        else:
            self.model.requires_grad_(False)
            self.model.eval()

    def _all_reduce(self, values: list[float], op: Any = None) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t.tolist()

    def plan_micro_batches(self, lengths: list[int], input_ids_BT: torch.Tensor | None = None, pairs: bool = False) -> list[MicroPlan]:
        """Packed micro-batches of this rank's rows (``trainer.max_tokens_per_micro_batch``), as many on
        every rank (collective): FSDP's per-forward all-gathers must pair up across ranks. With the
        rows' ids, rows sharing a prefix are planned together (``trainer.share_prefix_min_tokens``).
        ``pairs``: the rows are preference pairs (``packing.plan_pairs``), kept together."""
        assert self.cfg.max_tokens_per_micro_batch is not None
        share = self.cfg.share_prefix_min_tokens if input_ids_BT is not None and not uses_varlen(self.model, self.device) else 0
        how = plan_pairs if pairs else plan
        plans = how(lengths, self.cfg.max_tokens_per_micro_batch, input_ids_BT if share > 0 else None, share)
        (target,) = self._all_reduce([float(len(plans))], dist.ReduceOp.MAX)
        plans = equalize(plans, int(target))
        return pair_rows(plans, len(lengths) // 2) if pairs else plans

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn, count_fn: CountFn) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches. Returns globally reduced metrics.

        A step whose loss or gradient norm is not finite is skipped (no parameter change) and
        reported as ``skipped_nonfinite=1``.
        """
        self.model.train()
        (global_count,) = self._all_reduce([sum(count_fn(mb) for mb in micro_batches)])
        global_count = max(global_count, 1.0)
        world = dist.get_world_size() if dist.is_initialized() else 1
        loss_sum, sums, peaks = 0.0, defaultdict(float), {}
        for mb in micro_batches:
            mb = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
            # Sharded: every micro-batch's backward reduce-scatters (FSDP2's default), so each rank
            # accumulates its gradient shard. Skipping the sync until the last micro-batch
            # (set_requires_gradient_sync(False)) would keep an unsharded fp32 gradient of the
            # whole model on every rank: 4 bytes x parameters, what a model larger than one device
            # cannot afford.
            loss, metrics = loss_fn(self.model, mb, global_count)
            (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already global
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                how = metric_reduction(k)
                if how == "mean":
                    sums[k] += float(v)
                else:  # _max / _min keys: the extreme over micro-batches (and ranks, below)
                    sign = 1.0 if how == "max" else -1.0
                    peaks[k] = max(peaks.get(k, -math.inf), sign * float(v))
        keys, extremes = sorted(sums), sorted(peaks)
        reduced = self._all_reduce([loss_sum] + [sums[k] for k in keys])
        out = {"loss": reduced[0]}
        # Loss-function metrics are per-micro-batch values: the mean over all micro-batches.
        out.update({k: reduced[j + 1] / (len(micro_batches) * world) for j, k in enumerate(keys)})
        top = self._all_reduce([peaks[k] for k in extremes], dist.ReduceOp.MAX) if extremes else []
        out.update({k: v if metric_reduction(k) == "max" else -v for k, v in zip(extremes, top, strict=True)})
        grad_norm = self._clip_grads()
        out["grad_norm"] = grad_norm
        if not (math.isfinite(grad_norm) and math.isfinite(out["loss"])):
            self.optimizer.zero_grad(set_to_none=True)
            out["skipped_nonfinite"] = 1.0
            return out
        out["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out["global_count"] = global_count
        return out

    def _clip_grads(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def forward(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn(model)`` in eval mode without grad (e.g. reference or old logprobs). Collective."""
        was_training = self.model.training
        self.model.eval()
        try:
            return fn(self.model)
        finally:
            self.model.train(was_training)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU state dict (collective: every rank must call; rank 0 gets the tensors)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
