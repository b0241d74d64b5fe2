"""Every ``posttrain ...`` command in README.md runs: ``run`` and ``submit`` as ``--dry-run`` (a full
run is too long for a unit test), the others as written, in a scratch directory holding what the
README assumes exists (the SFT demo's export and metrics, a completions file)."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from posttrain.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme_commands() -> list[str]:
    """``posttrain ...`` commands of the README's bash blocks (``a && b`` gives two; comments dropped)."""
    text = open(os.path.join(REPO, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                part = part.strip()
                if part.startswith("posttrain "):
                    commands.append(part)
    return commands


def test_the_readme_has_commands_to_check():
    names = {shlex.split(c)[1] for c in readme_commands()}
    assert {"run", "submit", "plot", "rewards"} <= names


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory laid out as after the SFT runs: runs/sft_tiny_{arith,code}/hf, the arith metrics
    (and models/Qwen2.5-1.5B-Instruct, the GPU recipe's checkpoint)."""
    from posttrain.models.factory import TinyModelSpec, save_tiny_model

    root = tmp_path_factory.mktemp("readme")
    os.symlink(os.path.join(REPO, "recipes"), root / "recipes")
    for sft in ("sft_tiny_arith", "sft_tiny_code"):  # the exports the RL and DPO commands start from
        save_tiny_model(TinyModelSpec(), str(root / "runs" / sft / "hf"))
    # the GPU recipe's local checkpoint (a 1.5B download in real use): a tiny stand-in for --dry-run
    save_tiny_model(TinyModelSpec(), str(root / "models" / "Qwen2.5-1.5B-Instruct"))
    (root / "runs" / "sft_tiny_arith" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "eval/accuracy": s / 10}) for s in range(5))
    )
    (root / "completions.jsonl").write_text(json.dumps({"prompt": "12+3=", "completion": "15", "answer": "15"}) + "\n")
    return root


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, workspace, monkeypatch, capsys):
    argv = shlex.split(command)[1:]
    monkeypatch.chdir(REPO if argv[0] == "submit" else workspace)  # a job carries the checkout it is run from
    if argv[0] in ("run", "submit") and "--dry-run" not in argv:
        argv.append("--dry-run")
    if argv[0] == "submit":
        argv = [a for a in argv if a != "--wait"]
        for name in [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--env"]:
            monkeypatch.setenv(name, "dummy-secret")  # the README's user exported it
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's own actions (--version) exit
        code = done.code
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert not os.path.exists(workspace / "runs" / "sft_tiny_arith-1")  # a dry run starts nothing
