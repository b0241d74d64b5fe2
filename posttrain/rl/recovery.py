"""Recovery from a trainer rank that died or hung: restart the ranks from the newest checkpoint."""

from __future__ import annotations

from typing import Any

from posttrain.rl.checkpointing import Checkpointer
from posttrain.rl.trainers import TrainerFailed, TrainerGroup


class Recovery:
    """``recover(err)``: stop every rank, start new ones in a fresh process group, restore the
    newest checkpoint that verifies (or the initial model) and reload the rollout workers to it.
    Past ``cluster.max_trainer_restarts`` restarts the run stops with the cause."""

    def __init__(self, trainers: TrainerGroup, checkpoints: Checkpointer, limit: int) -> None:
        self.trainers, self.checkpoints, self.limit = trainers, checkpoints, limit

    def recover(self, err: TrainerFailed) -> dict[str, Any]:
        if self.trainers.restarts >= self.limit:
            raise TrainerFailed(
                f"{err}\n  the trainers were restarted {self.trainers.restarts} times already: limit "
                f"cluster.max_trainer_restarts={self.limit}.\n  fix: see the cause above; the run resumes from its newest "
                "checkpoint with checkpoint.resume=auto"
            ) from err
        first = str(err).splitlines()[0]
        print(f"[posttrain] {first}\n[posttrain] restarting the trainers from the newest checkpoint", flush=True)
        self.trainers.restart()
        path = self.checkpoints.find("auto")
        state = self.checkpoints.restore(path)
        print(f"[posttrain] resumed from {path or 'the initial model (no checkpoint yet)'} at step {state['step']}", flush=True)
        return state
