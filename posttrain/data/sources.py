"""Loading rows from local files, `datasets` sources or synthetic tasks, with bad-row accounting."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

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


# A JSONL line that does not parse becomes a row holding only this key (the reason); build_examples
# skips and counts it like any other bad row, so one broken line does not stop a run.
BAD_LINE = "__posttrain_bad_line__"


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line becomes ``{BAD_LINE: reason}`` (blank lines are skipped)."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.append({BAD_LINE: "malformed JSON line"})
                continue
            rows.append(row if isinstance(row, dict) else {BAD_LINE: "line is not a JSON object"})
    return rows


def load_rows(src: DatasetSource, key: str, fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """All rows of ``src`` as dicts (synthetic rows are generated deterministically from seed).

    ``fields`` (``data.fields``) maps posttrain's field names to the data's columns:
    ``{"response": "completion"}`` reads each row's ``completion`` as its ``response``.
    """
    if src.synthetic is not None:
        return src.synthetic.generate(src.num_examples, src.seed)
    rows = _load_file_rows(src, key)
    if fields:
        rows = [_renamed(row, fields) for row in rows]
    return rows


def _renamed(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    if BAD_LINE in row:
        return row
    out = {k: v for k, v in row.items() if k not in fields.values()}
    out.update({name: row[column] for name, column in fields.items() if column in row})
    return out


def _load_file_rows(src: DatasetSource, key: str) -> list[dict[str, Any]]:
    path = src.path
    if os.path.exists(path):
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in _FORMATS)
        if not files:
            raise DataError(f"{key}.path '{path}' holds no .jsonl/.json/.parquet/.csv files.\n  fix: point it at a data file or folder")
        ext = os.path.splitext(files[0])[1]
        if ext not in _FORMATS:
            raise DataError(f"{key}.path '{path}': unsupported file type '{ext}'.\n  fix: use .jsonl, .json, .parquet or .csv")
        if all(os.path.getsize(f) == 0 for f in files):
            raise DataError(f"{key}.path '{path}' is empty: no rows.\n  fix: point it at a file with one JSON object per line")
        if ext == ".jsonl":
            rows = [r for f in files for r in read_jsonl(f)]
        else:
            rows = _load_with_datasets(_FORMATS[ext], files, path, key)
        if not rows:
            raise DataError(f"{key}.path '{path}' holds no rows.\n  fix: point it at a file with one JSON object per line")
    elif path.startswith(("/", "./", "../", "~")) or path.endswith(tuple(_FORMATS)):
        raise DataError(f"{key}.path: file '{path}' does not exist.\n  fix: check the path (relative paths are from the working directory)")
    else:
        rows = _load_hub_name(path, src.split, key)
    return rows[: src.num_examples] if src.num_examples else rows


def _load_with_datasets(kind: str, files: list[str], path: str, key: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as exc:  # datasets wraps parser errors in several types; the first line says what
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{key}.path '{path}': cannot read it as {kind}: {reason}\n  fix: repair the file, or save it as .jsonl (malformed lines are then skipped and counted)") from None
    return [dict(r) for r in ds]


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) answers a TCP connect within ``timeout_s``;
    False at once when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """datasets / huggingface_hub read their offline switch at import; set it on the modules."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_hub_name(name: str, split: str, key: str) -> list[dict[str, Any]]:
    """A bare name: a dataset in the local `datasets` cache, or on the Hub when it is reachable.
    Offline, only the cache is tried (no minute of retries before the message)."""
    import datasets

    online = hub_reachable()
    try:
        with _hub_offline(not online):
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types; the message is what matters
        where = "the Hub or the local cache" if online else "the local `datasets` cache (the Hugging Face Hub is not reachable from here)"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"{key}.path: '{name}' is not a local file or folder, and dataset '{name}' split '{split}' is not in {where}"
            f"{': ' + first if online else ''}\n"
            "  fix: give the path of a local .jsonl/.json/.parquet/.csv file or folder (a bare name is looked up as a "
            "Hugging Face dataset), or download the dataset on a machine with network and copy it here"
        ) from None
    return [dict(r) for r in ds]


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
        out = row[BAD_LINE] if BAD_LINE in row else make(row)
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
            f"all problems: {dict(reasons)}\n  fix: {fix_for(common, every_row=bad == len(rows))}"
        )
    return examples, good


# Reasons whose fix is a setting, not the data (matched by prefix): skipping more rows would not help.
REASON_FIXES = {
    "over max_length": "raise data.max_length (prompt + response tokens) so the rows fit, or shorten the rows",
    "prompt over rollout.engine.max_model_len": (
        "raise rollout.engine.max_model_len, or lower rollout.sampling.max_tokens, or shorten the prompts"
    ),
}


_OTHER_NAME = re.compile(r"missing field '(\w+)' \(the rows have '(\w+)'\)")
_NOT_TEXT = re.compile(r"field '(\w+)' is (\w+), not text")


def fix_for(reason: str, every_row: bool = False) -> str:
    """The fix for a bad-row reason: a column to map or a type to change; the setting to change
    for a length limit (raising data.max_bad_fraction too, when some rows are good); else repair
    or tolerate."""
    other = _OTHER_NAME.match(reason)
    if other:
        name, column = other.groups()
        return f"map the column to posttrain's name: data.fields={{{name}: {column}}} (on the command line: 'data.fields={{{name}: {column}}}')"
    not_text = _NOT_TEXT.match(reason)
    if not_text:
        name, kind = not_text.groups()
        return (f"write '{name}' as a JSON string in every row (\"{name}\": \"42\", not {kind} 42); "
                "posttrain does not convert it, since the text the model learns must be exactly what you wrote")
    for prefix, fix in REASON_FIXES.items():
        if reason.startswith(prefix):
            return fix if every_row else f"{fix}; or raise data.max_bad_fraction if skipping them is intended"
    return "repair the data, or raise data.max_bad_fraction if skipping them is intended"
