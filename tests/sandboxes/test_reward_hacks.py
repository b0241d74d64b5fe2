"""Reward hacks against the judge (issue 13): each attack scores exactly 0 — not masked, not passed —
while an honest program in a concurrent slot of the same Sandbox passes.

The score is CodeTestsReward's rule: PASS 1, SANDBOX_ERROR masked (a failure of these tests),
otherwise passed / total.
"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
from posttrain.sandboxes import Limits, Sandbox, SandboxConfig, SandboxUnavailableError, Status, Verdict

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
CHECK = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert 4 == candidate(2, 2)\ncheck(add)"
MULTI = "xs = [add(i, i) for i in range(5)]\nassert xs == [0, 2, 4, 6, 8]\nassert sorted(xs)[-1] == add(4, 4)"
NON_LITERAL = (
    "import math\nassert all(add(i, 1) == i + 1 for i in range(3))\nassert math.isclose(add(0.5, 0.25), 0.75)"
)
STATEMENT_TESTS = [CHECK, MULTI, NON_LITERAL]
HONEST = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 0\n"


def score(v: Verdict) -> float:
    assert v.status is not Status.SANDBOX_ERROR, f"masked instead of scored: {v}"
    return 1.0 if v.status is Status.PASS else v.passed / v.total if v.total else 0.0


def attack_scores_zero(sandbox: Sandbox, code: str, tests: list | None = None, **kw) -> Verdict:
    """Run the attack and an honest program concurrently; the attack scores 0, the honest one 1."""
    tests = STATEMENT_TESTS + ADD_TESTS if tests is None else tests
    with ThreadPoolExecutor(2) as pool:
        attack = pool.submit(sandbox.run, code, tests, **kw)
        time.sleep(0.05)  # the attack starts first
        honest = pool.submit(sandbox.run, HONEST, tests)
        a, h = attack.result(), honest.result()
    assert score(a) == 0.0, a
    assert h.status is Status.PASS, h
    return a


# -- the six statement-test hacks of the issue -------------------------------------------------


def test_always_equal_objects_in_lists(sandbox: Sandbox) -> None:
    code = (
        "class Anything:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
        "    def __hash__(self): return 0\n    def __lt__(self, o): return True\n    def __bool__(self): return True\n"
        "def add(a, b):\n    return Anything()\n"
    )
    attack_scores_zero(sandbox, code)
    attack_scores_zero(sandbox, code.replace("return Anything()", "return [Anything()]"))


def test_patched_builtins(sandbox: Sandbox) -> None:
    code = (
        "import builtins, math, operator\n"
        "builtins.all = lambda *a: True\nbuiltins.sorted = lambda *a, **k: [8]\n"
        "math.isclose = lambda *a, **k: True\noperator.eq = lambda a, b: True\n"
        "builtins.AssertionError = type('Nope', (BaseException,), {})\n" + WRONG
    )
    attack_scores_zero(sandbox, code)


def test_forged_records_on_every_fd(sandbox: Sandbox) -> None:
    forged = "\\n".join(
        [
            '{"i": ' + str(i) + ', "ok": true, "cmps": [], "partial": false, "value": ["int", "3"]}'
            for i in range(8)
        ]
        + ['{"done": true}', '{"id": 1, "value": ["int", "3"]}', '{"end": true, "nonce": ""}']
    )
    code = (
        "import os\n"
        f"FORGED = '{forged}\\n'.encode()\n"
        "def forge():\n"
        "    for fd in sorted(int(x) for x in os.listdir('/proc/self/fd')):\n"
        "        if fd > 2:\n"
        "            try: os.write(fd, FORGED)\n"
        "            except OSError: pass\n"
        "forge()\n"
        "def add(a, b):\n    forge()\n    return 0\n"
    )
    attack_scores_zero(sandbox, code)


def test_rewriting_pending_tests_through_frames(sandbox: Sandbox) -> None:
    code = (
        "import sys, gc\n"
        "def wipe():\n"
        "    f = sys._getframe(0)\n"
        "    while f is not None:\n"
        "        for k, v in list(f.f_locals.items()):\n"
        "            if k in ('tests', 'test', 'job') and isinstance(v, (list, dict)):\n"
        "                v.clear() if isinstance(v, list) else v.update(src='pass', expr='3', kind='stmt')\n"
        "        f = f.f_back\n"
        "    for o in gc.get_objects():\n"
        "        if isinstance(o, dict) and o.get('kind') in ('value', 'stmt'):\n"
        "            o.update(kind='stmt', src='pass')\n"
        "wipe()\n"
        "def add(a, b):\n    wipe()\n    return 0\n"
    )
    attack_scores_zero(sandbox, code)


def test_replacing_the_runners_encoder(sandbox: Sandbox) -> None:
    code = (
        "import gc, json\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, dict) and 'values_equal' in o and 'encode' in o:\n"
        "        o['encode'] = lambda v, ref=None, depth=0: ['bool', True]\n"
        "        o['values_equal'] = lambda *a, **k: True\n"
        "        o['_format_exc'] = lambda e: 'ok'\n"
        'json.dumps = lambda *a, **k: \'{"i": 0, "ok": true, "cmps": []}\'\n' + WRONG
    )
    attack_scores_zero(sandbox, code)


def test_reading_expected_values_through_gc(sandbox: Sandbox) -> None:
    code = (
        "import gc, sys\n"
        "found = [o for o in gc.get_objects() if isinstance(o, str) and ('assert' in o or 'check(' in o)]\n"
        "found += [repr(o)[:80] for o in gc.get_objects() if isinstance(o, dict) and 'tests' in o]\n"
        "print('FOUND', len(found), found[:3])\n" + WRONG
    )
    v = attack_scores_zero(sandbox, code)
    assert "FOUND 0 []" in v.stdout  # the candidate's process never holds the tests


# -- no self-masking ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGQUIT", "SIGABRT"])
def test_signalling_the_runner_cannot_mask_the_sample(sandbox: Sandbox, sig: str) -> None:
    replaced = sandbox.slots_replaced
    send = f"import os, signal\nfor pid in (1, os.getppid()):\n    os.kill(pid, signal.{sig})\n"
    v = attack_scores_zero(sandbox, send + "import time\ntime.sleep(0.2)\n" + WRONG)
    assert v.status is Status.FAIL and sandbox.slots_replaced == replaced  # judged, not re-run
    # the runner survived the signal: a correct program sending it is judged PASS
    assert sandbox.run(send + HONEST, tests=ADD_TESTS).status is Status.PASS


# -- new boundaries: the candidate channel and the tests process (our own attacks) ---------------


def test_flooding_and_forging_the_candidate_channel(sandbox: Sandbox) -> None:
    code = (
        "import os, threading\n"
        "def flood():\n"
        '    junk = b\'{"id": 1, "value": ["int", "3"]}\\n\' * 1000 + b\'[\' * 100000 + b\'\\n\'\n'
        "    for fd in range(3, 32):\n"
        "        try: os.write(fd, junk)\n"
        "        except OSError: pass\n"
        "threading.Thread(target=flood, daemon=True).start()\n" + WRONG
    )
    attack_scores_zero(sandbox, code)


def test_killing_stopping_or_reading_the_tests_process(sandbox: Sandbox) -> None:
    peek = (
        "import os\nhits = 0\n"
        "for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:\n"
        "    for what in ('mem', 'fd', 'environ'):\n"
        "        try:\n"
        "            (os.listdir if what == 'fd' else lambda p: open(p, 'rb').read(1))(f'/proc/{pid}/{what}')\n"
        "            hits += 1\n"
        "        except OSError: pass\n"
        "print('HITS', hits)\n"
    )
    v = attack_scores_zero(sandbox, peek + WRONG)
    assert "HITS 0" in v.stdout  # T and R are non-dumpable: no memory, fds or environment to read
    for act in ("os.kill(-1, 9)", "os.kill(-1, 19)"):  # SIGKILL / SIGSTOP every process it can see
        code = f"import os\ndef add(a, b):\n    {act}\n    return a + b\n"
        attack_scores_zero(sandbox, code, limits=Limits(wall_s=3, memory_mb=256))


def test_objects_without_plain_value_have_no_truth_value(sandbox: Sandbox) -> None:
    code = "class Yes:\n    def __bool__(self): return True\ndef is_even(n):\n    return Yes()\n"
    tests = [
        "assert is_even(2)",
        "assert not is_even(3) is False",
        "assert is_even(4) is not None and is_even(6)",
    ]
    v = sandbox.run(code, tests=tests[:1] + tests[2:])
    assert score(v) == 0.0
    honest = sandbox.run("def is_even(n):\n    return n % 2 == 0\n", tests=tests[:1] + tests[2:])
    assert honest.status is Status.PASS


def test_numeric_tolerance_cannot_be_gamed_by_inf_nan_or_huge_ints(sandbox: Sandbox) -> None:
    for ret in ("float('inf')", "float('nan')", "10 ** 4000", "True", "'3'", "[3]"):
        attack_scores_zero(sandbox, f"def add(a, b):\n    return {ret}\n", ADD_TESTS + [CHECK])
    tol = [{"test": "assert add(0.1, 0.2) == 0.3001", "rel_tol": 1e-3}, "assert add(1, 2) == 3.0"]
    assert sandbox.run(HONEST, tests=tol).status is Status.PASS
    assert sandbox.run(HONEST, tests=[{"test": "assert add(0.1, 0.2) == 0.3001"}]).status is Status.FAIL


def test_statement_tests_still_work_for_classes_generators_and_exceptions(sandbox: Sandbox) -> None:
    code = (
        "class Solution:\n    def twice(self, xs):\n        return [2 * x for x in xs]\n"
        "def gen(n):\n    yield from range(n)\n"
        "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n"
    )
    tests = [
        "assert Solution().twice([1, 2]) == [2, 4]",
        "assert list(gen(3)) == [0, 1, 2]",
        "try:\n    root(-1)\n    assert False\nexcept ValueError:\n    pass",
        "assert root(9) == 3",
    ]
    v = sandbox.run(code, tests=tests)
    assert v.status is Status.PASS, v


# -- isolation between slots and between Sandboxes ---------------------------------------------


def test_uid_collision_between_sandboxes_is_refused_and_leases_are_disjoint(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxUnavailableError, match=r"leased by the Sandbox of pid \d+.*uid_base unset"):
        Sandbox(SandboxConfig(slots=1, uid_base=sandbox.uid_base))
    with Sandbox(SandboxConfig(slots=1, cgroup_name=sandbox.config.cgroup_name)) as other:
        mine = set(range(sandbox.uid_base, sandbox.uid_base + sandbox.config.slots))
        assert other.uid_base not in mine
        # a hack killing everything it can in the other Sandbox leaves this one's honest job alone
        with ThreadPoolExecutor(2) as pool:
            honest = pool.submit(sandbox.run, "import time\ntime.sleep(0.5)\n" + HONEST, ADD_TESTS)
            for _ in range(5):
                v = other.run("import os\nos.kill(-1, 9)\n" + WRONG, tests=ADD_TESTS)
                assert score(v) == 0.0
            assert honest.result().status is Status.PASS


def test_cpu_starvation_by_busy_loops_is_capped_per_slot() -> None:
    limits = Limits(wall_s=30, cpu_s=30, memory_mb=256, nproc=40)
    with Sandbox(SandboxConfig(slots=2, limits=limits)) as sb:
        throttled = sum(s.cgroup.cpu_throttled() for s in sb._slots if s.cgroup)
        bomb = (
            "import os, time\n"
            "for _ in range(31):\n"
            "    if os.fork() == 0:\n        os.setsid()\n        while True: pass\n"
            "time.sleep(3)\n" + WRONG
        )
        honest = "x = 0\nfor i in range(3 * 10**6):\n    x += i\n" + HONEST
        with ThreadPoolExecutor(2) as pool:
            # a small quota for the attack, so throttling shows even on a busy shared host
            attack = pool.submit(
                sb.run, bomb, ADD_TESTS, limits=Limits(**{**vars(limits), "wall_s": 6, "cpu_cores": 0.05})
            )
            time.sleep(0.5)
            ok = pool.submit(sb.run, honest, ADD_TESTS)
            a, h = attack.result(), ok.result()
        assert score(a) == 0.0 and h.status is Status.PASS, (a, h)
        assert sum(s.cgroup.cpu_throttled() for s in sb._slots if s.cgroup) > throttled  # the quota bit


def test_dev_and_dev_shm_hold_no_more_than_the_workdir_cap(sandbox: Sandbox) -> None:
    code = (
        "import os\nkept = 0\n"
        "for d in ('/dev', '/dev/shm', '/tmp', '/dev/pts', '/dev/mqueue'):\n"
        "    for i in range(30):\n"
        "        try:\n"
        "            with open(f'{d}/fill{i}', 'wb') as f:\n"
        "                f.write(b'x' * (3 << 20))\n"
        "            kept += 3\n"
        "        except OSError:\n"
        "            break\n"
        "print('KEPT', kept)\n" + WRONG
    )
    v = attack_scores_zero(sandbox, code)
    kept = int(v.stdout.split("KEPT")[1].split()[0])
    assert kept <= sandbox.config.limits.file_size_mb, v.stdout


def test_parent_memory_per_job_does_not_grow_with_io_cases(sandbox: Sandbox) -> None:
    out = sandbox.config.limits.output_bytes
    flood = f"import sys\nsys.stdout.write('y' * {out})\n"  # each case prints a full output cap, wrong

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            v = sandbox.run(flood, io_cases=[("", "x")] * n)
            return tracemalloc.get_traced_memory()[1], v
        finally:
            tracemalloc.stop()

    (small, v4), (big, v40) = peak(4), peak(40)
    assert score(v4) == score(v40) == 0.0 and v40.total == 40
    assert big < small + 4 * out * 12, (small, big)  # 10x the cases, not 10x the memory
    assert sandbox.run(HONEST + "print(add(*map(int, input().split())))", io_cases=[("1 2", "3")] * 40).ok


@pytest.mark.parametrize("cwd", ["/", "/tmp"])
def test_sandbox_starts_from_any_working_directory(cwd: str) -> None:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with Sandbox(SandboxConfig(slots=1)) as sb:  # the canary must not see a false host path
            assert sb.run(HONEST, tests=ADD_TESTS).status is Status.PASS
    finally:
        os.chdir(here)


def test_signal_handlers_of_the_program_are_pythons_defaults(sandbox: Sandbox) -> None:
    code = (
        "import signal\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,"
        " signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n"
    )
    host_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run under `nohup ... &`
    v = sandbox.run(code)
    assert v.status is Status.PASS and v.stdout.strip() == "True True"
    assert signal.getsignal(signal.SIGINT) is host_before  # the host is untouched
