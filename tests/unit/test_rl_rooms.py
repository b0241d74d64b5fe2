"""The RL driver's rooms, each driven with small fakes (no vLLM, no trainer ranks):

* the staleness bound and the pipelined loop's admission (drop regenerates, pace refuses);
* the step: what reaches the trainers (mini-batches with global counts, advantages), the
  masked-sample guard, the time split and the ledger;
* the weight publisher: versions, loads only into usable workers, the probe catching a worker
  that did not load;
* the fleet on a real local Ray with fake worker actors: sharding, replacement of a dead worker,
  set-aside and readmission, wake/sleep order in colocated placement;
* the import direction of ``posttrain/rl`` (nothing imports the driver, no file over 400 lines).
"""

from __future__ import annotations

import ast
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from posttrain.rollout.buffer import RolloutBuffer, StalenessBound

from posttrain.algorithms.advantages import GRPOAdvantage
from posttrain.algorithms.policy_loss import GRPOLossConfig
from posttrain.config.errors import PosttrainError
from posttrain.rl.config import OnlineRLConfig, SyncConfig
from posttrain.rl.loops.pipelined import admit
from posttrain.rl.step import PhaseTimer, Step
from posttrain.types import Completion, ForwardOutputs, Group, PromptRecord, ScoredGroup
from posttrain.weight_sync import WeightSyncProbeError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _group(ordinal: int, versions: list[int], n: int = 1, tokens: int | None = None) -> Group:
    p = PromptRecord(ordinal, "q", [1, 2])
    size = tokens or len(versions)
    return Group(p, [Completion(p, i, [5 + i] * size, "a", [-0.1] * size, versions, "stop") for i in range(n)])


# -- the bound and the admission step -----------------------------------------------------------
def test_bound_gate_and_histogram():
    k1 = StalenessBound(1)
    assert k1.admits(step=3, v_min=1) and not k1.admits(step=3, v_min=0)  # version 2 -> 3 may use v_min >= 1
    assert [k1.first_version(s) for s in (1, 2, 3, 4)] == [0, 0, 1, 2]  # step s may start at version s-1-k
    assert StalenessBound(0).first_version(4) == 3  # k = 0: only the current version (synchronous)
    assert k1.group_v_min(_group(0, [2, 2, 3])) == 2
    assert k1.histogram(4, [_group(0, [2, 3]), _group(1, [3])]) == {1: 1, 0: 1}


def test_drop_policy_drops_counts_and_regenerates_while_pace_refuses():
    buffer = RolloutBuffer()
    loop = SimpleNamespace(
        regenerate=lambda step, prompts: buffer.add(step, [_group(p.ordinal, [step - 1]) for p in prompts])
    )
    bound = StalenessBound(0)
    buffer.add(3, [_group(7, [2]), _group(6, [1, 2])])  # at step 3 (version 2), ordinal 6 is 1 version too stale
    groups, m = admit(loop, buffer, 3, bound, "drop", expected=2, group_size=1)
    assert [g.prompt.ordinal for g in groups] == [6, 7] and groups[0].completions[0].versions == [2]  # regenerated
    assert m["staleness/dropped_groups"] == 1 and m["staleness/count_0"] == 2
    buffer.add(3, [_group(7, [2]), _group(6, [1, 2])])
    with pytest.raises(RuntimeError, match="exceeds max_staleness"):
        admit(loop, buffer, 3, bound, "pace", expected=2, group_size=1)


# -- the step -----------------------------------------------------------------------------------
class FakeScorer:
    def __init__(self, rewards: list[list[float | None]]) -> None:
        self.rewards = rewards

    def score_groups_sync(self, groups):
        return [ScoredGroup(g, r) for g, r in zip(groups, self.rewards, strict=True)], {"reward/correct/errors": 0.0}


class FakeTrainers:
    def __init__(self) -> None:
        self.batches, self.forwards = [], []

    def forward(self, batch):
        self.forwards.append(batch)
        return ForwardOutputs(old_logprobs_BT=torch.full(batch.input_ids_BT.shape, -0.5))

    def train(self, batch):
        self.batches.append(batch)
        time.sleep(0.01)
        return {"loss": float(len(self.batches)), "grad_norm": 1.0}


