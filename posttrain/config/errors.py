"""User-facing errors: one message naming the cause and the fix, and an exit code."""

from __future__ import annotations


class PosttrainError(Exception):
    """An error the user can fix. The CLI prints ``str(err)`` (no traceback) and exits ``exit_code``."""

    exit_code = 1


class ConfigError(PosttrainError):
    """A recipe or override that cannot be run: unknown key, wrong type, inconsistent values."""

    exit_code = 2

    def __init__(self, key: str, source: str, problem: str, fix: str) -> None:
        self.key, self.source, self.problem, self.fix = key, source, problem, fix
        super().__init__(f"config error in {source}: key '{key}': {problem}\n  fix: {fix}")


class DataError(PosttrainError):
    """Missing data files, or too many bad rows."""

    exit_code = 3


class ModelLoadError(PosttrainError):
    """A model or tokenizer path that is missing or unreadable."""

    exit_code = 4
