"""Order on one GPU, played with call-order fakes (no Ray, no vLLM engine; the Ray version of the
whole step is tests/unit/test_colocated_offload.py):

- engines start after the trainer ranks report ready (colocated), at once otherwise;
- a worker wakes by vLLM's sleep tags: weights first (a sync lands), KV cache later, and refuses
  to generate until both are awake;
- the weight receiver's buffer pools are freed on sleep;
- ``enforce_eager`` defaults to False on GPU and True on CPU;
- offload leaves AdamW's ``step`` where AdamW keeps it.
"""

from __future__ import annotations

import types

import pytest
import torch


class _Log(list):
    def note(self, event: str) -> None:
        self.append(event)


class _Trainers:
    def __init__(self, log: _Log) -> None:
        self.log = log
        log.note("trainers.start")

    def ready(self) -> None:
        self.log.note("trainers.ready")


@pytest.mark.parametrize("colocated", [True, False])
def test_engines_start_after_the_trainers_are_ready_when_colocated(colocated):
    from posttrain.rl.fleet import start_in_order

    log = _Log()
    trainers, fleet = start_in_order(lambda: _Trainers(log), lambda: log.note("engines.start") or "fleet", colocated)
    assert isinstance(trainers, _Trainers) and fleet == "fleet"
    if colocated:  # vLLM profiles free memory at start: the trainers' memory must be settled by then
        assert log == ["trainers.start", "trainers.ready", "engines.start"]
    else:  # own devices: both load at once
        assert log == ["trainers.start", "engines.start", "trainers.ready"]


class _Engine:
    def __init__(self, log: _Log) -> None:
        self.log = log

    def sleep(self, level=1):
        self.log.note(f"sleep({level})")

    def wake_up(self, tags=None):
        self.log.note(f"wake({','.join(tags) if tags else 'all'})")

    def generate(self, prompts, sampling):
        self.log.note("generate")
        return []


def test_worker_wakes_by_tag_and_generates_only_fully_awake():
    from posttrain.rollout.actor import RolloutWorker

    log = _Log()
    worker = RolloutWorker.__new__(RolloutWorker)
    worker.engine, worker.sleeping = _Engine(log), set()
    worker.sleep(2)
    worker.wake_up(["weights"])  # a publish: the sync lands in the weights
    with pytest.raises(RuntimeError, match="asleep"):
        worker.generate([], None)  # no KV cache yet
    worker.wake_up(["weights"])  # awake already: nothing
    worker.wake_up()  # the rest, once the trainer left the device
    worker.generate([], None)
    worker.wake_up()
    assert log == ["sleep(2)", "wake(weights)", "wake(kv_cache)", "generate"]


def test_receive_pools_are_freed_on_sleep():
    pytest.importorskip("vllm")
    from posttrain.rollout.vllm_transfer import PosttrainWorkerExtension

    from posttrain.sync.collective import BufferPool
    from posttrain.sync.device import Device

    pool = BufferPool(Device(torch.device("cpu")), 1 << 20)
    pool.take(1000)
    worker = types.SimpleNamespace(weight_transfer_engine=types.SimpleNamespace(pools={"payload": pool}))
    assert PosttrainWorkerExtension.posttrain_release_pools(worker) == 1 << 20
    assert worker.weight_transfer_engine.pools is None


def test_enforce_eager_defaults_to_cuda_graphs_on_gpu_only():
    from posttrain.rollout.vllm_engine import VLLMEngineConfig, resolve_enforce_eager

    assert VLLMEngineConfig.__dataclass_fields__["enforce_eager"].default is None  # unset unless the recipe sets it
    unset = types.SimpleNamespace(enforce_eager=None)
    assert resolve_enforce_eager(unset, on_cpu=True) is True and resolve_enforce_eager(unset, on_cpu=False) is False
    assert resolve_enforce_eager(types.SimpleNamespace(enforce_eager=True), on_cpu=False) is True


def test_offload_leaves_adamw_step_where_adamw_keeps_it():
    from posttrain.rl import offload

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    engine = types.SimpleNamespace(model=model, optimizer=opt, device=torch.device("cpu"))
    # "meta" stands in for the GPU: whatever moves there shows it
    stats = offload.move([engine], torch.device("meta"))
    state = next(iter(opt.state.values()))  # moved in place (the module may swap its Parameters for meta)
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    assert state["step"].device.type == "cpu"  # AdamW (not capturable) reads it on the host every step
    assert stats["bytes"] > 0
