from __future__ import annotations

import json


def test_rewards_show_and_try(run_cli, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    code, out, _ = run_cli("rewards", "show", "recipes/grpo_tiny_arith.yaml", "--out", str(tmp_path / "g.png"))
    assert code == 0 and "exact_answer" in out and (tmp_path / "g.png").stat().st_size > 1000
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "12+3=", "completion": "15", "answer": "15"}, {"prompt": "12+3=", "completion": "16", "answer": "15"}]))
    code, out, _ = run_cli("rewards", "try", "recipes/grpo_tiny_arith.yaml", "--input", str(data))
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("reward=1.0") and lines[1].startswith("reward=0.0")


def test_rewards_try_bad_input(run_cli, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    code, _, err = run_cli("rewards", "try", "recipes/grpo_tiny_arith.yaml", "--input", str(tmp_path / "none.jsonl"))
    assert code == 3 and "does not exist" in err
    code, _, err = run_cli("rewards", "show", "recipes/sft_tiny_arith.yaml")
    assert code == 2 and "no reward graph" in err
