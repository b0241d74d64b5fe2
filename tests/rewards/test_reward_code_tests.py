"""Sandboxed test-harness node: real sandbox runs, and SANDBOX_ERROR masked (never 0)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from posttrain.rewards import RewardGraph, RewardNode
from posttrain.rewards.code_tests import CodeTestsReward, extract_code
from posttrain.sandboxes import Status, Verdict

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


def test_extract_code() -> None:
    assert extract_code("here:\n```python\nx = 1\n```\n<|im_end|>") == "x = 1\n"
    assert extract_code("<answer>print(1)</answer>") == "print(1)"
    assert extract_code("print(2)<|im_end|>junk") == "print(2)"


@pytest.fixture(scope="module")
def code_node() -> Iterator[CodeTestsReward]:
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in ("bwrap", "prlimit", "setpriv")):
        pytest.skip("posttrain.sandboxes needs root, bwrap, prlimit and setpriv (run sandboxes/setup.sh)")
    node = CodeTestsReward(wall_s=1.5, slots=2)
    yield node
    node.close()


def test_code_node_in_real_sandbox(code_node: CodeTestsReward, group_of) -> None:
    graph = RewardGraph([RewardNode("tests", code_node, timeout_s=30)], max_failed_fraction=0.0)
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "<answer>def add(a, b):\n    return a * b</answer>",  # passes add(2, 2) only
        "def add(a, b):\n    while True:\n        pass",
        "import os\nos._exit(0)",
    ]
    [scored], metrics = graph.score_groups_sync([group_of("write add", completions, tests=ADD_TESTS)])
    assert scored.rewards == [1.0, 0.5, 0.0, 0.0]
    assert metrics["reward/tests/pass"] == 1.0 and metrics["reward/tests/timeout"] == 1.0
    [scored], _ = graph.score_groups_sync([group_of("no tests here", ["print(1)"])])
    assert scored.rewards == [None] and scored.breakdown["tests"] == [None]  # not applicable


class _BrokenSandbox:
    """Stands in for a sandbox whose harness fails on every other run (unit test of the node's policy)."""

    def __init__(self) -> None:
        self.calls = 0

    async def arun(
        self, code: str, tests: list[str] | None = None, io_cases: object = None, **timing: object
    ) -> Verdict:
        self.calls += 1
        if self.calls % 2:
            return Verdict(Status.SANDBOX_ERROR, 0, 0, detail="slot failed to spawn")
        return Verdict(Status.FAIL, 0, 2, detail="wrong")


def test_sandbox_error_is_masked_not_zero(group_of) -> None:
    node = CodeTestsReward(sandbox=_BrokenSandbox())
    graph = RewardGraph([RewardNode("tests", node, max_concurrency=1)], max_failed_fraction=0.5)
    [scored], metrics = graph.score_groups_sync([group_of("q", ["a", "b"], tests=ADD_TESTS)])
    assert scored.rewards == [None, 0.0]
    assert metrics["reward/tests/sandbox_error"] == 1.0 and metrics["reward/tests/errors"] == 1.0
    assert metrics["reward/tests/masked"] == 1.0


def test_two_default_nodes_on_one_host_do_not_collide_and_forged_records_score_zero(
    code_node, group_of
) -> None:
    # Two reward actors with default settings used to share uid 61200 and kill each other's jobs;
    # the forged-record hack used to score 0.5 through this node.
    forge = (
        "import os\n"
        "for fd in range(3, 64):\n"
        '    try: os.write(fd, b\'{"i": 0, "ok": true, "cmps": []}\\n{"i": 1, "ok": true}\\n{"done": true}\\n\')\n'
        "    except OSError: pass\n"
        "def add(a, b):\n    return 0\n"
    )
    check = "def check(candidate):\n    assert candidate(1, 2) == 3\ncheck(add)"
    other = CodeTestsReward(wall_s=5, slots=1)
    try:
        graphs = [RewardGraph([RewardNode("tests", n, timeout_s=60)]) for n in (code_node, other)]
        honest = "def add(a, b):\n    return a + b\n"
        for graph in graphs:
            [scored], _ = graph.score_groups_sync(
                [
                    group_of(
                        "write add",
                        [forge, honest, "import os, signal\nos.kill(1, signal.SIGINT)\n" + forge],
                        tests=[check, "assert add(2, 2) == 4"],
                    )
                ]
            )
            assert scored.rewards == [0.0, 1.0, 0.0]
        assert code_node._sandbox.uid_base != other._sandbox.uid_base
    finally:
        other.close()


def test_a_batch_of_sleepers_cannot_mask_the_honest_samples_queued_behind_it(group_of) -> None:
    # 23 programs that hang, then 3 honest ones, on 2 slots of 0.5 s: the queue holds the honest
    # ones ~6 s, far past the node's timeout. Before: the node's clock ran from the call, so the
    # honest samples timed out in the queue and were masked (None). Now the clock starts at the slot.
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in ("bwrap", "prlimit", "setpriv")):
        pytest.skip("posttrain.sandboxes needs root, bwrap, prlimit and setpriv (run sandboxes/setup.sh)")
    node = CodeTestsReward(wall_s=0.5, slots=2)
    try:
        graph = RewardGraph([RewardNode("tests", node, timeout_s=2.5)], max_failed_fraction=0.0)
        sleepers = [f"import time\ntime.sleep(60)  # {i}\n" for i in range(23)]
        honest = [f"def add(a, b):\n    return a + b  # {i}\n" for i in range(3)]
        [scored], metrics = graph.score_groups_sync(
            [group_of("write add", sleepers + honest, tests=ADD_TESTS)]
        )
        assert scored.rewards == [0.0] * 23 + [1.0] * 3
        assert metrics["reward/tests/timeout"] == 23.0 and metrics["reward/tests/pass"] == 3.0
        assert metrics["reward/tests/masked"] == 0.0
    finally:
        node.close()


def test_no_tests_scores_zero_and_is_counted(code_node: CodeTestsReward, group_of) -> None:
    graph = RewardGraph([RewardNode("tests", code_node, timeout_s=30)])
    honest = "def add(a, b):\n    return a + b\n"
    groups = [
        group_of("empty", [honest, "not python"], tests=[]),
        group_of("empty io", [honest], io_cases=[]),
        group_of("no assert ran", [honest], tests=["def check(c):\n    assert c(1, 2) == 3"]),
    ]
    scored, metrics = graph.score_groups_sync(groups)
    assert [g.rewards for g in scored] == [[0.0, 0.0], [0.0], [0.0]]
    assert metrics["reward/tests/no_tests"] == 4.0 and metrics["reward/tests/pass"] == 0.0
