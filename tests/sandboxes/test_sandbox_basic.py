"""Normal PASS / FAIL behaviour, the async API, config errors and the start-up canary."""

from __future__ import annotations

import asyncio

import pytest
from posttrain.sandboxes import (
    Layer,
    Limits,
    Sandbox,
    SandboxConfig,
    SandboxConfigError,
    SandboxEscapeError,
    SandboxUnavailableError,
    Status,
)

ADD = "def add(a, b):\n    return a + b\n"


def test_asserts_pass_and_fail(sandbox: Sandbox) -> None:
    ok = sandbox.run(
        ADD, tests=["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'", "assert add(2, 2) > 3"]
    )
    assert ok.status is Status.PASS and (ok.passed, ok.total) == (3, 3)
    bad = sandbox.run(
        ADD,
        tests=[
            "assert add(1, 2) == 3",
            "assert add(1, 1) == 3",
            "assert add(2, 2) == 4.0",
            "assert add(1, 1) == True",
        ],
    )
    # int vs float of equal value passes (tolerance policy); bool is never an answer for an int
    assert bad.status is Status.FAIL and bad.per_test == (True, False, True, False)


def test_humaneval_style_check_function(sandbox: Sandbox) -> None:
    check = (
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\ncheck(add)"
    )
    assert sandbox.run(ADD, tests=[check]).status is Status.PASS
    wrong = "def add(a, b):\n    return a * b\n"
    assert sandbox.run(wrong, tests=[check]).status is Status.FAIL


def test_program_error_fails_every_test(sandbox: Sandbox) -> None:
    v = sandbox.run("raise ValueError('boom')", tests=["assert 1 == 1"])
    assert v.status is Status.FAIL and v.passed == 0 and "ValueError: boom" in v.detail


def test_io_cases(sandbox: Sandbox) -> None:
    code = "n = int(input())\nprint(n * 2)\n"
    v = sandbox.run(code, io_cases=[("21\n", "42\n"), ("5", "10"), ("1", "3")])
    assert v.status is Status.FAIL and v.per_test == (True, True, False) and v.passed == 2
    crash = sandbox.run("print(42)\nraise SystemExit(3)", io_cases=[("", "42")])
    assert crash.status is Status.FAIL and "exit status 3" in crash.detail


def test_plain_run_and_captured_output(sandbox: Sandbox) -> None:
    v = sandbox.run("import sys\nprint('hello')\nprint('err', file=sys.stderr)")
    assert v.status is Status.PASS and v.stdout == "hello\n" and v.stderr == "err\n" and v.total == 0
    assert sandbox.run("raise SystemExit(2)").status is Status.FAIL


def test_arun_runs_concurrently_on_the_pool(sandbox: Sandbox) -> None:
    async def main() -> list:
        jobs = [sandbox.arun(ADD, tests=[f"assert add({i}, 1) == {i + 1}"]) for i in range(6)]
        return await asyncio.gather(*jobs)

    verdicts = asyncio.run(main())
    assert [v.status for v in verdicts] == [Status.PASS] * 6


def test_run_argument_errors(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="either tests or io_cases"):
        sandbox.run(ADD, tests=["assert True"], io_cases=[("", "")])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        sandbox.run(ADD, tests=["assert ("])


def test_config_errors_name_the_field() -> None:
    with pytest.raises(SandboxConfigError, match="memory_mb"):
        Limits(memory_mb=0)
    with pytest.raises(SandboxConfigError, match="required layer"):
        SandboxConfig(disabled_layers=frozenset({Layer.USERNS}), allow_weaker=True)
    with pytest.raises(SandboxConfigError, match="outside /usr"):
        SandboxConfig(python="/root/.pyenv/shims/python3")


def test_canary_refuses_to_serve_with_seccomp_disabled(sandbox: Sandbox) -> None:
    cfg = SandboxConfig(slots=1, uid_base=61100, disabled_layers=frozenset({Layer.SECCOMP}))
    with pytest.raises(SandboxEscapeError, match="inet_socket got through") as err:
        Sandbox(cfg)
    assert "ptrace got through" in str(err.value)


def test_weaker_mode_is_explicit_and_reported(sandbox: Sandbox) -> None:
    cfg = SandboxConfig(slots=1, disabled_layers=frozenset({Layer.SECCOMP}), allow_weaker=True)
    with Sandbox(cfg) as weak:
        assert weak.missing_layers == {Layer.SECCOMP}
        assert any(w.startswith("ptrace") for w in weak.weaknesses)
        assert weak.run(ADD, tests=["assert add(1, 2) == 3"]).status is Status.PASS


def test_disabled_cgroup_without_allow_weaker_is_refused(sandbox: Sandbox) -> None:
    cfg = SandboxConfig(slots=1, disabled_layers=frozenset({Layer.CGROUP}))
    with pytest.raises(SandboxUnavailableError, match=r"\['cgroup'\].*allow_weaker=True"):
        Sandbox(cfg)


def test_counts_track_statuses(sandbox: Sandbox) -> None:
    before = sandbox.counts[Status.PASS]
    sandbox.run("pass")
    assert sandbox.counts[Status.PASS] == before + 1
