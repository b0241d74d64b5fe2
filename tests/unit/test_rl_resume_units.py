"""The pieces exact resume and hang diagnosis stand on, without Ray: request seeds, the roll-back of
run records, and the report of where a process's threads are."""

from __future__ import annotations

import json
import threading

from posttrain.diagnose import where_now
from posttrain.rl.fleet import batch_seed
from posttrain.rl.records import roll_back_records
from posttrain.types import PromptRecord


def _p(ordinal: int, ids: list[int]) -> PromptRecord:
    return PromptRecord(ordinal, "x", ids, {})


def test_batch_seed_is_a_function_of_the_request_content():
    batch = [_p(0, [1, 2, 3]), _p(1, [4, 5])]
    assert batch_seed(7, batch) == batch_seed(7, [_p(0, [1, 2, 3]), _p(1, [4, 5])])
    others = {
        batch_seed(8, batch),  # another run seed
        batch_seed(7, [_p(0, [1, 2, 3]), _p(2, [4, 5])]),  # another ordinal
        batch_seed(7, [_p(0, [1, 2, 3]), _p(1, [4, 5, 9])]),  # a continuation chunk (one more token)
        batch_seed(7, batch[::-1]),  # another order of the same prompts
    }
    assert batch_seed(7, batch) not in others and len(others) == 4
    assert all(0 <= s < 2**31 for s in others)


def test_roll_back_records_moves_later_steps_aside(tmp_path):
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(tmp_path / name, "w") as f:
            for step in (0, 1, 2, 3, 4):
                f.write(json.dumps({"step": step, "name": name}) + "\n")
    roll_back_records(str(tmp_path), 2)
    for name in ("metrics", "samples"):
        kept = [json.loads(line)["step"] for line in open(tmp_path / f"{name}.jsonl")]
        aside = [json.loads(line)["step"] for line in open(tmp_path / f"{name}.rolledback.jsonl")]
        assert kept == [0, 1, 2] and aside == [3, 4]
    roll_back_records(str(tmp_path), 2)  # nothing later: nothing moves
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.rolledback.jsonl")] == [3, 4]


def _stuck_in_project_code(started: threading.Event, release: threading.Event) -> None:
    started.set()
    release.wait(30)


def test_where_now_names_the_busy_thread_and_its_frame():
    started, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_stuck_in_project_code, args=(started, release), name="stuck-verb")
    t.start()
    started.wait(5)
    try:
        report = where_now()
    finally:
        release.set()
        t.join()
    [busy] = [b for b in report["busy"] if b["thread"] == "stuck-verb"]
    assert any("test_rl_resume_units.py" in f and "_stuck_in_project_code" in f for f in busy["frames"])
    assert busy["frames"][-1].endswith("in wait")  # the innermost frame: where it blocks
    assert report["pid"] > 0 and report["host"]
