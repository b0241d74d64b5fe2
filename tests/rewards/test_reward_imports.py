"""Import rule: posttrain.rewards imports only posttrain.types, posttrain.models, posttrain.sandboxes and the
shared user-error base (posttrain.config.errors: every user-facing error is a PosttrainError)."""

from __future__ import annotations

import ast
from pathlib import Path

ALLOWED = ("posttrain.rewards", "posttrain.types", "posttrain.models", "posttrain.sandboxes", "posttrain.config.errors")
REWARDS = Path(__file__).resolve().parents[2] / "rewards"


def test_rewards_import_only_shared_types_models_and_sandboxes() -> None:
    offenders = []
    for path in sorted(REWARDS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in (
                    "posttrain",
                    "rollout",
                    "rewards",
                    "sandboxes",
                ) and not name.startswith(ALLOWED):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
    assert len(list(REWARDS.glob("*.py"))) > 10  # the scan saw the package
