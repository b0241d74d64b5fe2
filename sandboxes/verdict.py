"""The typed result of one sandboxed execution."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(str, enum.Enum):
    """Outcome of one run, decided by the trusted parent (never by the child's exit code or stdout).

    SANDBOX_ERROR means the harness itself failed (not the program): callers mask it and count it,
    they must not score it as a failure of the completion. NO_TESTS means the job proved nothing:
    an empty test list or io case list, or tests in which no assertion ran; it scores 0 (never a
    pass) and callers count it as a data problem.
    """

    PASS = "PASS"
    FAIL = "FAIL"
    TIMEOUT = "TIMEOUT"
    OOM = "OOM"
    NO_TESTS = "NO_TESTS"
    SANDBOX_ERROR = "SANDBOX_ERROR"


@dataclass(frozen=True)
class Verdict:
    """Result of `Sandbox.run`.

    passed/total count test strings (assert mode) or io cases (io mode); a plain execution (tests
    and io_cases both None) has total == 0 and is PASS when the program exits normally; an empty
    test or io case list is NO_TESTS.
    stdout/stderr are excerpts capped at `Limits.output_bytes`; wall_s is seconds from the job
    being handed to a warm slot to its result; detail is a one-line human reason.
    """

    status: Status
    passed: int
    total: int
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    detail: str = ""
    per_test: tuple[bool, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when every test / io case passed."""
        return self.status is Status.PASS

    @property
    def fraction(self) -> float | None:
        """passed / total, or None when the run is not scoreable (SANDBOX_ERROR) or has no tests."""
        if self.status is Status.SANDBOX_ERROR or self.total == 0:
            return None
        return self.passed / self.total
