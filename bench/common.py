"""Writing benchmark results in the project's format (bench/results/<name>.json)."""

from __future__ import annotations

import datetime
import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu {os.cpu_count()} cores ({platform.machine()})"


def write_result(
    name: str, baseline: str, value: float, baseline_value: float, unit: str, ratio: float, raw: dict, path: str | None = None
) -> str:
    """Write the result record to ``path`` (default ``bench/results/<name>.json``) and print it."""
    out = {
        "name": name, "device": device_name(), "date": datetime.date.today().isoformat(), "baseline": baseline,
        "value": value, "baseline_value": baseline_value, "unit": unit, "ratio": ratio, "raw": raw,
    }
    if path is None:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return path
