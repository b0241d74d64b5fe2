"""Trusted-parent side of judging: turns tests into a job and the runner's stream into a Verdict.

Scoring rules (what a program cannot fake; the design is in sandboxes/README.md):
* io cases: the program's stdout, captured by the runner, is compared here with the expected
  text: exact after trailing whitespace on each line and trailing blank lines are removed, else
  token by token with numeric tokens compared under the tolerance policy of ``plain.py``. A case
  also needs a normal exit with status 0. Each case is judged as its line arrives, so the
  parent holds one case's output at a time, whatever the number of cases.
* asserts: the program runs in one process (C) that only serves its functions over a pipe pair
  in plain data; the tests run in another (T) that calls them through proxies. C never holds the
  tests, the expected values or any record channel.
  - value tests, ``assert EXPR == LITERAL`` (either side literal): T evaluates EXPR; its value
    travels here as plain data and is compared with the literal, which never enters the sandbox.
  - other tests (statements, ``check(candidate)``): run in T as ``__main__``; every ``==``/``!=``
    inside an ``assert`` goes through ``values_equal`` (``!=`` holds only between two plain
    values) and T reports the compared plain values, which the parent compares again; a test
    passes when T reports it ok and every comparison agrees.
  - no tests, or no assertion reached in the whole job: NO_TESTS (score 0, a data problem).
* out-of-memory is the cgroup's OOM-kill counter, never text the program wrote.
* the result channel is a pipe only the runner holds, closed by a per-run nonce the runner reads
  only after the program's processes have exited.
"""

from __future__ import annotations

import ast
import json
import math
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from .plain import DEFAULT_ABS_TOL, DEFAULT_REL_TOL, NotPlainError, encode, values_equal
from .slot import RawOutcome
from .verdict import Status, Verdict

_STRICT = "__pt_eq__"
_STRICT_NE = "__pt_ne__"
_COUNT = "__pt_assert__"  # called right before each assert statement runs: asserts reached
_TEST_KEYS = {"test", "rel_tol", "abs_tol"}


@dataclass(frozen=True)
class TestSpec:
    """One prepared test: `value` (expr evaluated in T, expected kept here) or `stmt`."""

    kind: str
    payload: str  # expr for value tests, rewritten source for stmt tests
    expected: list | None = None
    rel_tol: float = DEFAULT_REL_TOL
    abs_tol: float = DEFAULT_ABS_TOL
    exact_ints: bool = True  # False when the test set rel_tol/abs_tol: then ints compare with it too
    attr_bases: tuple[str, ...] = ()  # names the test uses as `name.attr` (modules, when allowed ones)


class _StrictAsserts(ast.NodeTransformer):
    """Rewrites `a == b` / `a != b` inside assert statements into type-strict calls, and counts
    every assert reached (a job in which none ran proves nothing)."""

    def visit_Assert(self, node: ast.Assert) -> list[ast.stmt]:
        node.test = _StrictCompare().visit(node.test)
        count = ast.Expr(ast.Call(func=ast.Name(_COUNT, ast.Load()), args=[], keywords=[]))
        return [count, node]


class _StrictCompare(ast.NodeTransformer):
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            return node
        name = _STRICT if isinstance(node.ops[0], ast.Eq) else _STRICT_NE
        return ast.Call(func=ast.Name(name, ast.Load()), args=[node.left, node.comparators[0]], keywords=[])


def _literal(node: ast.AST) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _tolerances(i: int, test: Mapping) -> tuple[str, float, float, bool]:
    unknown = set(test) - _TEST_KEYS
    if unknown or "test" not in test:
        raise ValueError(
            f"tests[{i}] has keys {sorted(test)}: a test given as a mapping needs 'test' (the code) and may "
            f"have 'rel_tol' and 'abs_tol'; remove {sorted(unknown) or 'nothing'} / add 'test'"
        )
    tol = []
    for key, default in (("rel_tol", DEFAULT_REL_TOL), ("abs_tol", DEFAULT_ABS_TOL)):
        value = test.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"tests[{i}].{key}={value!r} is invalid: use a finite number >= 0")
        tol.append(float(value))
    return test["test"], tol[0], tol[1], not ({"rel_tol", "abs_tol"} & set(test))


def prepare_tests(tests: list) -> list[TestSpec]:
    """Parse and classify tests (a str, or a mapping with 'test' and optional 'rel_tol'/'abs_tol').

    Raises ValueError naming the bad test.
    """
    specs = []
    for i, item in enumerate(tests):
        src, rel_tol, abs_tol, exact_ints = (
            _tolerances(i, item)
            if isinstance(item, Mapping)
            else (item, DEFAULT_REL_TOL, DEFAULT_ABS_TOL, True)
        )
        if not isinstance(src, str):
            raise ValueError(
                f"tests[{i}] must be a str of Python code (or a mapping with 'test'), got {type(src).__name__}"
            )
        try:
            tree = ast.parse(src)
        except SyntaxError as exc:
            raise ValueError(
                f"tests[{i}] is not valid Python ({exc.msg}, line {exc.lineno}): fix the test"
            ) from None
        bases = tuple(
            sorted(
                {
                    n.value.id
                    for n in ast.walk(tree)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                }
            )
        )
        kind, payload, expected = _classify(tree)
        specs.append(TestSpec(kind, payload, expected, rel_tol, abs_tol, exact_ints, bases))
    return specs


