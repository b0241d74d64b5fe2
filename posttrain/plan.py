"""Per-device memory plan of a recipe, before anything starts (``posttrain plan RECIPE``).

    recipe ─► PlanInputs (model shape from config.json on the meta device, dtypes, FSDP world,
              offload, LoRA, placement, engine budget)
           ─► one Device per kind of GPU (colocated: trainer rank + engine; or trainer / engine)
              x phases (train: trainer steps, engines asleep; generate: engines serve, trainer
              offloaded or not; sync: engine weights awake while the trainer sends buckets)
           ─► verdict against cluster.gpu_memory_gib, and the knobs that make it fit

Everything is arithmetic on the model's shape: no weights are read, nothing is allocated (the
model is built on the meta device to count its parameters exactly, LoRA adapters included).
Figures are estimates with stated rules (see each ``*_bytes`` function); the CPU test checks the
trainer's figure against a measured peak RSS (tests/unit/test_memory_plan.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + allocator slack, per process on a device (H100: ~500 MiB)
ENGINE_WORKSPACE_BYTES = 1 * GIB  # vLLM's profiled activations / sampler buffers inside its budget
LOGPROB_CHUNK_TOKENS = 4096  # posttrain.algorithms.logprobs.DEFAULT_CHUNK_TOKENS (fp32 blocks of positions)
FUSED_BLOCK_ELEMENTS = 1 << 22  # fp32 logits of one block of the fused LM head (model.fused_lm_head)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, counted on its meta-device instance."""

    name: str
    params: int  # all parameters (tied ones once)
    trainable: int  # parameters with requires_grad (LoRA: the adapters)
    root_params: int  # parameters outside the transformer blocks (embeddings, head, final norm)
    layer_params: int  # the largest transformer block
    layers: int
    hidden: int
    vocab: int
    kv_dim: int  # key (= value) width: kv_heads x head_dim
    mlp_width: int  # per-token MLP activation width: intermediate (dense) or top_k x moe_intermediate


@dataclass(frozen=True)
class PlanInputs:
    model: ModelShape
    engine_model_params: int  # the base model the engine serves (no adapters)
    param_bytes: int  # trainer master weights
    compute_bytes: int  # bf16 mixed precision: 2; otherwise the param dtype
    mixed_precision: bool
    world_size: int
    tokens_per_micro_batch: int
    rows_per_micro_batch: int
    activation_checkpointing: bool
    offload: bool
    reference: bool  # a frozen reference model (sharded like the policy, never offloaded here)
    critic: bool  # PPO's value model (trainable, same size as the policy)
    fused_head: bool  # model.fused_lm_head: the LM head runs block by block, no [tokens, vocab] logits
    gpu_memory_gib: float
    on_gpu: bool  # the recipe puts trainer ranks on GPUs
    # rollout engines (None: offline recipe)
    engine: bool = False
    colocated: bool = False
    engine_bytes: int = 2
    tensor_parallel: int = 1
    num_workers: int = 0
    gpu_memory_utilization: float = 0.0
    max_model_len: int = 0
    bucket_bytes: int = 0
    transport: str = "object_store"


@dataclass
class Device:
    """One kind of device of the plan; ``count`` of them are alike."""

    label: str
    count: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> row -> bytes
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # engine checks that fail inside its budget

    def peak(self) -> tuple[str, int]:
        phase = max(self.phases, key=lambda p: sum(self.phases[p].values()))
        return phase, sum(self.phases[phase].values())


@dataclass
class Plan:
    inputs: PlanInputs
    devices: list[Device]
    capacity: int  # bytes per device
    knobs: list[str] = field(default_factory=list)  # filled when it does not fit

    @property
    def fits(self) -> bool:
        return all(d.peak()[1] <= self.capacity and not d.problems for d in self.devices)


# --- model shape ---------------------------------------------------------------------------------


