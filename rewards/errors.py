"""Errors a user of posttrain.rewards can cause; each message names the cause and the fix."""

from __future__ import annotations

from posttrain.config.errors import PosttrainError


class RewardError(PosttrainError):
    """Base class of every error raised by posttrain.rewards (a user-facing error: the CLI prints
    its message, which names the cause and the fix, without a traceback)."""


class RewardGraphError(RewardError, ValueError):
    """The reward graph is malformed (cycle, missing input, duplicate name, bad option)."""


class RewardConfigError(RewardGraphError):
    """A recipe's reward config is invalid (unknown key, wrong type, import path that fails)."""


class RewardFailureError(RewardError):
    """A step's rewards failed beyond the configured tolerance.

    Raised when a node with ``on_error="fail"`` errors, or when more than
    ``max_failed_fraction`` of a step's samples are masked. The message names the node(s) and
    their first errors.
    """


class VerdictParseError(RewardError):
    """A judge's reply held no verdict the node could parse (the sample is masked, not scored 0)."""


class RewardActorError(RewardError):
    """A reward node's Ray actor could not be kept alive: it failed to start, or it died more often
    than the node's ``max_actor_restarts`` allows."""


class SampleFailure(RewardError):
    """Returned (not raised) by a batch or group function in place of one sample's value: that
    sample is recorded as an error with this message, the other samples keep their values.

    ``metric`` (optional) names a per-node counter: each such failure adds 1 to
    ``reward/<node>/<metric>`` for the step (e.g. ``bad_reference``), besides ``errors``.
    """

    def __init__(self, message: str, metric: str | None = None) -> None:
        super().__init__(message)
        self.metric = metric

    def __reduce__(self):  # keep ``metric`` across pickling (reward nodes in Ray actors)
        return (_restore_failure, (type(self), self.args, self.metric))


def _restore_failure(cls: type[SampleFailure], args: tuple, metric: str | None) -> SampleFailure:
    failure = cls.__new__(cls)
    failure.args, failure.metric = args, metric
    return failure


class BadReference(SampleFailure):
    """A sample's gold answer (a dataset field) cannot be used: a data bug in that one row. The
    sample is masked and counted as ``reward/<node>/bad_reference``; the rest of the batch scores."""

    def __init__(self, message: str) -> None:
        super().__init__(message, metric="bad_reference")