def _classify(tree: ast.Module) -> tuple[str, str, list | None]:
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
        test = tree.body[0].test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            for expr, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
                ok, value = _literal(other)
                if ok:
                    try:
                        expected = json.loads(json.dumps(encode(value)))
                    except NotPlainError:
                        break
                    return "value", ast.unparse(expr), expected
    rewritten = ast.fix_missing_locations(_StrictAsserts().visit(tree))
    return "stmt", ast.unparse(rewritten), None


def build_job(code: str, specs: list[TestSpec] | None, inputs: list[str] | None) -> bytes:
    """The job the runner reads: two length-prefixed JSON frames, the program first and the tests
    second (the runner forks the candidate between them). Expected values are never in it."""
    if specs is not None:
        head: dict = {"mode": "asserts", "code": code}
        tests = [
            {
                "kind": s.kind,
                "expr" if s.kind == "value" else "src": s.payload,
                "rel_tol": s.rel_tol,
                "abs_tol": s.abs_tol,
                "exact_ints": s.exact_ints,
            }
            for s in specs
        ]
        tail: dict = {"tests": tests, "attr_bases": sorted({b for s in specs for b in s.attr_bases})}
    elif inputs is not None:
        head, tail = {"mode": "io", "code": code, "inputs": inputs}, {}
    else:
        head, tail = {"mode": "plain", "code": code}, {}
    out = b""
    for frame in (head, tail):
        body = json.dumps(frame).encode()
        out += b"%010d\n" % len(body) + body
    return out


