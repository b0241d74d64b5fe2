"""Trusted-parent side of judging: turns tests into a job and a RawOutcome into a Verdict.

Scoring rules (what a program cannot fake):
* io cases: the program's stdout, captured by the runner, is compared here with the expected
  text: exact, except trailing whitespace on each line and trailing blank lines. A case also
  needs a normal exit with status 0.
* value tests, ``assert EXPR == LITERAL`` (either side literal): only EXPR is evaluated in the
  sandbox; its value travels back as a type-strict encoding (exact builtin types only) and is
  compared here with the literal, which never enters the sandbox. Forged ``__eq__``, int-vs-float
  or bool-vs-int answers fail.
* other tests (statements, test functions, HumanEval-style ``check(candidate)``): run in the
  sandbox after the program, every ``==``/``!=`` inside an ``assert`` rewritten to a type-strict
  comparison. They pass only if a per-test record saying so arrives and the run reached its end
  record; the program exiting early (sys.exit / os._exit) fails every test it skipped.
  Limitation: a program written to attack the runner's own memory or protocol could forge these
  records; value tests and io cases are immune to that.
* the result channel is a pipe only the runner (never the program's process) holds, stamped with
  a per-run nonce the runner reads only after the program's processes have exited.
"""

from __future__ import annotations

import ast
import json
import signal
from dataclasses import dataclass

from .runner import encode_value
from .slot import RawOutcome
from .verdict import Status, Verdict

_STRICT = "__pt_strict_eq__"


@dataclass(frozen=True)
class TestSpec:
    """One prepared test: `value` (expr evaluated in the sandbox, expected kept here) or `stmt`."""

    kind: str
    payload: str  # expr for value tests, rewritten source for stmt tests
    expected: list | None = None


class _StrictAsserts(ast.NodeTransformer):
    """Rewrites `a == b` / `a != b` inside assert statements into type-strict calls."""

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        node.test = _StrictCompare().visit(node.test)
        return node


class _StrictCompare(ast.NodeTransformer):
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            return node
        call = ast.Call(
            func=ast.Name(_STRICT, ast.Load()), args=[node.left, node.comparators[0]], keywords=[]
        )
        return call if isinstance(node.ops[0], ast.Eq) else ast.UnaryOp(op=ast.Not(), operand=call)


def _literal(node: ast.AST) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def prepare_tests(tests: list[str]) -> list[TestSpec]:
    """Parse and classify test strings; raises ValueError naming the bad test."""
    specs = []
    for i, src in enumerate(tests):
        if not isinstance(src, str):
            raise ValueError(f"tests[{i}] must be a str of Python code, got {type(src).__name__}")
        try:
            tree = ast.parse(src)
        except SyntaxError as exc:
            raise ValueError(
                f"tests[{i}] is not valid Python ({exc.msg}, line {exc.lineno}): fix the test"
            ) from None
        specs.append(_classify(tree))
    return specs


def _classify(tree: ast.Module) -> TestSpec:
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
        test = tree.body[0].test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            for expr, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
                ok, value = _literal(other)
                if ok:
                    try:
                        expected = json.loads(json.dumps(encode_value(value)))
                    except TypeError:
                        break
                    return TestSpec("value", ast.unparse(expr), expected)
    rewritten = ast.fix_missing_locations(_StrictAsserts().visit(tree))
    return TestSpec("stmt", ast.unparse(rewritten))


def build_job(code: str, specs: list[TestSpec] | None, inputs: list[str] | None) -> dict:
    """The JSON job the runner reads (expected values are deliberately not in it)."""
    if specs is not None:
        tests = [{"kind": s.kind, "expr" if s.kind == "value" else "src": s.payload} for s in specs]
        return {"mode": "asserts", "code": code, "tests": tests}
    if inputs is not None:
        return {"mode": "io", "code": code, "inputs": inputs}
    return {"mode": "plain", "code": code}


