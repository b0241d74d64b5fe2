"""A resumable, epoch-aware sample order: the data position is one integer.

Epoch e visits a permutation of all rows seeded by (seed, e). ``consumed`` counts samples handed
out since the start, so the state to checkpoint is ``{"consumed": int}`` and a resumed run sees
exactly the samples an uninterrupted run would, across epoch boundaries too.
"""

from __future__ import annotations

import torch


class ResumableSampler:
    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError("no rows to sample from")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.num_rows, generator=g)
            else:
                self._perm = torch.arange(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def take(self, n: int) -> list[int]:
        """The next ``n`` row indices (wrapping into the next epoch when needed)."""
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.consumed, self.num_rows)
            out.append(int(self._order(epoch)[pos]))
            self.consumed += 1
        return out

    @property
    def epoch(self) -> float:
        return self.consumed / self.num_rows

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint was taken on {state['num_rows']} rows with seed {state['seed']}, this run has "
                f"{self.num_rows} rows with seed {self.seed}: resume with the same data and seed"
            )
        self.consumed = state["consumed"]