def normalize_output(text: str) -> str:
    """Trailing whitespace of each line and trailing blank lines removed (the io comparison rule)."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _token(tok: str) -> list:
    try:
        return ["int", str(int(tok))]
    except ValueError:
        pass
    try:
        return ["float", repr(float(tok))]
    except ValueError:
        return ["str", tok]


def outputs_match(
    got: str, expected: str, rel_tol: float = DEFAULT_REL_TOL, abs_tol: float = DEFAULT_ABS_TOL
) -> bool:
    """io comparison: normalized text equal, else same tokens per line; numbers under the policy of
    ``plain.values_equal`` (an integer token needs an equal whole number: no tolerance)."""
    a, b = normalize_output(got), normalize_output(expected)
    if a == b:
        return True
    la, lb = a.splitlines(), b.splitlines()
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        tx, ty = x.split(), y.split()
        if len(tx) != len(ty):
            return False
        for p, q in zip(tx, ty, strict=True):
            if p != q and not values_equal(_token(p), _token(q), rel_tol, abs_tol):
                return False
    return True


@dataclass
class JobJudge:
    """Judges one job from the runner's lines as they arrive; keeps O(1 unit) of their text.

    `feed(line)` takes one line of the result channel; `verdict(raw)` decides at the end.
    """

    specs: list[TestSpec] | None
    io_cases: list[tuple[str, str]] | None
    nonce: str
    per: list[bool] = field(default_factory=list)
    excerpt: dict | None = None  # the first failing unit, else the last one: stdout/stderr/exit
    units: int = 0
    ended: bool = False
    broken: str = ""
    xcpu: bool = False
    over: bool = False
    candidate: dict | None = None
    tests_unit: dict | None = None

    def feed(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:
            self.broken = self.broken or "malformed line from the runner"
            return
        if msg.get("end") is True:
            self.ended = msg.get("nonce") == self.nonce and not self.broken
            if msg.get("nonce") != self.nonce:
                self.broken = "result channel closed with a wrong nonce"
            return
        if (
            msg.get("unit") != self.units
            or not isinstance(msg.get("exit"), int)
            or not all(isinstance(msg.get(k), str) for k in ("stdout", "stderr"))
        ):
            self.broken = self.broken or "unexpected unit from the runner"
            return
        self.units += 1
        self.xcpu |= msg["exit"] == -signal.SIGXCPU
        self.over |= msg.get("over") is True
        excerpt = {"stdout": msg["stdout"], "stderr": msg["stderr"], "exit": msg["exit"]}
        if self.specs is not None:  # unit 0: the candidate C, unit 1: the tests T
            if self.units == 1:
                self.candidate = excerpt
            else:
                self.tests_unit = {
                    "rec": str(msg.get("rec", "")),
                    "exit": msg["exit"],
                    "stderr": msg["stderr"],
                }
            return
        if self.io_cases is not None:
            if self.units > len(self.io_cases):
                self.broken = "more units than io cases"
                return
            ok = msg["exit"] == 0 and outputs_match(msg["stdout"], self.io_cases[self.units - 1][1])
        else:
            ok = msg["exit"] == 0
        self.per.append(ok)
        if all(self.per) or (not ok and all(self.per[:-1])):
            self.excerpt = excerpt  # the last unit while all pass, then the first failing one

    def verdict(self, raw: RawOutcome) -> Verdict:
        """The verdict of the run, from what the parent observed only."""
        specs, io_cases = self.specs, self.io_cases
        total = len(specs) if specs is not None else len(io_cases) if io_cases is not None else 0

        def verdict(status: Status, detail: str, passed: int = 0, per: tuple[bool, ...] = ()) -> Verdict:
            out = (self.candidate if specs is not None else self.excerpt) or {}
            return Verdict(
                status, passed, total, out.get("stdout", ""), out.get("stderr", ""), raw.wall_s, detail, per
            )

        if raw.harness_error:
            return verdict(Status.SANDBOX_ERROR, raw.harness_error)
        if raw.timed_out:
            return verdict(Status.TIMEOUT, "wall-clock limit reached; every process of the run was killed")
        if raw.oom_killed:  # the kernel's OOM-kill counter of the slot's cgroup: nothing the program wrote
            return verdict(Status.OOM, "memory limit reached (the cgroup's OOM killer ended a process)")
        n_units = 2 if specs is not None else len(io_cases) if io_cases is not None else 1
        if not self.ended or self.units != n_units:
            if raw.result_overflow:
                why = "a result line overflowed its cap"
            elif raw.killed_by:
                why = (
                    f"the runner died by signal {raw.killed_by} twice, not killed by the parent (the runner "
                    "ignores every signal the program can send): scored as the program's failure"
                )
            else:
                why = self.broken or "no complete result from the runner (the program killed or starved it?)"
            return verdict(Status.FAIL, why)
        if self.xcpu:
            return verdict(Status.TIMEOUT, "cpu-time limit reached")
        if self.over:
            return verdict(Status.FAIL, "output limit exceeded")
        if specs is not None:
            return self._asserts(verdict)
        if io_cases is not None:
            passed = sum(self.per)
            failing = next((i for i, ok in enumerate(self.per) if not ok), None)
            if failing is None:
                return verdict(Status.PASS, f"{passed}/{len(self.per)} cases passed", passed, tuple(self.per))
            ex = self.excerpt or {}
            why = f"exit status {ex.get('exit')}" if ex.get("exit") != 0 else "wrong output"
            return verdict(Status.FAIL, f"case {failing}: {why}", passed, tuple(self.per))
        ok = self.per == [True]
        return verdict(Status.PASS if ok else Status.FAIL, f"exit status {(self.excerpt or {}).get('exit')}")

    def _asserts(self, verdict) -> Verdict:
        specs = self.specs
        unit = self.tests_unit or {"rec": "", "exit": None}
        recs = []
        for line in unit["rec"].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                recs.append(rec)
        load = next((r for r in recs if "load_error" in r), None)
        if load is not None:
            return verdict(Status.FAIL, f"program failed: {load['load_error']}", per=(False,) * len(specs))
        by_index = {r["i"]: r for r in recs if type(r.get("i")) is int and 0 <= r["i"] < len(specs)}
        done = any(r.get("done") is True for r in recs)
        per, first_error = [], ""
        for i, spec in enumerate(specs):
            r = by_index.get(i, {})
            ok, why = _test_ok(spec, r)
            if not ok and not first_error:
                first_error = f"test {i}: {why}"
            per.append(ok and done)
        passed = sum(per)
        if not done:
            first_error = f"the tests ended before all reported (exit {unit['exit']}); {first_error}"
        elif not any("error" in r for r in by_index.values()) and not any(
            type(r.get("asserts")) is int and r["asserts"] > 0 for r in by_index.values()
        ):  # every test ran to its end and not one assertion was reached: the job proved nothing
            return verdict(
                Status.NO_TESTS,
                "no assertion ran in any test (a data problem: check the dataset's tests)",
                0,
                (False,) * len(specs),
            )
        status = Status.PASS if passed == len(specs) and done else Status.FAIL
        return verdict(status, first_error or f"{passed}/{len(specs)} tests passed", passed, tuple(per))


def _test_ok(spec: TestSpec, rec: dict) -> tuple[bool, str]:
    """Decide one test here, on plain data: the value against the literal, or T's comparisons again."""
    if not rec:
        return False, "not run"
    if "error" in rec:
        return False, str(rec["error"])[:300]
    cmps = rec.get("cmps")
    if not isinstance(cmps, list):
        return False, "malformed test record"
    for cmp in cmps:
        if not (isinstance(cmp, list) and len(cmp) == 3 and isinstance(cmp[2], bool)):
            return False, "malformed comparison record"
        if values_equal(cmp[0], cmp[1], spec.rel_tol, spec.abs_tol, spec.exact_ints) is not cmp[2]:
            return False, "a comparison the tests reported disagrees with the parent's"
    if spec.kind == "value":
        if "value" not in rec:
            return False, "no value"
        return (
            (True, "")
            if values_equal(rec["value"], spec.expected, spec.rel_tol, spec.abs_tol, spec.exact_ints)
            else (False, "wrong value")
        )
    return (True, "") if rec.get("ok") is True else (False, "not reported ok")
