"""Loading rows from local files, `datasets` sources or synthetic tasks, with bad-row accounting."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.config.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DatasetSource:
    """Where rows come from: ``path`` (local jsonl/json/parquet file or folder, or a `datasets`
    name on the user's machine) or ``synthetic`` (a task config with ``_target_``)."""

    path: str | None = None
    split: str = "train"
    synthetic: Any = None  # e.g. {_target_: posttrain.data.tasks.ArithmeticTask, digits: 2}
    num_examples: int = 0  # synthetic: rows to generate; files: 0 = all
    seed: int = 0

    def validate(self) -> tuple[str, str, str] | None:
        if (self.path is None) == (self.synthetic is None):
            return ("path", "set exactly one of path and synthetic", "give a local file path or a synthetic task")
        if self.synthetic is not None and self.num_examples <= 0:
            return ("num_examples", "synthetic data needs num_examples > 0", "set num_examples, e.g. 2000")
        return None


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(src: DatasetSource, key: str) -> list[dict[str, Any]]:
    """All rows of ``src`` as dicts (synthetic rows are generated deterministically from seed)."""
    if src.synthetic is not None:
        return src.synthetic.generate(src.num_examples, src.seed)
    path = src.path
    if os.path.exists(path):
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in _FORMATS)
        if not files:
            raise DataError(f"{key}.path '{path}' holds no .jsonl/.json/.parquet/.csv files.\n  fix: point it at a data file or folder")
        ext = os.path.splitext(files[0])[1]
        if ext not in _FORMATS:
            raise DataError(f"{key}.path '{path}': unsupported file type '{ext}'.\n  fix: use .jsonl, .json, .parquet or .csv")
        import datasets

        ds = datasets.load_dataset(_FORMATS[ext], data_files=files, split="train")
    elif path.startswith(("/", "./", "../", "~")) or path.endswith(tuple(_FORMATS)):
        raise DataError(f"{key}.path: file '{path}' does not exist.\n  fix: check the path (relative paths are from the working directory)")
    else:
        import datasets

        try:
            ds = datasets.load_dataset(path, split=src.split)
        except Exception as exc:  # datasets raises many types; the message is what matters
            raise DataError(f"{key}.path: cannot load dataset '{path}' split '{src.split}': {exc}\n  fix: use a local file or a dataset available offline") from None
    rows = [dict(r) for r in ds]
    return rows[: src.num_examples] if src.num_examples else rows


def build_examples(
    rows: list[dict[str, Any]], make: Callable[[dict[str, Any]], Any], max_bad_fraction: float, key: str
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Apply ``make`` to every row; it returns an example, or a reason string for a bad row.

    Bad rows are skipped with one warning summarising the reasons; if more than
    ``max_bad_fraction`` of rows are bad, raise ``DataError`` naming the commonest reason.
    Returns (examples, the rows they came from).
    """
    examples, good, reasons = [], [], Counter()
    for row in rows:
        out = make(row)
        if isinstance(out, str):
            reasons[out] += 1
        else:
            examples.append(out)
            good.append(row)
    bad = sum(reasons.values())
    if bad:
        log.warning("%s: skipped %d of %d rows: %s", key, bad, len(rows), dict(reasons))
    if not rows or bad / len(rows) > max_bad_fraction:
        common = reasons.most_common(1)[0][0] if reasons else "no rows"
        raise DataError(
            f"{key}: {bad} of {len(rows)} rows are bad (limit {max_bad_fraction:.0%}); commonest problem: {common}; "
            f"all problems: {dict(reasons)}\n  fix: repair the data, or raise data.max_bad_fraction if skipping them is intended"
        )
    return examples, good