def model_shape(model: Any) -> ModelShape:
    """Count a (meta-device) HF causal LM: parameters, the largest block, widths for activations."""
    from posttrain.engine.trainer import transformer_layers

    c = model.config
    c = getattr(c, "text_config", None) or c
    seen: set[int] = set()
    params = trainable = 0
    for p in model.parameters():  # parameters() yields tied ones once
        seen.add(id(p))
        params += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    blocks = transformer_layers(model)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks] or [0]
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    experts_per_tok = getattr(c, "num_experts_per_tok", None)
    moe_width = getattr(c, "moe_intermediate_size", None)
    mlp_width = experts_per_tok * moe_width if experts_per_tok and moe_width else c.intermediate_size
    return ModelShape(
        name=type(model).__name__, params=params, trainable=trainable, root_params=params - sum(block_sizes),
        layer_params=max(block_sizes), layers=c.num_hidden_layers, hidden=c.hidden_size, vocab=c.vocab_size,
        kv_dim=kv_heads * head_dim, mlp_width=mlp_width,
    )  # fmt: skip


def meta_shape(model_cfg: Any) -> tuple[ModelShape, int]:
    """(trainer's model shape with LoRA if configured, base parameter count) from ``model_cfg``
    (``posttrain.models.loading.ModelConfig``): config.json or the factory spec, on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.models.factory import build_on_meta
    from posttrain.models.loading import DTYPES, model_config

    model = build_on_meta(model_config(model_cfg), DTYPES[model_cfg.dtype], AutoModelForCausalLM, model_cfg.trust_remote_code)
    base = sum(p.numel() for p in model.parameters())
    if model_cfg.lora is not None:
        from posttrain.models.lora import apply_lora

        with torch.device("meta"):
            apply_lora(model, model_cfg.lora)
    return model_shape(model), base


# --- the rules -----------------------------------------------------------------------------------


def activation_bytes(i: PlanInputs) -> int:
    """Saved activations of one micro-batch for backward, in the compute dtype.

    Per token and block (Llama/Qwen, SDPA): the block and attention inputs, their norms, q, k, v,
    the attention output and o_proj input, the MLP input and norm (8 hidden + 2 kv widths), and
    gate, up, act(gate), act*up (4 MLP widths; MoE: top_k x moe_intermediate, each routed copy).
    Activation checkpointing keeps each block's input plus one block's full set (recomputed).
    """
    per_block = 8 * i.model.hidden + 2 * i.model.kv_dim + 4 * i.model.mlp_width
    n = i.tokens_per_micro_batch
    if i.activation_checkpointing:
        return n * (i.model.hidden * i.model.layers + per_block) * i.compute_bytes
    return n * per_block * i.model.layers * i.compute_bytes


def logits_bytes(i: PlanInputs) -> int:
    """Logits of one micro-batch while the loss runs.

    Fused head (``model.fused_lm_head``): one block of about FUSED_BLOCK_ELEMENTS fp32 logits at a
    time, with its fp32 copy, log-softmax and gradient: 4 blocks. Unfused: the [tokens, vocab]
    logits kept for the logprob backward and their gradient (compute dtype), plus the chunked
    logprob's fp32 blocks of LOGPROB_CHUNK_TOKENS positions (block, exp, gradient: 3)."""
    n, v = i.tokens_per_micro_batch, i.model.vocab
    if i.fused_head:
        return 4 * min(FUSED_BLOCK_ELEMENTS, n * v) * 4
    per_row = max(1, n // max(1, i.rows_per_micro_batch))
    return 2 * n * v * i.compute_bytes + 3 * min(LOGPROB_CHUNK_TOKENS, per_row) * v * 4


def trainer_rows(i: PlanInputs, phase: str) -> dict[str, int]:
    """One trainer rank's device bytes in ``phase`` (train / step / generate / sync)."""
    m, w = i.model, i.world_size
    sharded = w > 1 or i.mixed_precision
    models = 1 + int(i.critic)
    params = math.ceil(m.params / w) * i.param_bytes * models
    ref = math.ceil(m.params / w) * i.param_bytes if i.reference else 0
    trainable = m.trainable + (m.params if i.critic else 0)
    grads = math.ceil(trainable / w) * i.param_bytes
    optim = 2 * math.ceil(trainable / w) * 4  # AdamW exp_avg + exp_avg_sq (fp32; step scalars ignored)
    # FSDP2 all-gathers: the root (embeddings + head) stays unsharded from forward to backward;
    # two blocks at a time (the one computing and the one prefetched), in the compute dtype.
    gathered = (m.root_params + 2 * m.layer_params) * i.compute_bytes if sharded else 0
    if phase == "train":  # forward + backward of the last micro-batch: earlier ones' grads held
        return {"trainer params": params, "reference params": ref, "grads": grads, "optimizer state": optim,
                "FSDP all-gather": gathered, "activations": activation_bytes(i), "logits": logits_bytes(i)}  # fmt: skip
    if phase == "step":  # clip + AdamW: foreach AdamW's sqrt(exp_avg_sq) is one fp32 temporary per shard
        return {"trainer params": params, "reference params": ref, "grads": grads, "optimizer state": optim,
                "optimizer step temp": math.ceil(trainable / w) * 4}  # fmt: skip
    if i.offload and i.colocated and phase == "generate":
        return {"trainer params": 0, "reference params": 0, "optimizer state": 0}
    rows = {"trainer params": params, "reference params": ref, "optimizer state": optim}
    if phase == "sync" and i.engine and i.transport in ("ipc", "collective"):
        # rank 0 fills one bucket while the previous one is in flight, on its device
        rows["send buffers"] = 2 * i.bucket_bytes
    # between steps grads are freed (zero_grad(set_to_none)); the sync gathers one tensor at a time
    return rows


def engine_rows(i: PlanInputs, phase: str) -> dict[str, int]:
    """One engine rank's device bytes: its weights (1/TP of the base model in the engine dtype),
    the KV cache (what is left of gpu_memory_utilization x device after weights and workspace),
    and the weight-sync receive buffers. Asleep (colocated, train phase) it keeps only its context."""
    if not i.engine:
        return {}
    weights = math.ceil(i.engine_model_params / i.tensor_parallel) * i.engine_bytes
    if i.colocated and phase in ("train", "step"):
        return {"engine weights": 0, "KV cache": 0, "receive buffers": 0}
    budget = int(i.gpu_memory_utilization * i.gpu_memory_gib * GIB)
    kv = max(0, budget - weights - ENGINE_WORKSPACE_BYTES)
    # receivers: two pooled buckets (one landing, one loading) for collective; IPC maps the
    # sender's; object_store lands one bucket at a time
    recv = {"collective": 2, "ipc": 0, "none": 0}.get(i.transport, 1) * i.bucket_bytes
    if phase == "sync" and i.colocated:  # weights woken for the sync; the KV cache after it
        return {"engine weights": weights, "KV cache": 0, "receive buffers": recv}
    rows = {"engine weights": weights, "engine workspace": ENGINE_WORKSPACE_BYTES, "KV cache": kv}
    return {**rows, "receive buffers": recv} if phase == "sync" else rows


def kv_bytes_per_token(i: PlanInputs) -> int:
    return 2 * i.model.layers * i.model.kv_dim * i.engine_bytes // i.tensor_parallel


def build_plan(i: PlanInputs) -> Plan:
    """The devices of ``i`` with their per-phase rows, and the engine checks inside its budget."""
    capacity = int(i.gpu_memory_gib * GIB)
    phases = ("train", "step", "generate", "sync") if i.engine else ("train", "step")
    devices: list[Device] = []

    def device(label: str, count: int, trainer: bool, engine: bool) -> Device:
        d = Device(label, count)
        for ph in phases:
            rows: dict[str, int] = {}
            if trainer:
                rows.update(trainer_rows(i, ph))
            if engine:
                rows.update(engine_rows(i, ph))
            if i.on_gpu or engine:
                rows["CUDA contexts"] = CONTEXT_BYTES * (int(trainer) + int(engine))
            d.phases[ph] = rows
        if engine:
            weights = math.ceil(i.engine_model_params / i.tensor_parallel) * i.engine_bytes
            budget = i.gpu_memory_utilization * capacity
            kv = budget - weights - ENGINE_WORKSPACE_BYTES
            need = i.max_model_len * kv_bytes_per_token(i)
            if kv < need:
                d.problems.append(
                    f"the engine's budget (rollout.engine.gpu_memory_utilization={i.gpu_memory_utilization} x "
                    f"{i.gpu_memory_gib:g} GiB = {budget / GIB:.1f} GiB) leaves {max(kv, 0) / GIB:.1f} GiB of KV cache after "
                    f"{weights / GIB:.1f} GiB of weights; one {i.max_model_len}-token sequence needs {need / GIB:.2f} GiB"
                )
            else:
                d.notes.append(f"KV cache holds {int(kv // need)} sequences of {i.max_model_len} tokens")
        return d

    if i.engine and i.colocated:
        devices.append(device("GPU (trainer rank + engine)", max(i.world_size, i.num_workers * i.tensor_parallel), True, True))
    else:
        devices.append(device("GPU (trainer rank)" if i.on_gpu else "CPU (trainer rank, host memory)", i.world_size, True, False))
        if i.engine:
            devices.append(device("GPU (engine rank)", i.num_workers * i.tensor_parallel, False, True))
    return Plan(i, devices, capacity)


# Knobs tried when a plan does not fit, as PlanInputs fields.
def _candidates(i: PlanInputs) -> list[dict[str, Any]]:
    worlds = sorted({w for w in (i.world_size, 2, 4, 8, 16, 32, 64) if w >= i.world_size})
    options: dict[str, list[Any]] = {"world_size": worlds, "activation_checkpointing": sorted({i.activation_checkpointing, True})}
    if i.engine:
        options["gpu_memory_utilization"] = sorted({i.gpu_memory_utilization, 0.6, 0.75, 0.9})
        # an engine on its own GPUs may split its weights over more of them
        options["tensor_parallel"] = sorted({t for t in (i.tensor_parallel, 2, 4, 8) if t >= i.tensor_parallel})
    if i.engine and i.colocated:
        options["offload"] = sorted({i.offload, True})
        options["colocated"] = [True, False]
    keys = list(options)
    out, seen = [], set()
    for combo in itertools.product(*(options[k] for k in keys)):
        change = dict(zip(keys, combo, strict=True))
        if change.get("colocated") and change["tensor_parallel"] > 1:
            continue  # colocated engines run TP 1 (one engine rank per trainer rank's GPU)
        if change.get("colocated") is False:  # no offload, no IPC without a shared GPU
            change.update(offload=False, transport="collective")
        key = tuple(sorted(change.items()))
        if key not in seen:
            seen.add(key)
            out.append(change)
    return out


KNOB_KEYS = {
    "world_size": "trainer.world_size",
    "activation_checkpointing": "model.activation_checkpointing",
    "offload": "trainer.offload",
    "gpu_memory_utilization": "rollout.engine.gpu_memory_utilization",
    "tensor_parallel": "rollout.engine.tensor_parallel_size",
    "colocated": "cluster.placement",
    "transport": "sync.transport",
    "num_workers": "rollout.num_workers",
}


def _override(key: str, value: Any) -> str:
    if key == "colocated":
        return f"cluster.placement={'colocated' if value else 'disaggregated'}"
    return f"{KNOB_KEYS[key]}={str(value).lower() if isinstance(value, bool) else value}"


def suggest(i: PlanInputs, limit: int = 3) -> list[str]:
    """Up to ``limit`` sets of overrides that make the plan fit: fewest GPUs first, then fewest
    keys changed, then the lowest peak. Colocated: an engine per trainer rank (rollout.num_workers
    follows trainer.world_size)."""
    found = []
    for change in _candidates(i):
        if change.get("colocated", False) and i.num_workers == i.world_size:
            change = {**change, "num_workers": change["world_size"]}
        changed = {k: v for k, v in change.items() if getattr(i, k) != v}
        if not changed:
            continue
        plan = build_plan(dataclasses.replace(i, **change))
        if plan.fits:
            gpus = sum(d.count for d in plan.devices)
            peak = max(d.peak()[1] for d in plan.devices)
            found.append((gpus, len(changed), peak, changed))
    found.sort(key=lambda f: (f[0], f[1], f[2], sorted(map(str, f[3].items()))))
    out, chosen = [], []
    for gpus, _, peak, changed in found:
        if any(set(c) <= set(changed) for c in chosen):  # the same keys, or more, than a kept one
            continue
        chosen.append(changed)
        keys = " ".join(_override(k, v) for k, v in changed.items())
        if "tensor_parallel" in changed:  # the engine actor holds the GPUs of all its ranks
            keys += f" rollout.gpus_per_worker={changed['tensor_parallel']}"
        out.append(f"{keys}  ({gpus} GPUs, peak {peak / GIB:.1f} GiB)")
        if len(out) == limit:
            break
    return out


# --- from a recipe -------------------------------------------------------------------------------


def plan_inputs(cfg: Any) -> PlanInputs:
    """Read the recipe's sections (``posttrain.config.schema.RecipeConfig``) into PlanInputs."""
    shape, base = meta_shape(cfg.model)
    t = cfg.trainer
    on_gpu = bool(cfg.cluster is not None and cfg.cluster.gpus_per_trainer_rank > 0) or t.backend == "nccl"
    mixed = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and on_gpu)
    param_bytes = BYTES[cfg.model.dtype]
    engine_cfg = dict(cfg.rollout.engine) if cfg.rollout is not None else {}
    seq = cfg.data.max_length
    if cfg.rollout is not None:  # prompt + completion, bounded by what the engine serves
        seq = min(cfg.data.max_length + cfg.rollout.sampling.max_tokens, engine_cfg.get("max_model_len") or 10**9)
    if t.max_tokens_per_micro_batch is not None:
        tokens, rows = t.max_tokens_per_micro_batch, max(1, t.max_tokens_per_micro_batch // seq)
    else:
        tokens, rows = t.micro_batch_size * seq, t.micro_batch_size
    algo = cfg.algorithm
    reference = bool(getattr(algo, "use_reference", False) or getattr(algo, "needs_reference", False)) and cfg.model.lora is None
    common = dict(
        model=shape, engine_model_params=base, param_bytes=param_bytes, compute_bytes=2 if mixed else param_bytes,
        mixed_precision=mixed, world_size=t.world_size, tokens_per_micro_batch=tokens, rows_per_micro_batch=rows,
        activation_checkpointing=cfg.model.activation_checkpointing, offload=t.offload, reference=reference,
        critic=getattr(algo, "critic", None) is not None, fused_head=cfg.model.fused_lm_head,
        gpu_memory_gib=float(getattr(cfg.cluster, "gpu_memory_gib", 80.0) if cfg.cluster is not None else 80.0),
        on_gpu=on_gpu,
    )  # fmt: skip
    if cfg.rollout is None:
        return PlanInputs(**common)
    from posttrain.config.targets import import_object

    engine_cls = import_object(engine_cfg.get("_target_", "posttrain.rollout.vllm_engine.VLLMEngineConfig"), "rollout.engine._target_", "recipe")
    defaults = {f.name: f.default for f in dataclasses.fields(engine_cls) if f.default is not dataclasses.MISSING}
    get = lambda key: engine_cfg.get(key, defaults.get(key))  # noqa: E731 — the engine's own default
    colocated = cfg.cluster is not None and cfg.cluster.placement == "colocated"
    # sync.transport null: the placement's default (posttrain.rl.config.SyncConfig): IPC colocated on
    # GPU. No sync section (rejection sampling): the engine is never updated, no buffers.
    sync = cfg.sync
    transport = "none" if sync is None else sync.transport or ("ipc" if colocated and on_gpu else "object_store")
    bucket = 0 if sync is None else sync.bucket_mb << 20
    return PlanInputs(
        **common, engine=cfg.rollout.gpus_per_worker > 0, colocated=colocated,
        engine_bytes=BYTES[get("dtype") or "float32"], tensor_parallel=int(get("tensor_parallel_size") or 1),
        num_workers=cfg.rollout.num_workers, gpu_memory_utilization=float(get("gpu_memory_utilization") or 0.0),
        max_model_len=int(get("max_model_len") or seq), bucket_bytes=bucket, transport=transport,
    )  # fmt: skip


def plan_recipe(cfg: Any) -> Plan:
    inputs = plan_inputs(cfg)
    plan = build_plan(inputs)
    if inputs.on_gpu and not plan.fits:
        plan.knobs = suggest(inputs)
    return plan


# --- the table -----------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(plan: Plan) -> str:
    """The plan as a table: one block per kind of device, rows x phases, in GiB, then the verdict."""
    i, m = plan.inputs, plan.inputs.model
    big = max(d.peak()[1] for d in plan.devices) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2**20)
    fmt = lambda b: f"{b / scale:10.2f}"  # noqa: E731
    lines = [
        f"# memory plan ({unit}): {m.name}, {_count(m.params)} parameters ({_count(m.trainable)} trainable), "
        f"{'bf16 compute over ' if i.mixed_precision else ''}{ {4: 'fp32', 2: '16-bit'}[i.param_bytes] } weights, "
        f"FSDP world {i.world_size}, {i.tokens_per_micro_batch} tokens per micro-batch"
        + (", activation checkpointing" if i.activation_checkpointing else "")
        + (f", {'colocated' if i.colocated else 'disaggregated'} engines (TP {i.tensor_parallel}, "
           f"gpu_memory_utilization {i.gpu_memory_utilization})" if i.engine else "")
        + (", trainer offload" if i.offload else "")
        + (", fused LM head" if i.fused_head else ", unfused LM head ([tokens, vocab] logits)"),
    ]  # fmt: skip
    for d in plan.devices:
        phases = list(d.phases)
        lines.append(f"{d.label} x{d.count}:")
        lines.append(f"  {'':24s}" + "".join(f"{p:>10s}" for p in phases))
        rows = list(dict.fromkeys(r for p in phases for r in d.phases[p]))
        rows.sort(key=lambda r: r == "CUDA contexts")  # last, the rest in order of appearance
        for r in rows:
            values = [d.phases[p].get(r, 0) for p in phases]
            if any(values):
                lines.append(f"  {r:24s}" + "".join(fmt(v) for v in values))
        lines.append(f"  {'total':24s}" + "".join(fmt(sum(d.phases[p].values())) for p in phases))
        phase, peak = d.peak()
        if not i.on_gpu:
            lines.append(f"  peak {peak / scale:.2f} {unit} of host memory ({phase}); no GPU in this recipe, not checked")
            continue
        verdict = "fits" if peak <= plan.capacity and not d.problems else "DOES NOT FIT"
        lines.append(f"  {verdict}: peak {peak / GIB:.1f} GiB ({phase}) of {plan.capacity / GIB:g} GiB (cluster.gpu_memory_gib)")
        lines.extend(f"  note: {n}" for n in d.notes)
        lines.extend(f"  problem: {p}" for p in d.problems)
    if i.on_gpu:
        if plan.fits:
            lines.append("verdict: fits")
        else:
            lines.append("verdict: does not fit; turn one of:" if plan.knobs else
                         "verdict: does not fit, and no trainer.world_size up to 64 with activation checkpointing, "
                         "offload and gpu_memory_utilization makes it: use model.lora or a larger cluster.gpu_memory_gib")  # fmt: skip
            lines.extend(f"  {k}" for k in plan.knobs)
    return "\n".join(lines)
