"""Colocated placement: who holds the devices when, per step.

With ``cluster.placement: colocated`` and ``trainer.offload: true`` the engines start once the
trainer ranks are ready (vLLM profiles free memory at start), and each synchronous step runs

    trainer offload -> engines wake -> generate -> engines sleep (level 2 once a sync follows every wake)
    -> trainer onload -> train -> engines wake(weights) -> push -> load -> trainer probe
    -> trainer offload (+ empty_cache) -> engines wake(kv_cache) -> engine probe

The first step also measures the probe's floor before training (both sides still on version 0):
the engines wake, score and sleep again (level 1: no sync follows that wake). The order test
drives the real ``TrainerGroup``, ``WorkerFleet``, ``WeightPublisher``, ``Step`` and
``RolloutWorker`` (its sleep-tag bookkeeping) on a local Ray, with a trainer rank and an engine
that log their verbs instead of holding models. The offload maths (``posttrain.rl.offload``) runs
on a real FSDP2 engine: on CPU host and device are one memory, so nothing moves and no memory is
released (a GPU run would report ``released_bytes > 0``); what is checked here is that the calls
keep the parameters, the optimizer state and the next update exactly as without them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import pytest
import torch

from posttrain.types import Completion, Group, PromptRecord, ScoredGroup

EVENTS = f"/tmp/posttrain_offload_events_{os.getpid()}"


def _note(event: str) -> None:
    with open(EVENTS, "a") as f:
        f.write(event + "\n")


class LoggingRank:
    """A trainer rank without a model: logs each verb."""

    def __init__(self, rank, spec) -> None:
        time.sleep(0.5)  # loading a model: engines started meanwhile would profile this memory as theirs
        self.rank = rank
        _note("trainer.start")

    def pid(self):
        return os.getpid()

    def node(self):
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": "127.0.0.1"}

    def offload(self):
        _note("trainer.offload")
        return {"trainer/offload_bytes": 8.0, "trainer/offload_released_bytes": 0.0}

    def onload(self):
        _note("trainer.onload")
        return {"trainer/onload_bytes": 8.0}

    def train(self, batch):
        _note("trainer.train")
        return {"loss": 0.0}

    def push_weights(self, version, wire_dtype=None):
        _note("trainer.push")
        return [float(version)], {"sync/bytes": 8.0}

    def probe(self, ids):
        _note("trainer.probe")
        return [[-0.5] * (len(ids[0]) - 1)]

    def where(self):
        return {"pid": os.getpid(), "host": "-", "busy": []}


class LoggingEngine:
    """An engine without a model: logs each verb (with vLLM's sleep level and wake tags)."""

    def __init__(self) -> None:
        self.version = 0
        _note("engine.start")

    def wake_up(self, tags=None):
        _note(f"engine.wake({','.join(tags) if tags else 'all'})")

    def sleep(self, level=1):
        _note(f"engine.sleep({level})")

    def generate(self, prompts, sampling):
        _note("engine.generate")
        return [Group(p, [Completion(p, i, [7, 8], "x", [-0.1, -0.2], [self.version] * 2, "stop") for i in range(2)]) for p in prompts]

    def load_weights(self, buckets, version, restore=False):
        list(buckets)
        _note("engine.load")
        self.version = version

    def score_tokens(self, ids):
        _note("engine.score")
        return [[-0.5] * (len(ids[0]) - 1)]

    def close(self):
        pass


def _logging_worker():
    from posttrain.rollout.actor import RolloutWorker

    class LoggingWorker(RolloutWorker):
        """The real rollout actor's verbs (asleep / awake by tag) over a logging engine."""

        def __init__(self, engine_cfg) -> None:
            self.engine, self.sleeping = LoggingEngine(), set()

    return LoggingWorker


class Scorer:
    def score_groups_sync(self, groups):
        return [ScoredGroup(g, [float(i) for i in range(len(g.completions))]) for g in groups], {}


class Ledger:
    def write(self, step, groups):
        pass

    def scored(self, step, scored):
        pass


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _events() -> list[str]:
    with open(EVENTS) as f:
        return f.read().split()


@pytest.mark.slow
@pytest.mark.parametrize("offload", [True, False])
def test_colocated_step_hands_the_devices_over_in_order(ray_local, offload):
    import ray
    from posttrain.rollout.sampling import SamplingConfig

    from posttrain.algorithms.advantages import GRPOAdvantage
    from posttrain.diagnose import remote_class
    from posttrain.engine.trainer import TrainerConfig
    from posttrain.models.loading import ModelConfig
    from posttrain.rl.config import ClusterConfig, Deadlines, OnlineRLConfig, RolloutSection, SyncConfig
    from posttrain.rl.fleet import WorkerFleet, start_in_order
    from posttrain.rl.placement import placement_group, plan_placement
    from posttrain.rl.publisher import WeightPublisher
    from posttrain.rl.step import Step
    from posttrain.rl.trainer_worker import TrainerSpec
    from posttrain.rl.trainers import TrainerGroup

    if os.path.exists(EVENTS):
        os.remove(EVENTS)
    plan = plan_placement(ClusterConfig(placement="colocated", cpus_per_trainer_rank=0.5), RolloutSection(cpus_per_worker=0.5), 1)
    pg = placement_group(plan)
    deadlines = Deadlines(call_s=60.0, request_s=60.0, aside_s=None)
    algo = OnlineRLConfig(prompts_per_step=2, advantage=GRPOAdvantage())
    trainer_cfg = TrainerConfig(global_batch_size=4, micro_batch_size=4, offload=offload)
    spec = TrainerSpec(1, "", ModelConfig(), trainer_cfg, algo, SyncConfig(), 1.0, 60.0)
    group_cls = type("LoggingGroup", (TrainerGroup,), {"trainer_class": LoggingRank})
    trainers, fleet = start_in_order(lambda: group_cls(spec, pg, plan, deadlines), lambda: WorkerFleet(
        remote_class(_logging_worker()), {}, pg, plan, deadlines, colocated=True, max_restarts=0, run_seed=0), colocated=True)
    try:
        publisher = WeightPublisher(trainers, fleet, SyncConfig(), torch.float32, drop_weights_on_sleep=True)
        step = Step(algo, Scorer(), trainers, publisher, Ledger(), pad_id=0)
        prompts = [PromptRecord(i, "p", [1, 2]) for i in range(2)]
        for _ in range(2):
            metrics = step(fleet.generate(prompts, SamplingConfig(n=2), on_lost=publisher.replace), 0.0)
        assert metrics["policy_version"] == 2.0
    finally:
        fleet.close()
        trainers.kill()
        ray.util.remove_placement_group(pg)
    off, on = (["trainer.offload"], ["trainer.onload"]) if offload else ([], [])
    publish = ["engine.wake(weights)", "trainer.push", "engine.load", "trainer.probe", *off, "engine.wake(kv_cache)", "engine.score"]
    first = [*off, "engine.generate", "engine.sleep(1)",  # the engines start awake
             "engine.wake(all)", "engine.score", "engine.sleep(1)", *on, "trainer.probe",  # the floor, at version 0
             "trainer.train", *publish]  # fmt: skip
    # the engines are awake (and the trainer off its devices) from the last probe on
    second = ["engine.generate", "engine.sleep(2)", *on, "trainer.train", *publish]
    assert _events() == ["trainer.start", "engine.start", *first, *second]
    assert metrics["sync/probe_floor_mean"] == 0.0
    if offload:
        assert metrics["trainer/offload_bytes"] == 8.0 and metrics["trainer/onload_bytes"] == 8.0
    else:
        assert "trainer/offload_bytes" not in metrics


def test_offload_requires_colocated_placement():
    from posttrain.rollout.sampling import SamplingConfig

    from posttrain.engine.trainer import TrainerConfig
    from posttrain.rl.config import ClusterConfig, OnlineRLConfig, RolloutSection, SyncConfig

    cfg = type("Cfg", (), {})()
    cfg.trainer = TrainerConfig(global_batch_size=64, micro_batch_size=8, offload=True)
    cfg.rollout, cfg.cluster = RolloutSection(sampling=SamplingConfig(n=8)), ClusterConfig(placement="disaggregated")
    cfg.sync = SyncConfig()
    problem = OnlineRLConfig().check_recipe(cfg)
    assert problem is not None and problem[0] == "trainer.offload" and "colocated" in problem[2]
    cfg.cluster = ClusterConfig(placement="colocated")
    assert OnlineRLConfig().check_recipe(cfg) is None


def test_sleep_mode_follows_the_platform_and_the_placement(tmp_path):
    """vLLM on CPU has no sleep mode: the engine starts without it and says why; colocated
    placement turns an unset ``enable_sleep_mode`` on."""
    from posttrain.rollout.vllm_engine import VLLMEngineConfig, sleep_unavailable

    class Platform:
        def __init__(self, name, ok):
            self.device_name, self.ok = name, ok

        def is_sleep_mode_available(self):
            return self.ok

    (tmp_path / "config.json").write_text("{}")
    cfg = VLLMEngineConfig(model_path=str(tmp_path))
    assert cfg.enable_sleep_mode is None and "off" in sleep_unavailable(cfg, Platform("cuda", True))
    on = dataclasses.replace(cfg, enable_sleep_mode=True)
    assert sleep_unavailable(on, Platform("cuda", True)) is None
    assert "cpu platform" in sleep_unavailable(on, Platform("cpu", False))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert sleep_unavailable(on, current_platform) is not None


def _fsdp_engine(offload_cycle: bool):
    """One FSDP2 rank (bf16 mixed precision: sharded even alone), two optimizer steps; with
    ``offload_cycle`` an offload and onload between them. Returns (params, optimizer state, stats)."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.engine.trainer import TrainEngine, TrainerConfig
    from posttrain.rl import offload

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    engine = TrainEngine(model, TrainerConfig(global_batch_size=2, micro_batch_size=2, mixed_precision="bf16"), torch.device("cpu"))
    assert engine.sharded
    ids = torch.randint(0, 64, (2, 6))
    loss = lambda m, mb, _c: (m(input_ids=mb["ids"], labels=mb["ids"]).loss, {})  # noqa: E731
    engine.train_step([{"ids": ids}], loss, lambda mb: 1.0)
    stats = {}
    if offload_cycle:
        params = [id(p) for p in engine.model.parameters()]
        stats = {**offload.offload([engine]), **offload.onload([engine], torch.device("cpu"))}
        assert [id(p) for p in engine.model.parameters()] == params  # the optimizer's keys still hold
    engine.train_step([{"ids": ids}], loss, lambda mb: 1.0)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 — this rank's shard
    state = [local(t).clone() for s in engine.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = [p.full_tensor().clone() for p in engine.model.parameters()]
    dist.barrier()
    return out, state, stats


def test_offload_and_onload_keep_an_fsdp2_update_exact(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        plain, plain_state, _ = _fsdp_engine(False)
        moved, moved_state, stats = _fsdp_engine(True)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(plain, moved, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_state, moved_state, strict=True))
    assert stats["trainer/offload_bytes"] > 0 and stats["trainer/offload_released_bytes"] == 0.0  # CPU: one memory
