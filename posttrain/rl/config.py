"""Typed config of an online-RL recipe: the algorithm section plus rollout / reward / cluster.

The algorithm section (``algorithm: {_target_: posttrain.rl.config.OnlineRLConfig, ...}``) chooses
the advantage estimator and the policy loss by ``_target_`` too, so GRPO, Dr.GRPO, RLOO, DAPO,
GSPO and PPO are parameterisations of one loop, not copies of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from posttrain.algorithms.advantages import GRPOAdvantage, ReinforcePlusPlusBaselineAdvantage, RLOOAdvantage
from posttrain.algorithms.kl import AdaptiveKLController, FixedKLController, KLEstimator, check_kl_in_reward
from posttrain.algorithms.policy_loss import GRPOLossConfig, PolicyLossConfig
from posttrain.config.targets import build_dataclass
from posttrain.rl.contract import expected_overlap, staleness_contract
from posttrain.rollout.env import SYNC_ONLY, AgentConfig, describe
from posttrain.rollout.sampling import SamplingConfig
from posttrain.sync.config import SyncConfig, default_transport  # noqa: F401 — the recipe's sync section


@dataclass
class RolloutSection:
    """``rollout:`` — engine, sampling, workers. ``engine`` holds the engine config's fields
    (``_target_`` picks vLLM or HF); ``model_path`` is filled in by the controller."""

    engine: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "posttrain.rollout.vllm_engine.VLLMEngineConfig"}
    )
    # Typed and validated at load: a misspelt key (``temprature``) or a value out of range exits 2.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # In-flight weight updates at chunk granularity: each request generates at most this many new
    # tokens; unfinished completions continue (prompt + tokens so far) on whatever version the
    # worker serves next, every token recording its version. None: one request per completion.
    chunk_tokens: int | None = None
    # A rollout request running longer than this (seconds) is re-queued on another worker and
    # its worker is set aside until it answers (then re-synced). None: wait forever.
    request_timeout_s: float | None = None
    worker: str = "posttrain.rollout.actor.RolloutWorker"  # import path of the rollout actor class
    # A rollout worker whose process dies (SIGKILL, OOM, crash) is replaced in its placement bundle,
    # loaded with the newest weights, and its requests re-dispatched; past this many replacements
    # in a run, the run stops.
    max_worker_restarts: int = 3
    agent: AgentConfig = field(default_factory=AgentConfig)  # multi-turn: env + turn limits (posttrain/rl/agent.py)

    def validate(self) -> tuple[str, str, str] | None:
        if self.num_workers < 1:
            return ("num_workers", f"{self.num_workers} must be >= 1", "set rollout.num_workers=1 (or more)")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            return (
                "chunk_tokens",
                f"{self.chunk_tokens} must be >= 1",
                "set rollout.chunk_tokens=null (no chunking) or e.g. 8",
            )
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            return (
                "request_timeout_s",
                f"{self.request_timeout_s} must be > 0",
                "set rollout.request_timeout_s=null or e.g. 120",
            )
        if self.max_worker_restarts < 0:
            return ("max_worker_restarts", f"{self.max_worker_restarts} must be >= 0", "set rollout.max_worker_restarts=3")
        return None


@dataclass
class ClusterConfig:
    """``cluster:`` — where actors run. ``address: null`` starts a local Ray bound to 127.0.0.1."""

    address: str | None = None
    num_cpus: int | None = None  # local Ray only: logical CPUs to advertise (actors reserve these)
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    # How Ray puts the run's bundles (trainer ranks, rollout workers) on nodes: PACK (share a node
    # when they fit: cheap weight sync), SPREAD (as evenly over the nodes as they fit: trainer
    # ranks on different nodes), STRICT_SPREAD (each bundle on its own node), STRICT_PACK (one node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    cpus_per_trainer_rank: float = 1.0
    gpus_per_trainer_rank: float = 0.0
    # Every remote call to an actor (trainer verbs, weight updates, probes, synchronous generation
    # without rollout.request_timeout_s) and every trainer collective gives up after this many
    # seconds, naming the actor it waits on and where that actor is. null: wait forever.
    call_timeout_s: float | None = 1800.0
    # A trainer rank that dies (or a trainer call that times out) ends the step; the trainers are
    # restarted from the newest checkpoint that verifies and the rollout workers reloaded to its
    # version. After this many restarts in one run the run stops with the cause.
    max_trainer_restarts: int = 2
    # CPU threads of each phase (posttrain.rl.placement.phase_threads): "auto" gives the trainer's
    # update and the engine's generate all the cores of the node when they alternate in time
    # (algorithm.max_staleness: 0 or colocated, local Ray); "all" does so always; "reserved" runs
    # each actor on as many threads as the CPUs it reserved.
    phase_threads: Literal["auto", "all", "reserved"] = "auto"
    # Memory of one GPU (GiB): the per-device memory plan (posttrain plan, --dry-run) checks
    # every device against it. 80: H100/A100-80GB.
    gpu_memory_gib: float = 80.0

    def validate(self) -> tuple[str, str, str] | None:
        if self.gpu_memory_gib <= 0:
            return ("gpu_memory_gib", f"{self.gpu_memory_gib} must be > 0", "set cluster.gpu_memory_gib to your GPU's memory, e.g. 80")
        if self.phase_threads not in ("auto", "all", "reserved"):
            return ("phase_threads", f"{self.phase_threads!r} is not a thread policy", "use auto, all or reserved")
        if self.call_timeout_s is not None and self.call_timeout_s <= 0:
            return ("call_timeout_s", f"{self.call_timeout_s} must be > 0", "set cluster.call_timeout_s=1800 or null")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            return ("placement_strategy", f"{self.placement_strategy!r} is not a Ray placement strategy",
                    "use PACK (default), SPREAD, STRICT_PACK or STRICT_SPREAD")  # fmt: skip
        if self.max_trainer_restarts < 0:
            return ("max_trainer_restarts", f"{self.max_trainer_restarts} must be >= 0", "set cluster.max_trainer_restarts=2")
        return None


@dataclass
class Deadlines:
    """How long each kind of remote call may take (seconds; None: no limit), from the recipe."""

    call_s: float | None  # cluster.call_timeout_s: trainer verbs, weight updates, probes
    request_s: float | None  # one generate request: rollout.request_timeout_s, else call_s
    aside_s: float | None  # rollout.request_timeout_s: a worker slower than this is set aside

    STARTUP_S: ClassVar[float] = 600.0  # starting an actor (model load, compile, rendezvous)

    @property
    def startup_s(self) -> float | None:
        return None if self.call_s is None else max(self.call_s, self.STARTUP_S)

    @classmethod
    def of(cls, cluster: ClusterConfig, rollout: RolloutSection) -> Deadlines:
        request = rollout.request_timeout_s
        return cls(cluster.call_timeout_s, request if request is not None else cluster.call_timeout_s, request)


@dataclass
class CriticConfig:
    """PPO's value model: a token-classification head (1 label) on the policy's backbone."""

    lr: float = 1e-3
    value_clip: float | None = 0.2


# Estimators whose baseline is the prompt's other samples (a group of one has zero advantage).
GROUP_ESTIMATORS = (GRPOAdvantage, RLOOAdvantage, ReinforcePlusPlusBaselineAdvantage)


@dataclass
class OnlineRLConfig:
    """One online-RL step: ``prompts_per_step`` prompts x ``rollout.sampling.n`` samples.

    The batch is split into ``mini_batches`` optimizer steps per rollout batch (PPO epochs = 1
    pass over it); with one mini-batch the update is exactly on-policy.
    """

    prompts_per_step: int = 8
    mini_batches: int = 1
    # PPO epochs: passes over the step's samples, each in ``mini_batches`` shuffled mini-batches
    # (one optimizer step each); with more than one the pre-update logprobs are recomputed.
    ppo_epochs: int = 1
    advantage: Any = field(default_factory=GRPOAdvantage)  # _target_: posttrain.algorithms.advantages.*
    loss: PolicyLossConfig = field(default_factory=GRPOLossConfig)
    # KL to the reference subtracted from the reward per token (as verl): r_t -= coef * KL_t;
    # loss.kl_coef for KL in the loss. adaptive_kl: the coefficient adapts to a target KL instead
    # (starting at its init_coef; kl_in_reward_coef stays 0 then).
    kl_in_reward_coef: float = 0.0
    kl_in_reward_estimator: KLEstimator = "k1"
    adaptive_kl: AdaptiveKLController | None = None
    use_reference: bool = False  # load a frozen reference model (needed when any KL coefficient > 0)
    # What the reference's logprobs are of. temperature: softmax(logits / rollout temperature), a
    # distribution (as verl). sampler: also the sampler's top-p filter, with the sampled token kept
    # in the nucleus as for the behaviour logprobs: NOT a distribution (with logits [2, 0, -2] and
    # top_p 0.5 the probabilities of the three tokens sum to 1.137), so the "KL" is not a KL.
    reference_logprobs: Literal["temperature", "sampler"] = "temperature"
    # auto: with one mini-batch (and no KL in the reward) the trainer's logprobs before the update
    # are those of the loss's own forward, detached, so no separate forward pass is run for them;
    # always: recompute them in a forward pass before training (e.g. for models with dropout).
    recompute_old_logprobs: Literal["auto", "always"] = "auto"
    critic: CriticConfig | None = None  # set for PPO (GAE advantages)
    # DAPO dynamic sampling: groups whose rewards all agree (zero advantage) are filtered out and
    # the step generates more prompts until it has prompts_per_step varied groups, at most
    # dynamic_sampling_max_rounds extra generation rounds (then the run stops, saying so).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 8
    overlong_filter: bool = False  # mask samples cut at max_tokens
    max_masked_fraction: float = 0.5  # more masked samples than this in a step stops the run
    # Bounded off-policyness: a sample whose oldest token came from policy version v_min may enter
    # the optimizer step that turns version s into s+1 only if s - v_min <= max_staleness.
    # 0 = the synchronous algorithm. See posttrain/rl/loops/pipelined.py.
    max_staleness: int = 0
    # pace: rollouts never start a batch that would be too stale when trained (nothing is wasted);
    # drop: rollouts run one batch further ahead and too-stale groups are dropped and regenerated.
    staleness_policy: Literal["pace", "drop"] = "pace"

    def validate(self) -> tuple[str, str, str] | None:
        if not callable(getattr(self.advantage, "compute", None)):
            return (
                "advantage._target_",
                f"{type(self.advantage).__name__} is not an advantage estimator (it has no compute())",
                "point algorithm.advantage._target_ at one of posttrain.algorithms.advantages: GRPOAdvantage, "
                "RLOOAdvantage, GAEAdvantage, ReinforcePlusPlusAdvantage, ReinforcePlusPlusBaselineAdvantage",
            )
        if self.max_staleness < 0:
            return (
                "max_staleness",
                f"{self.max_staleness} must be >= 0",
                "set algorithm.max_staleness=0 for synchronous training",
            )
        if self.staleness_policy not in ("pace", "drop"):
            return (
                "staleness_policy",
                f"{self.staleness_policy!r} is not allowed",
                "use pace (default) or drop",
            )
        if self.reference_logprobs not in ("temperature", "sampler"):
            return (
                "reference_logprobs",
                f"{self.reference_logprobs!r} is not allowed",
                "use temperature (default, as verl) or sampler (top-p filtered too; not a distribution)",
            )
        if self.recompute_old_logprobs not in ("auto", "always"):
            return (
                "recompute_old_logprobs",
                f"{self.recompute_old_logprobs!r} is not allowed",
                "use auto (default) or always",
            )
        if self.max_staleness > 0 and self.loss.tis_cap is None and not self.loss.decoupled:
            return (
                "max_staleness",
                f"max_staleness={self.max_staleness} trains on samples from older policies, but the loss has no off-policy "
                "correction (loss.tis_cap is null and loss.decoupled is false)",
                "set algorithm.loss.tis_cap (e.g. 2.0, truncated IS) or algorithm.loss.decoupled=true, or max_staleness=0",
            )
        problem = check_kl_in_reward(self.kl_in_reward_coef, self.kl_in_reward_estimator)
        if problem:
            return problem
        if self.adaptive_kl is not None and self.kl_in_reward_coef > 0:
            return ("adaptive_kl", "both adaptive_kl and kl_in_reward_coef set the KL-in-reward coefficient",
                    "keep one: algorithm.kl_in_reward_coef=0 with adaptive_kl (it starts at adaptive_kl.init_coef)")  # fmt: skip
        if self.ppo_epochs < 1:
            return ("ppo_epochs", f"{self.ppo_epochs} must be >= 1", "set algorithm.ppo_epochs=1")
        if self.dynamic_sampling_max_rounds < 0:
            return ("dynamic_sampling_max_rounds", f"{self.dynamic_sampling_max_rounds} must be >= 0", "e.g. 8")
        if self.dynamic_sampling and (self.max_staleness > 0 or self.staleness_policy == "drop"):
            return ("dynamic_sampling", "refilling a step with new prompts needs the prompt stream in step order; "
                    "with max_staleness > 0 (or staleness_policy=drop) later steps have already taken the next prompts",
                    "set algorithm.max_staleness=0 and staleness_policy=pace with dynamic_sampling")  # fmt: skip
        needs_ref = self.kl_in_reward or self.loss.kl_coef > 0
        if needs_ref and not self.use_reference:
            return (
                "use_reference",
                "a KL coefficient is set but use_reference is false",
                "set algorithm.use_reference=true",
            )
        if self.mini_batches < 1:
            return ("mini_batches", "must be >= 1", "set algorithm.mini_batches=1 for on-policy updates")
        return None

    # The CLI imports the runner by this path: the config does not import the driver.
    runner: ClassVar[str] = "posttrain.rl.controller.run_rl"

    def build(self):
        return self

    def derived_counts(self, cfg) -> dict[str, Any]:
        n, max_new = cfg.rollout.sampling.n, cfg.rollout.sampling.max_tokens
        return {
            "prompts_per_step": self.prompts_per_step,
            "samples_per_step": self.prompts_per_step * n,
            "group_size": n,
            "rollout_steps": cfg.trainer.max_steps,
            "optimizer_steps": cfg.trainer.max_steps * self.mini_batches * self.ppo_epochs,
            "max_new_tokens_per_step": self.prompts_per_step * n * max_new,
            "trainer_ranks": cfg.trainer.world_size,
            "rollout_workers": cfg.rollout.num_workers,
            "placement": cfg.cluster.placement,
            "reward_nodes": [node.name for node in cfg.reward.nodes],
            "staleness_contract": staleness_contract(self, cfg),
            "expected_overlap": expected_overlap(self, cfg),
            **({"environment": describe(cfg.rollout.agent)} if cfg.rollout.agent.env else {}),
        }

    @property
    def recompute_old(self) -> bool:
        """Whether a forward pass before training recomputes the trainer's pre-update logprobs.

        Not needed with one mini-batch: the update's own forward gives them (detached), the same
        values in a model without dropout. KL in the reward needs them before the advantages.
        """
        return (
            self.recompute_old_logprobs == "always" or self.mini_batches > 1 or self.ppo_epochs > 1 or self.kl_in_reward
        )

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_in_reward_coef > 0 or self.adaptive_kl is not None

    def kl_controller(self) -> FixedKLController | AdaptiveKLController:
        """A fresh controller of the KL-in-reward coefficient (its state travels in checkpoints)."""
        if self.adaptive_kl is not None:
            return AdaptiveKLController(self.adaptive_kl.init_coef, self.adaptive_kl.target_kl, self.adaptive_kl.horizon)
        return FixedKLController(self.kl_in_reward_coef)

    def check_recipe(self, cfg) -> tuple[str, str, str] | None:
        """Cross-section consistency: the trainer's batch is the rollout batch."""
        n, sampling = cfg.rollout.sampling.n, cfg.rollout.sampling
        mode = (cfg.rollout.engine or {}).get("logprobs_mode", "processed_logprobs")
        if mode == "raw_logprobs" and (sampling.temperature not in (0.0, 1.0) or sampling.top_p < 1.0):
            return (
                "rollout.engine.logprobs_mode",
                f"raw_logprobs reports the unprocessed model's logprobs, but sampling uses temperature={sampling.temperature}, "
                f"top_p={sampling.top_p}: the importance ratios would compare different distributions",
                "use rollout.engine.logprobs_mode=processed_logprobs (the default), or temperature=1.0 and top_p=1.0",
            )
        if n < 2 and isinstance(self.advantage, GROUP_ESTIMATORS):
            return (
                "rollout.sampling.n",
                f"group size {n} with {type(self.advantage).__name__}: a group estimator compares the samples of a "
                "prompt with each other, so every sample would get zero advantage",
                "set rollout.sampling.n >= 2 (e.g. 8), or use GAEAdvantage / ReinforcePlusPlusAdvantage",
            )
        samples = self.prompts_per_step * n
        if cfg.trainer.global_batch_size != samples:
            return (
                "trainer.global_batch_size",
                f"{cfg.trainer.global_batch_size} != algorithm.prompts_per_step x rollout.sampling.n = {samples}",
                f"set trainer.global_batch_size={samples} (samples per step)",
            )
        if cfg.rollout.agent.env and (cfg.rollout.request_timeout_s or cfg.rollout.chunk_tokens):
            return ("rollout.agent.env", SYNC_ONLY, "set rollout.request_timeout_s=null and rollout.chunk_tokens=null")
        asynchronous = (
            self.max_staleness > 0
            or cfg.rollout.chunk_tokens is not None
            or cfg.rollout.request_timeout_s is not None
        )
        if asynchronous and cfg.cluster.placement == "colocated":
            return (
                "algorithm.max_staleness",
                "colocated placement shares devices between trainer and rollout workers, so "
                "rollouts cannot overlap training (max_staleness > 0, rollout.chunk_tokens, rollout.request_timeout_s)",
                "use cluster.placement=disaggregated, or max_staleness=0 with chunk_tokens/request_timeout_s null",
            )
        tp = int((cfg.rollout.engine or {}).get("tensor_parallel_size", 1))
        if cfg.cluster.placement == "colocated" and tp > 1 and cfg.rollout.gpus_per_worker > 0:
            return ("rollout.engine.tensor_parallel_size", f"colocated placement gives a rollout worker half of one trainer "
                    f"rank's bundle, but tensor_parallel_size={tp} needs {tp} GPUs visible in the worker's process",
                    "use cluster.placement=disaggregated for tensor-parallel workers, or tensor_parallel_size=1")  # fmt: skip
        on_gpu = cfg.cluster.gpus_per_trainer_rank > 0 or cfg.rollout.gpus_per_worker > 0
        problem = cfg.sync.check_placement(cfg.cluster.placement, on_gpu, cfg.rollout.num_workers, cfg.trainer.world_size)
        if problem is not None:
            return problem
        if cfg.trainer.offload and cfg.cluster.placement != "colocated":
            return ("trainer.offload", "offloading frees the trainer's devices for rollout engines that share them, "
                    f"but cluster.placement={cfg.cluster.placement}: no engine shares them",
                    "set cluster.placement=colocated, or trainer.offload=false")  # fmt: skip
        per_mini = samples // self.mini_batches
        if samples % self.mini_batches or per_mini % (cfg.trainer.micro_batch_size * cfg.trainer.world_size):
            return (
                "algorithm.mini_batches",
                f"{samples} samples do not split into {self.mini_batches} mini-batches of whole micro-batches",
                "choose mini_batches and trainer.micro_batch_size that divide the samples per step",
            )
        return None

    def sections(self) -> dict[str, type]:
        """Extra top-level recipe sections this algorithm needs, validated at load time."""
        from posttrain.rewards.config import RewardGraphConfig

        return {"rollout": RolloutSection, "reward": RewardGraphConfig, "cluster": ClusterConfig, "sync": SyncConfig}


def build_section(tp: type, data: Any, key: str, source: str) -> Any:
    return build_dataclass(tp, data or {}, key, source)
