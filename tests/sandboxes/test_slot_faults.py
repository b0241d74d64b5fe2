"""A slot whose process is killed from outside mid-run (host OOM killer, an operator) is restarted and
its job run again, once; the program killing itself is still the program's failure.

The sandbox here has its own uids and cgroup, so killing its processes cannot touch another
sandbox running on the host (the shared fixture's, or another test session's).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from posttrain.sandboxes import Limits, Sandbox, SandboxConfig, Status

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
SLOW_ADD = "import time\ntime.sleep(1.0)\ndef add(a, b):\n    return a + b\n"  # time for the killer to act


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in ("bwrap", "prlimit", "setpriv")):
        pytest.skip("posttrain.sandboxes needs root, bwrap, prlimit and setpriv (run sandboxes/setup.sh)")
    cfg = SandboxConfig(slots=1, cgroup_name="posttrain-slot-faults-test", limits=Limits(wall_s=10))
    with Sandbox(cfg) as sb:
        yield sb


def _slot_pythons(uid: int) -> dict[int, int]:
    """pid -> parent pid of the python processes running as ``uid`` (the runner and the program)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat") as f:
                comm_end, rest = f.read().rsplit(")", 1)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if comm_end.split("(", 1)[1].startswith("python"):
            found[int(entry)] = int(rest.split()[1])
    return found


class SlotKiller(threading.Thread):
    """SIGKILLs the runner of the slot ``uid`` from the host whenever it runs a job, ``times`` times.

    A job runs when a python process (the program) has a python parent (the runner).
    """

    def __init__(self, uid: int, times: int) -> None:
        super().__init__(daemon=True)
        self.uid, self.times, self.kills = uid, times, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.kills < self.times and not self.stop.is_set():
            procs = _slot_pythons(self.uid)
            runner = next((parent for parent in procs.values() if parent in procs), None)
            if runner is None:
                time.sleep(0.01)
                continue
            os.kill(runner, signal.SIGKILL)
            self.kills += 1
            while os.path.exists(f"/proc/{runner}") and not self.stop.is_set():
                time.sleep(0.01)  # wait for it to go before looking for the next job

    def __enter__(self) -> SlotKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def test_slot_killed_mid_run_is_replaced_and_the_job_rerun(sandbox: Sandbox) -> None:
    replaced, errors = sandbox.slots_replaced, sandbox.counts[Status.SANDBOX_ERROR]
    with SlotKiller(sandbox.uid_base, times=1) as killer:
        v = sandbox.run(SLOW_ADD, tests=ADD_TESTS)
    assert killer.kills == 1
    assert v.status is Status.PASS and v.passed == 2  # the real verdict, from the re-run
    assert sandbox.slots_replaced == replaced + 1 and sandbox.counts[Status.SANDBOX_ERROR] == errors


def test_a_runner_dying_again_is_fail_after_one_rerun_never_sandbox_error(sandbox: Sandbox) -> None:
    # The parent cannot tell a host kill from a program that found a way to end its runner, so a
    # second death is scored as the program's failure: no sample can mask itself.
    replaced = sandbox.slots_replaced
    with SlotKiller(sandbox.uid_base, times=2) as killer:
        v = sandbox.run(SLOW_ADD, tests=ADD_TESTS)
    assert killer.kills == 2
    assert v.status is Status.FAIL and "died by signal 9 twice" in v.detail
    assert v.fraction == 0.0 and v.passed == 0
    assert sandbox.slots_replaced == replaced + 1  # one re-run, not more
    assert sandbox.run(SLOW_ADD, tests=ADD_TESTS).status is Status.PASS  # the slot serves again


@pytest.mark.parametrize(
    "code",
    [
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(os.getpid(), signal.SIGKILL)\n",
        "import os, signal\nos.kill(1, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGTERM)\nos._exit(3)\n",
    ],
    ids=["itself", "every_process", "its_runner"],
)
def test_a_program_killing_itself_is_its_failure_not_rerun(sandbox: Sandbox, code: str) -> None:
    replaced = sandbox.slots_replaced
    v = sandbox.run(code + "def add(a, b):\n    return a + b\n", tests=ADD_TESTS)
    assert v.status is Status.FAIL and v.passed == 0
    assert sandbox.slots_replaced == replaced


def test_code_reward_gets_the_real_score_when_its_slot_is_killed(sandbox: Sandbox) -> None:
    from posttrain.rewards import RewardGraph, RewardNode
    from posttrain.rewards.code_tests import CodeTestsReward

    from posttrain.types import RewardSample

    graph = RewardGraph([RewardNode("tests", CodeTestsReward(sandbox=sandbox), timeout_s=60)])
    sample = RewardSample(prompt="write add", completion=SLOW_ADD, fields={"tests": ADD_TESTS})
    replaced = sandbox.slots_replaced
    with SlotKiller(sandbox.uid_base, times=1) as killer:
        report = asyncio.run(graph.score_samples([sample]))  # no graph.close(): it would close the sandbox
    assert killer.kills == 1 and sandbox.slots_replaced == replaced + 1
    assert report.rewards == [1.0] and report.cells["tests"][0].status == "ok"  # scored, not masked