class FakePublisher:
    def __init__(self) -> None:
        self.version, self.probes = 0, []

    def publish(self, probe_ids):
        self.probes.append(probe_ids)
        self.version += 1
        return {"sync/probe_gap": 0.0}


class FakeLedger:
    def __init__(self) -> None:
        self.rows = []

    def write(self, step, groups):
        self.rows.append((step, [g.prompt.ordinal for g in groups]))

    def scored(self, step, scored):
        self.rows.append((step, [sg.rewards for sg in scored]))


def _step(rewards, **algo_kw):
    algo = OnlineRLConfig(advantage=GRPOAdvantage(), loss=GRPOLossConfig(), **algo_kw)
    trainers, publisher, ledger = FakeTrainers(), FakePublisher(), FakeLedger()
    return Step(algo, FakeScorer(rewards), trainers, publisher, ledger, pad_id=0), trainers, publisher, ledger


def test_step_trains_every_minibatch_with_global_counts_and_publishes():
    groups = [_group(0, [0, 0, 0], n=2), _group(1, [0, 0], n=2, tokens=2)]
    step, trainers, publisher, ledger = _step([[1.0, 0.0], [0.0, 0.0]], mini_batches=2)
    m = step(groups, generate_s=0.25)
    assert ledger.rows == [(1, [0, 1]), (1, [[1.0, 0.0], [0.0, 0.0]])]  # written before training, as version 0 -> 1
    # mini_batches=2 needs old logprobs before the update: one forward, asking for them
    assert len(trainers.forwards) == 1 and trainers.forwards[0].want_old
    first, second = trainers.batches
    assert (first.size, second.size) == (2, 2)
    assert first.num_tokens == 6.0 and second.num_tokens == 4.0  # 3+3 and 2+2 response tokens
    assert first.old_logprobs_BT is not None and torch.all(first.old_logprobs_BT == -0.5)
    # GRPO: group 0 rewards (1, 0) -> advantages of opposite sign; group 1 all equal -> 0
    adv = torch.cat([first.advantages_BT, second.advantages_BT])
    mask = torch.cat([first.loss_mask_BT, second.loss_mask_BT]) > 0
    assert adv[0][mask[0]].min() > 0 and adv[1][mask[1]].max() < 0 and torch.all(adv[2:][mask[2:]] == 0)
    assert publisher.probes == [[[1, 2, 5, 5, 5]]] and m["policy_version"] == 1.0
    assert m["loss"] == 1.5  # the mean over the two mini-batches
    assert m["reward/mean"] == 0.25 and m["time/generate_s"] == 0.25
    phases = sum(m[f"time/{p}_s"] for p in ("generate", "reward", "prepare", "train", "sync"))
    assert m["time/step_s"] == pytest.approx(phases) and m["time/train_s"] >= 0.02
    assert m["throughput/samples_per_s"] == pytest.approx(4 / m["time/step_s"])


def test_step_skips_the_forward_with_one_minibatch_and_no_reference():
    step, trainers, _, _ = _step([[1.0, 0.0]])
    step([_group(0, [0, 0], n=2)], generate_s=0.0)
    assert trainers.forwards == [] and trainers.batches[0].old_logprobs_BT is None


def test_step_stops_on_a_mostly_masked_batch_with_a_user_error():
    step, trainers, publisher, _ = _step([[None, None], [1.0, None]])
    with pytest.raises(PosttrainError, match=r"75% of this step's samples are masked.*max_masked_fraction=0.5(?s:.*)fix:"):
        step([_group(0, [0], n=2), _group(1, [0], n=2)], generate_s=0.0)
    assert trainers.batches == [] and publisher.version == 0  # nothing trained, nothing published


def test_phase_timer_sums_its_phases():
    timer = PhaseTimer(0.5)
    with timer("train"):
        time.sleep(0.01)
    m = timer.metrics()
    assert m["time/step_s"] == pytest.approx(0.5 + m["time/train_s"]) and m["time/train_s"] >= 0.01


