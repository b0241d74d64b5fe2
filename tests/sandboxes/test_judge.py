"""Pure tests of the trusted-parent judging rules and the plain-data codec (no sandbox needed)."""

from __future__ import annotations

import json

import pytest
from posttrain.sandboxes.judge import JobJudge, normalize_output, outputs_match, prepare_tests
from posttrain.sandboxes.plain import NotPlainError, decode, encode, values_equal
from posttrain.sandboxes.slot import RawOutcome
from posttrain.sandboxes.verdict import Status


def test_literal_asserts_become_value_tests_with_expected_kept_in_parent() -> None:
    specs = prepare_tests(["assert f(1) == [1, 2]", "assert 3 == g(x)", "assert f(1)", "assert f(a) == g(b)"])
    assert [s.kind for s in specs] == ["value", "value", "stmt", "stmt"]
    assert specs[0].payload == "f(1)" and specs[0].expected == ["list", [["int", "1"], ["int", "2"]]]
    assert specs[1].payload == "g(x)" and specs[1].expected == ["int", "3"]
    assert "__pt_eq__(f(a), g(b))" in specs[3].payload


def test_equalities_inside_test_functions_are_rewritten() -> None:
    src = "def check(c):\n    assert c(1) == 2\n    assert c(2) != 3, 'msg'\n    x = c(1) == 2\ncheck(f)"
    (spec,) = prepare_tests([src])
    assert spec.kind == "stmt"
    assert "assert __pt_eq__(c(1), 2)" in spec.payload
    assert "assert __pt_ne__(c(2), 3), 'msg'" in spec.payload  # != holds only between plain values
    assert "x = c(1) == 2" in spec.payload  # only asserts are rewritten
    assert spec.payload.count("__pt_assert__()") == 2  # each assert counts itself when reached


def test_bad_tests_name_the_test_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"tests\[1\] is not valid Python"):
        prepare_tests(["assert True", "assert ("])
    with pytest.raises(ValueError, match=r"tests\[0\] has keys .*'tol'.*'rel_tol'"):
        prepare_tests([{"test": "assert True", "tol": 1}])
    with pytest.raises(ValueError, match=r"tests\[0\].rel_tol=-1 is invalid"):
        prepare_tests([{"test": "assert True", "rel_tol": -1}])
    (spec,) = prepare_tests([{"test": "assert f() == 0.5", "rel_tol": 1e-3}])
    assert spec.rel_tol == 1e-3 and spec.abs_tol == 0.0


def test_codec_rejects_forged_eq_and_subclasses_and_round_trips_builtins() -> None:
    class AlwaysEqual:
        def __eq__(self, other: object) -> bool:
            return True

    class FakeInt(int):
        pass

    for bad in (AlwaysEqual(), FakeInt(3), [AlwaysEqual()]):
        with pytest.raises(NotPlainError):
            encode(bad)
    value = {"a": [1, (2, 3.5)], "b": {1, 2}, "c": None, "d": b"\x00", "e": 1j, "f": True}
    assert decode(json.loads(json.dumps(encode(value)))) == value
    with pytest.raises(ValueError):
        decode(["ref", 1, "x"])  # refs only decode on the candidate channel


def test_tolerance_policy() -> None:
    def eq(a: object, b: object, **tol: float) -> bool:
        return values_equal(encode(a), encode(b), **tol)

    assert eq(3, 3.0) and eq([1, 2.0], [1.0, 2]) and eq({"x": 3}, {"x": 3.0})
    assert eq(0.1 + 0.2, 0.3) and not eq(1.0, 1.001) and eq(1.0, 1.001, rel_tol=1e-2)
    assert not eq(1, True) and not eq(0, None) and not eq((1,), [1]) and not eq("1", 1)
    assert eq({1, 2}, frozenset({2.0, 1})) and not eq({1, 2}, {1, 3})
    assert not eq(float("nan"), float("nan")) and eq(float("inf"), float("inf"))
    assert eq(10**16, 1e16) and not eq(10**30, 1e30) and not eq(10**400, 1.0)  # exact, as Python
    assert not values_equal(["ref", 0, "X"], ["ref", 0, "X"])  # an object is never equal to anything
    assert not values_equal(["int"], ["int", "1"])  # malformed: False, not an exception


def test_io_comparison() -> None:
    assert normalize_output("1 2  \n3\n\n") == normalize_output("1 2\n3")
    assert outputs_match("3.0\n", "3\n") and outputs_match("0.30000000000000004", "0.3")
    assert (
        not outputs_match(" 1 2", "12") and not outputs_match("1\n2", "12") and not outputs_match("3.1", "3")
    )
    assert not outputs_match("yes", "YES")


def _io_line(k: int, out: str) -> bytes:
    return json.dumps({"unit": k, "exit": 0, "stdout": out, "stderr": "", "over": False}).encode()


