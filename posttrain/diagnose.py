"""Timeouts on remote calls, and a diagnosis of the actor a call waits on.

Every call the RL controller makes to its actors goes through :func:`wait_calls`: it waits at most
``timeout_s`` (``cluster.call_timeout_s``) and, when something has not answered by then, asks each
silent actor where it is. Actors answer that question through :func:`where_now`, which runs in its
own concurrency group (:data:`DIAG_GROUPS`), so it answers while the actor's main verb is blocked
(in a collective, in a hung engine). An actor that cannot answer even that is frozen (SIGSTOP,
stuck outside Python) or gone, and the error says so.

``ActorLost`` (the process died) and ``CallTimeout`` (no answer in time) both name the actor; the
controller turns them into a restart from the last checkpoint (trainer) or a replacement
(rollout worker).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

from posttrain.config.errors import PosttrainError

#: ``ray.remote(concurrency_groups=DIAG_GROUPS)``: one thread for ``where`` besides the verbs' own.
DIAG_GROUPS = {"diag": 1}


def remote_class(cls: type) -> Any:
    """``cls`` as a Ray actor class with the ``diag`` group its ``where`` verb runs in (Ray refuses
    to create an actor whose methods name a group the class was not declared with)."""
    import ray

    return ray.remote(concurrency_groups=DIAG_GROUPS)(cls)


class ActorLost(PosttrainError):
    """An actor's process died during a call."""

    def __init__(self, name: str, what: str, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
        super().__init__(f"{name} died during {what}: {first}")


class CallTimeout(PosttrainError):
    """Some actors did not answer a call within the configured time."""


def where_now() -> dict[str, Any]:
    """Where this process's busy threads are: for each thread running project code (not only the
    library's or Ray's), its innermost frame and the innermost frames of project code.

    Runs in the ``diag`` concurrency group (decorate the actor's verb with
    ``@ray.method(concurrency_group="diag")``)."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    busy = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)
        ours = [f for f in stack if _is_project(f.filename)]
        if ident == me or not ours:
            continue
        shown = [*ours[-2:], stack[-1]] if stack[-1] is not ours[-1] else ours[-3:]
        busy.append({"thread": names.get(ident, str(ident)), "frames": [f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in shown]})
    return {"pid": os.getpid(), "host": socket.gethostname(), "busy": busy}


def _is_project(filename: str) -> bool:
    return "site-packages" not in filename and "/lib/python" not in filename and not filename.startswith("<")


def _short(filename: str) -> str:
    parts = filename.split(os.sep)
    return os.sep.join(parts[-3:])


def _describe(name: str, actor: Any, started: float) -> str:
    import ray

    try:
        report = ray.get(actor.where.remote(), timeout=5)
    except Exception as err:  # noqa: BLE001 - any failure to answer is the diagnosis
        if isinstance(err, ray.exceptions.RayActorError):
            return f"  {name}: its process is gone ({type(err).__name__})"
        return (
            f"  {name}: does not answer even a status query (frozen: SIGSTOP, a debugger, or stuck outside "
            "Python with the GIL held)"
        )
    lines = [f"  {name} (pid {report['pid']} on {report['host']}), busy for {time.monotonic() - started:.1f} s:"]
    for thread in report["busy"] or [{"thread": "-", "frames": ["idle: no thread runs project code"]}]:
        lines.append(f"    thread {thread['thread']}: " + " <- ".join(reversed(thread["frames"])))
    return "\n".join(lines)


def wait_calls(calls: dict[str, tuple[Any, Any]], what: str, timeout_s: float | None) -> dict[str, Any]:
    """Results of remote calls ``{name: (actor handle, object ref)}``, by name.

    Raises :class:`ActorLost` for an actor whose process died, the actor's own exception for a
    call that raised, and :class:`CallTimeout` (with where each silent actor is) when any call is
    unfinished after ``timeout_s`` seconds (``None``: wait forever).
    """
    import ray

    started = time.monotonic()
    refs = {name: ref for name, (_, ref) in calls.items()}
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out, failed = {}, []
    for name, ref in refs.items():
        if ref not in ready:
            continue
        try:
            out[name] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise ActorLost(name, what, err) from err
        except Exception as err:  # noqa: BLE001 - re-raised below, after the silent ones are named
            if not pending:
                raise
            failed.append((name, err))
    if not pending:
        return out
    silent = [name for name, ref in refs.items() if ref not in ready]
    report = "\n".join(_describe(name, calls[name][0], started) for name in silent)
    errors = "".join(
        f"\n  {name} failed meanwhile: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        for name, err in failed
    )
    raise CallTimeout(
        f"{what}: no answer within cluster.call_timeout_s={timeout_s:g} s from {', '.join(silent)}.\n{report}{errors}\n"
        "  fix: look at the frames above (a collective waiting on a dead or frozen peer? a hung engine?); "
        "raise cluster.call_timeout_s if the work is just slow"
    )