# -- the publisher --------------------------------------------------------------------------------
class FakeFleet:
    """Workers as plain objects; ``call`` runs the verb on each (like WorkerFleet.call, no timeouts)."""

    def __init__(self, workers, aside=()) -> None:
        self.workers, self.aside, self.woken = workers, set(aside), []

    def usable(self):
        return [i for i in range(len(self.workers)) if i not in self.aside]

    def call(self, indices, verb, *args, what):
        return {i: getattr(self.workers[i], verb)(*args) for i in indices}

    def wake(self, indices, generate=False, tags=None):
        self.woken.append((list(indices), tags))

    def rejoin_all(self):
        self.aside.clear()


class FakeEngine:
    def __init__(self) -> None:
        self.served, self.weights = 0, 0.0

    def update_weights(self, refs, version, restore=False):
        assert restore or version > self.served
        self.served, self.weights = version, refs[0]

    def score_tokens(self, ids):
        return [[-self.weights] * (len(ids[0]) - 1)]

    def version(self):
        return self.served


class FakeTrainerGroup:
    def __init__(self) -> None:
        self.weights = 0.0

    def push_weights(self, version):
        self.weights += 0.1
        return [self.weights], {"sync/bytes": 8.0}

    def probe(self, ids):
        return [[-self.weights] * (len(ids[0]) - 1)]


def test_publisher_loads_usable_workers_probes_and_advances():
    from posttrain.rl.publisher import WeightPublisher

    engines = [FakeEngine(), FakeEngine()]
    fleet = FakeFleet(engines, aside={1})
    pub = WeightPublisher(FakeTrainerGroup(), fleet, SyncConfig(), torch.float32)
    stats = pub.publish([[1, 2, 3]])
    assert pub.version == 1 and engines[0].served == 1 and engines[1].served == 0  # the set-aside one waits
    assert stats["sync/probe_gap"] == 0.0 and stats["sync/worker_version"] == 1.0 and fleet.woken == [([0], ("weights",)), ([0], None)]
    pub.restore(1)  # every worker, set aside or not, back to version 1 (restore=True)
    assert [e.served for e in engines] == [1, 1] and fleet.aside == set()


def test_publisher_probe_catches_a_skipped_load():
    from posttrain.rl.publisher import WeightPublisher

    pub = WeightPublisher(FakeTrainerGroup(), FakeFleet([FakeEngine()]), SyncConfig(skip_weight_sync=True), torch.float32)
    with pytest.raises(WeightSyncProbeError, match="version 1"):
        pub.publish([[1, 2, 3]])


# -- the fleet on a real local Ray, fake workers ---------------------------------------------------
class FakeWorker:
    """A rollout actor without an engine: echoes prompts; slow or dying on request."""

    def __init__(self, engine_cfg) -> None:
        self.cfg, self.log, self.served, self.weights = engine_cfg, [], 0, 0.0

    def health(self):
        return {"pid": os.getpid()}

    def generate(self, prompts, sampling):
        self.log.append("generate")
        if any(p.text == "die" for p in prompts) and not os.path.exists(self.cfg["flag"]):
            open(self.cfg["flag"], "w").close()
            os._exit(1)
        if any(p.text == "slow" for p in prompts):
            time.sleep(3)
        return [Group(p, [Completion(p, 0, [7], p.text, [-0.1], [self.served], "stop")]) for p in prompts]

    def update_weights(self, refs, version, restore=False):
        self.log.append("update")
        self.served, self.weights = version, refs[0]

    def score_tokens(self, ids):
        return [[-self.weights] * (len(ids[0]) - 1)]

    def version(self):
        return self.served

    def wake_up(self, tags=None):
        self.log.append("wake" if tags is None else f"wake({','.join(tags)})")

    def sleep(self, level=1):
        self.log.append("sleep")

    def calls(self):
        return self.log

    def where(self):
        return {"pid": os.getpid(), "host": "-", "busy": []}

    def close(self):
        pass


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture
def make_fleet(ray_local, tmp_path):
    """Fleets of fake workers; their actors and placement groups go when the test ends."""
    import ray

    made = []

    def make(**kw):
        fleet = _fleet(tmp_path, **kw)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()
        ray.util.remove_placement_group(fleet.pg)