def normalize_output(text: str) -> str:
    """Trailing whitespace of each line and trailing blank lines removed (the io comparison rule)."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _parse_result(raw: RawOutcome, nonce: str, n_units: int) -> list[dict] | None:
    if raw.result is None:
        return None
    try:
        data = json.loads(raw.result)
        units = data["units"]
        if data["nonce"] != nonce or not isinstance(units, list) or len(units) != n_units:
            return None
        for u in units:
            if not isinstance(u["exit"], int) or not all(
                isinstance(u[k], str) for k in ("stdout", "stderr", "rec")
            ):
                return None
    except (ValueError, KeyError, TypeError):
        return None
    return units


def _records(unit: dict) -> list[dict]:
    out = []
    for line in unit["rec"].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def decide(
    raw: RawOutcome,
    nonce: str,
    specs: list[TestSpec] | None,
    io_cases: list[tuple[str, str]] | None,
) -> Verdict:
    """The verdict of one run, from what the parent observed only."""
    total = len(specs) if specs is not None else len(io_cases) if io_cases is not None else 0

    def verdict(
        status: Status, detail: str, passed: int = 0, per: tuple[bool, ...] = (), unit=None
    ) -> Verdict:
        out = unit or {}
        return Verdict(
            status, passed, total, out.get("stdout", ""), out.get("stderr", ""), raw.wall_s, detail, per
        )

    if raw.harness_error:
        return verdict(Status.SANDBOX_ERROR, raw.harness_error)
    if raw.timed_out:
        return verdict(Status.TIMEOUT, "wall-clock limit reached; every process of the run was killed")
    units = _parse_result(raw, nonce, len(io_cases) if io_cases is not None else 1)
    memory_errors = any(
        str(r.get("error", "")).startswith("MemoryError") for u in units or [] for r in _records(u)
    )
    if raw.oom_killed or memory_errors:
        return verdict(Status.OOM, "memory limit reached", unit=units[0] if units else None)
    if units is None and raw.killed_by:
        return verdict(
            Status.SANDBOX_ERROR,
            f"the slot's process was killed by signal {raw.killed_by} from outside the sandbox (host OOM "
            "killer, an operator); the program cannot signal its runner",
        )
    if units is None:
        why = "result channel overflowed" if raw.result_overflow else "no valid result from the runner"
        return verdict(Status.FAIL, f"{why} (the program killed or starved it?)")
    if any(u["exit"] == -signal.SIGXCPU for u in units):
        return verdict(Status.TIMEOUT, "cpu-time limit reached", unit=units[0])
    if any(u.get("over") for u in units):
        return verdict(Status.FAIL, "output limit exceeded", unit=units[0])
    if specs is not None:
        return _decide_asserts(units[0], specs, verdict)
    if io_cases is not None:
        return _decide_io(units, io_cases, verdict)
    ok = units[0]["exit"] == 0
    return verdict(Status.PASS if ok else Status.FAIL, f"exit status {units[0]['exit']}", unit=units[0])


def _decide_asserts(unit: dict, specs: list[TestSpec], verdict) -> Verdict:
    recs = _records(unit)
    code = next((r for r in recs if r.get("phase") == "code"), None)
    if code is None or "error" in code:
        why = code["error"] if code else f"the program ended (exit {unit['exit']}) before the tests ran"
        return verdict(Status.FAIL, f"program failed: {why}", per=(False,) * len(specs), unit=unit)
    by_index: dict[int, dict] = {}
    for r in recs:
        i = r.get("i")
        if type(i) is int and 0 <= i < len(specs) and i not in by_index:
            by_index[i] = r
    done = any(r.get("done") is True for r in recs)
    per = []
    first_error = ""
    for i, spec in enumerate(specs):
        r = by_index.get(i, {})
        ok = done and (r.get("value") == spec.expected if spec.kind == "value" else r.get("ok") is True)
        ok = ok and "error" not in r
        if not ok and not first_error:
            first_error = f"test {i}: " + str(r.get("error") or ("wrong value" if r else "not run"))
        per.append(bool(ok))
    passed = sum(per)
    if not done:
        first_error = f"the run ended before all tests reported (exit {unit['exit']}); {first_error}"
    status = Status.PASS if passed == len(specs) and done else Status.FAIL
    return verdict(status, first_error or f"{passed}/{len(specs)} tests passed", passed, tuple(per), unit)


def _decide_io(units: list[dict], io_cases: list[tuple[str, str]], verdict) -> Verdict:
    per = [
        u["exit"] == 0 and normalize_output(u["stdout"]) == normalize_output(expected)
        for u, (_, expected) in zip(units, io_cases, strict=True)
    ]
    passed = sum(per)
    failing = next((i for i, ok in enumerate(per) if not ok), None)
    if failing is None:
        return verdict(Status.PASS, f"{passed}/{len(per)} cases passed", passed, tuple(per), units[-1])
    u = units[failing]
    why = f"exit status {u['exit']}" if u["exit"] != 0 else "wrong output"
    return verdict(Status.FAIL, f"case {failing}: {why}", passed, tuple(per), u)
