"""Test-only rollout actors that are slow on purpose (passed by ``rollout.worker`` import path).

Ray pickles these classes by value (the test registers this module), so their class attributes
travel to the actor processes as they were at import time.
"""

from __future__ import annotations

import os
import signal
import time

from posttrain.rollout.actor import RolloutWorker

STALL_FLAG = f"/tmp/posttrain_stall_{os.getpid()}"


class ChunkDelayWorker(RolloutWorker):
    """Every generate call takes 0.7 s longer: a batch's chunks then straddle a training step."""

    def generate(self, prompts, sampling):
        time.sleep(0.7)
        return super().generate(prompts, sampling)


class StallOnceWorker(RolloutWorker):
    """The first worker to claim ``STALL_FLAG`` hangs 12 s on its first training request (n > 1)."""

    def generate(self, prompts, sampling):
        if sampling.n > 1 and not getattr(self, "_claimed", False):
            self._claimed = True
            try:
                os.close(os.open(STALL_FLAG, os.O_CREAT | os.O_EXCL))
                time.sleep(12.0)
            except FileExistsError:
                pass
        return super().generate(prompts, sampling)


KILL_FLAG = f"/tmp/posttrain_kill_{os.getpid()}"


class KilledOnceWorker(RolloutWorker):
    """The first worker to claim ``KILL_FLAG`` is SIGKILLed while serving its first training request
    (n > 1): its process dies with the request in flight, as under an OOM kill."""

    def generate(self, prompts, sampling):
        if sampling.n > 1:
            _die_if_first(KILL_FLAG)
        return super().generate(prompts, sampling)


def _die_if_first(flag: str) -> None:
    """SIGKILL this process if it is the first to claim ``flag`` (a request in flight dies with it)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


CALLS_LOG = f"/tmp/posttrain_calls_{os.getpid()}"


class CountingWorker(RolloutWorker):
    """Appends the name of each sleep / wake_up / generate / update_weights call to ``CALLS_LOG``."""

    def _note(self, verb):
        # the verb, and whether what it needs was asleep then: a weight load needs the weights awake
        # (the KV cache wakes after it, once the trainer left the device), the rest everything
        asleep = "weights" in self.sleeping if verb == "update_weights" else self.asleep
        with open(CALLS_LOG, "a") as f:
            f.write(f"{verb} {int(asleep)}\n")

    def generate(self, prompts, sampling):
        self._note("generate")
        return super().generate(prompts, sampling)

    def sleep(self, level=1):
        self._note("sleep")
        return super().sleep(level)

    def wake_up(self, tags=None):
        self._note("wake_up")
        return super().wake_up(tags)

    def update_weights(self, buckets, version, restore=False):
        self._note("update_weights")
        return super().update_weights(buckets, version, restore)


MID_TRAJECTORY_KILL_FLAG = f"/tmp/posttrain_kill_mid_trajectory_{os.getpid()}"


class KilledMidTrajectoryWorker(RolloutWorker):
    """The first worker to claim ``MID_TRAJECTORY_KILL_FLAG`` is SIGKILLed while serving a turn that
    continues a trajectory (its prefix holds a tool's ``</output>``): a worker lost mid-trajectory."""

    def generate(self, prompts, sampling):
        from posttrain.models.tokenizer import build_char_tokenizer

        marker = build_char_tokenizer().encode("</output>", add_special_tokens=False)
        if any(_contains(p.token_ids, marker) for p in prompts):
            _die_if_first(MID_TRAJECTORY_KILL_FLAG)
        return super().generate(prompts, sampling)


def _contains(ids, sub) -> bool:
    return any(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))