def _fleet(tmp_path, *, aside_s=None, colocated=False, workers=2):
    from posttrain.diagnose import remote_class
    from posttrain.rl.config import Deadlines
    from posttrain.rl.fleet import WorkerFleet
    from posttrain.rl.placement import Plan, placement_group

    plan = Plan([{"CPU": 0.5}] * workers, [], list(range(workers)), {}, {"CPU": 0.5})
    pg = placement_group(plan)
    deadlines = Deadlines(call_s=30.0, request_s=aside_s or 30.0, aside_s=aside_s)
    cfg = {"flag": str(tmp_path / "died")}
    return WorkerFleet(remote_class(FakeWorker), cfg, pg, plan, deadlines, colocated=colocated, max_restarts=1, run_seed=0)


def _prompts(*texts):
    return [PromptRecord(i, t, [i]) for i, t in enumerate(texts)]


def test_fleet_shards_and_replaces_a_dead_worker(make_fleet, tmp_path):
    from posttrain.rollout.sampling import SamplingConfig

    from posttrain.rl.fleet import RolloutWorkerLost
    from posttrain.rl.publisher import WeightPublisher

    fleet = make_fleet()
    pub = WeightPublisher(FakeTrainerGroup(), fleet, SyncConfig(), torch.float32)
    pub._latest = (["w"], 3)  # the newest weights a replacement must load
    groups = fleet.generate(_prompts("a", "die", "c"), SamplingConfig(), on_lost=pub.replace)
    assert [g.prompt.text for g in groups] == ["a", "die", "c"]  # prompt order, nothing lost
    assert fleet.replaced == 1 and groups[1].completions[0].versions == [3]  # served by the replacement at v3
    os.remove(tmp_path / "died")
    with pytest.raises(RolloutWorkerLost, match="max_worker_restarts=1"):
        fleet.generate(_prompts("a", "die"), SamplingConfig(), on_lost=pub.replace)


def test_fleet_sets_aside_a_slow_worker_and_the_publisher_readmits_it(make_fleet):
    import ray

    from posttrain.rl.publisher import WeightPublisher

    fleet = make_fleet(aside_s=1.0)
    pub = WeightPublisher(FakeTrainerGroup(), fleet, SyncConfig(), torch.float32)
    slow = fleet.workers[1].generate.remote(_prompts("slow"), None)
    fleet.set_aside(1, slow, "test")
    assert fleet.usable() == [0] and fleet.settled() == []
    pub.publish([[1, 2, 3]])  # version 1 reaches worker 0 only
    assert ray.get(fleet.workers[1].version.remote()) == 0
    ray.get(slow)
    pub.readmit()
    assert fleet.usable() == [0, 1] and ray.get(fleet.workers[1].version.remote()) == 1  # caught up


def test_colocated_fleet_wakes_before_work_and_sleeps_after_generate(make_fleet):
    import ray
    from posttrain.rollout.sampling import SamplingConfig

    from posttrain.rl.publisher import WeightPublisher

    fleet = make_fleet(colocated=True, workers=1)
    pub = WeightPublisher(FakeTrainerGroup(), fleet, SyncConfig(), torch.float32)
    fleet.generate(_prompts("a"), SamplingConfig(), on_lost=pub.replace)
    pub.publish([[1, 2, 3]])
    # a publish wakes the weights for the load, the rest (KV cache) once the trainers left for the probe
    assert ray.get(fleet.workers[0].calls.remote()) == ["wake", "generate", "sleep", "wake(weights)", "update", "wake"]


# -- structure ------------------------------------------------------------------------------------
def test_rl_imports_flow_one_way_and_files_stay_small():
    root = os.path.join(REPO, "posttrain", "rl")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            src = open(path).read()
            assert src.count("\n") <= 400, f"{path} has over 400 lines"
            if name == "controller.py" and dirpath == root:
                continue
            for node in ast.walk(ast.parse(src)):
                mods = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(m.startswith("posttrain.rl.controller") for m in mods), f"{path} imports the driver"