def test_io_judge_keeps_one_excerpt_whatever_the_case_count() -> None:
    cases = [("", "x" * 1000)] * 200
    judge = JobJudge(None, cases, "n0")
    for k in range(200):
        judge.feed(_io_line(k, "x" * 1000 if k != 7 else "wrong"))
    judge.feed(json.dumps({"end": True, "nonce": "n0"}).encode())
    v = judge.verdict(RawOutcome(None, False, False, False, "", 0.1))
    assert v.status is Status.FAIL and v.passed == 199 and "case 7" in v.detail and v.stdout == "wrong"
    held = [x for x in vars(judge).values() if isinstance(x, (str, dict))]
    assert sum(len(json.dumps(x)) for x in held) < 5000  # one excerpt, not 200 outputs


def test_a_wrong_nonce_or_missing_end_is_fail() -> None:
    for end in ({"end": True, "nonce": "other"}, None):
        judge = JobJudge(None, [("", "1")], "n0")
        judge.feed(_io_line(0, "1"))
        if end:
            judge.feed(json.dumps(end).encode())
        assert judge.verdict(RawOutcome(None, False, False, False, "", 0.1)).status is Status.FAIL


def test_parent_re_decides_reported_comparisons() -> None:
    specs = prepare_tests(["def check(c):\n    assert c(1) == 2\ncheck(f)", "assert f(1) == 2"])
    lie = [encode(3), encode(2), True]  # a test process claiming 3 == 2
    recs = [
        {"i": 0, "ok": True, "cmps": [lie], "partial": False, "asserts": 1},
        {"i": 1, "value": encode(2.0), "cmps": [], "partial": False, "asserts": 1},
        {"done": True},
    ]
    judge = JobJudge(specs, None, "n")
    judge.feed(json.dumps({"unit": 0, "exit": 0, "stdout": "", "stderr": ""}).encode())
    rec = "\n".join(json.dumps(r) for r in recs)
    judge.feed(json.dumps({"unit": 1, "exit": 0, "stdout": "", "stderr": "", "rec": rec}).encode())
    judge.feed(json.dumps({"end": True, "nonce": "n"}).encode())
    v = judge.verdict(RawOutcome(None, False, False, False, "", 0.1))
    assert v.per_test == (False, True) and "disagrees" in v.detail


def test_an_int_compares_exactly_unless_the_test_sets_a_tolerance() -> None:
    def eq(a: object, b: object, **kw: object) -> bool:
        return values_equal(encode(a), encode(b), **kw)

    assert eq(3, 3.0) and eq(3.0, 3) and eq(1000000007, 1000000007.0)
    assert not eq(1000000008.0, 1000000007) and not eq(1000000007, 1000000008.0)
    assert not eq(3.0000000001, 3) and eq(3.0000000001, 3.0)  # floats keep the default tolerance
    assert not eq(complex(1000000008, 0), 1000000007) and eq(3 + 0j, 3)
    assert not eq([1000000008.0], [1000000007]) and not eq({"k": 1000000008.0}, {"k": 1000000007})
    assert eq(1000000008.0, 1000000007, rel_tol=1e-6, exact_ints=False)  # a test's own tolerance
    specs = prepare_tests(["assert f() == 1", {"test": "assert f() == 1", "rel_tol": 1e-6}])
    assert [s.exact_ints for s in specs] == [True, False]
    assert not outputs_match("1.23456789e11", "123456789012") and not outputs_match(
        "1000000008.0", "1000000007"
    )
    assert outputs_match("3.0", "3") and outputs_match("123456789012.0", "123456789012")


def _asserts_job(specs, recs: list[dict], unit_extra: str = "") -> JobJudge:
    judge = JobJudge(specs, None, "n")
    judge.feed(json.dumps({"unit": 0, "exit": 0, "stdout": unit_extra, "stderr": ""}).encode())
    rec = "\n".join(json.dumps(r) for r in recs)
    judge.feed(json.dumps({"unit": 1, "exit": 0, "stdout": "", "stderr": "", "rec": rec}).encode())
    judge.feed(json.dumps({"end": True, "nonce": "n"}).encode())
    return judge


def test_no_assertion_reached_is_no_tests_and_memory_error_text_is_no_oom() -> None:
    specs = prepare_tests(["x = 1", "def check(c):\n    assert c(1) == 2"])
    recs = [{"i": i, "ok": True, "cmps": [], "partial": False, "asserts": 0} for i in range(2)] + [
        {"done": True}
    ]
    v = _asserts_job(specs, recs).verdict(RawOutcome(None, False, False, False, "", 0.1))
    assert v.status is Status.NO_TESTS and v.passed == 0
    recs[0]["asserts"] = 1
    assert (
        _asserts_job(specs, recs).verdict(RawOutcome(None, False, False, False, "", 0.1)).status
        is Status.PASS
    )
    # the text "MemoryError" anywhere (a value, a message, stdout) is not a memory limit
    specs = prepare_tests(["assert f() == 'MemoryError'"])
    recs = [
        {"i": 0, "value": encode("MemoryError"), "cmps": [], "partial": False, "asserts": 1},
        {"done": True},
    ]
    judge = _asserts_job(specs, recs, unit_extra="MemoryError")
    assert judge.verdict(RawOutcome(None, False, False, False, "", 0.1)).status is Status.PASS
    # only the cgroup's OOM-kill counter (oom_killed) makes OOM
    assert judge.verdict(RawOutcome(None, False, True, False, "", 0.1)).status is Status.OOM
