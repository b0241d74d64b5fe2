"""RL checkpoints: the trainers' state plus the driver's (policy version, prompt frontier).

A checkpoint after step ``s`` (``checkpoint.every_steps``) holds the trainers' weights,
optimizers, schedulers and RNG (written atomically by the ranks, see posttrain.engine.checkpoint)
and the frontier: step ``s`` trained exactly the stream ordinals ``[0, s x prompts_per_step)``.
Rollouts generated ahead are not saved; they are generated again after a resume with the same
seeds (``posttrain.rl.fleet.batch_seed``).
"""

from __future__ import annotations

import os
from typing import Any

from posttrain.engine.checkpoint import CheckpointConfig
from posttrain.rl.prompts import PromptStream
from posttrain.rl.publisher import WeightPublisher
from posttrain.rl.records import roll_back_records
from posttrain.rl.trainers import TrainerGroup


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: str, trainers: TrainerGroup, publisher: WeightPublisher,
                 stream: PromptStream, max_steps: int) -> None:  # fmt: skip
        self.cfg, self.run_dir, self.trainers, self.publisher, self.stream = cfg, run_dir, trainers, publisher, stream
        self.max_steps = max_steps
        self.root = os.path.join(run_dir, "checkpoints")

    def after_step(self, step: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
        """Save after ``step`` when it is due (and its loss was finite)."""
        from posttrain.offline.runner import should_save

        if should_save(step, metrics, self.cfg.every_steps, self.max_steps):
            state = {**extra, "sampler": self.stream.frontier(step), "refilled": self.stream.refilled, "step": step,
                     "version": self.publisher.version}  # fmt: skip
            self.trainers.save(self.root, step, {"rl": state}, self.cfg.keep_last)

    def find(self, resume: str) -> str | None:
        """The checkpoint ``resume`` names (``auto``: the newest that verifies), or None."""
        return self.trainers.find(resume, self.root)

    def restore(self, path: str | None) -> dict[str, Any]:
        """Trainers back to checkpoint ``path`` (None: the initial model, step 0), the workers
        reloaded to its version, the prompt stream to its frontier, later records rolled back;
        the driver's state saved with it."""
        state: dict[str, Any] = {"step": 0, "version": 0}
        if path is not None:
            state = self.trainers.load(path)["rl"]
        self.publisher.restore(state["version"])
        self.stream.seek(state.get("sampler"), state.get("refilled", 0))
        roll_back_records(self.run_dir, state["step"])
        return state
