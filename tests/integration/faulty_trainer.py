"""Test-only trainer ranks that fail on purpose (substituted through ``TrainerGroup.trainer_class``).

Ray pickles these classes by value (the tests register this module), so the flag paths travel to
the actor processes as they were in the test process.
"""

from __future__ import annotations

import os
import signal
import time

from posttrain.rl.trainer_worker import TrainerWorker

KILL_FLAG = f"/tmp/posttrain_trainer_kill_{os.getpid()}"
HANG_FLAG = f"/tmp/posttrain_trainer_hang_{os.getpid()}"
KILL_AT_STEP = 4  # the RL step whose training the rank dies in


def _claim(flag: str) -> bool:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class DiesOnceTrainer(TrainerWorker):
    """Rank 0 SIGKILLs itself once, inside ``train`` of RL step ``KILL_AT_STEP``: the rollouts of
    that step are generated, scored and in the ledger, the optimizer step never happens."""

    def train(self, rows):
        if self.rank == 0 and self.policy.step == KILL_AT_STEP - 1 and _claim(KILL_FLAG):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train(rows)


class ForgetsOptimizerTrainer(DiesOnceTrainer):
    """A deliberately broken restore: the checkpoint loads, then AdamW's moments are dropped (as if
    the optimizer state had not been saved). The resume test must notice."""

    def load(self, path):
        extra = super().load(path)
        self.policy.optimizer.state.clear()
        return extra


class HangsInTrainTrainer(TrainerWorker):
    """Rank 1 never reaches the gradient all-reduce of its first ``train`` (it sleeps), so rank 0
    waits in a collective that never completes. The flag file holds when the hang began."""

    def train(self, rows):
        if self.rank == 1 and _claim(HANG_FLAG):
            with open(HANG_FLAG, "w") as f:
                f.write(repr(time.time()))
            time.sleep(3600)
        return super().train(rows)
