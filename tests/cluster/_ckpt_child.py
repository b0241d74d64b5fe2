"""Child process for the crash test: saves step 1, then saves step 2 with a slow write and waits to be killed.

    python _ckpt_child.py ROOT
Prints ``SAVED 1`` after the first checkpoint and ``SAVING 2`` once step 2's shards are on disk.
"""

from __future__ import annotations

import sys
import time

import torch
from ckpt_common import tiny_engine

from posttrain.engine import checkpoint
from posttrain.engine.dist import launch


def _main(rank: int, world: int, root: str) -> None:
    engine = tiny_engine()
    checkpoint.save_checkpoint(root, 1, engine, {}, keep_last=5)
    print("SAVED 1", flush=True)
    real_save = torch.save

    def slow_save(obj, path, *a, **kw):  # the crash lands after the shards, before the manifest
        real_save(obj, path, *a, **kw)
        print("SAVING 2", flush=True)
        time.sleep(60)

    checkpoint.torch.save = slow_save
    checkpoint.save_checkpoint(root, 2, engine, {}, keep_last=5)


if __name__ == "__main__":
    launch(_main, 1, args=(sys.argv[1],))
