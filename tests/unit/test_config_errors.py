"""Bad input gets one clear message naming the key, the file and the fix, and the right exit code."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.config.loader import load_recipe

RECIPE = "recipes/sft_tiny_arith.yaml"
FAST = ["logging.wandb.enabled=false", "logging.progress=false"]


@pytest.fixture(autouse=True)
def _cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_recipe_loads_with_defaults_filled_in():
    cfg, resolved = load_recipe(RECIPE, ["trainer.optim.lr=1e-4"])
    assert cfg.trainer.optim.lr == pytest.approx(1e-4)
    assert resolved["trainer"]["optim"]["lr"] == pytest.approx(1e-4)
    assert resolved["algorithm"]["_target_"] == "posttrain.offline.sft.SFTConfig"
    assert resolved["checkpoint"]["keep_last"] == 2  # a schema default, not written in the recipe


def test_group_override_selects_another_model():
    cfg, _ = load_recipe(RECIPE, ["model=tiny_llama"])
    assert cfg.model.factory.arch == "llama"


def test_unknown_key_in_override(run_cli):
    code, _, err = run_cli("run", RECIPE, "trainer.learning_rate=1e-4")
    assert code == 2
    assert "trainer.learning_rate" in err and "unknown key" in err
    assert "command-line override" in err and "fix:" in err


def test_unknown_key_in_recipe_file_names_the_file(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(RECIPE).read().replace("run:\n", "run:\n  nmae: typo\n"))
    code, _, err = run_cli("run", str(bad))
    assert code == 2
    assert "run.nmae" in err and str(bad) in err


def test_wrong_type(run_cli):
    code, _, err = run_cli("run", RECIPE, "trainer.max_steps=ten")
    assert code == 2
    assert "trainer.max_steps" in err and "expected an integer" in err


def test_inconsistent_batch_sizes(run_cli):
    code, _, err = run_cli("run", RECIPE, "trainer.global_batch_size=30", "trainer.micro_batch_size=8")
    assert code == 2
    assert "trainer.global_batch_size" in err and "multiple of 8" in err


def test_malformed_override_syntax(run_cli):
    code, _, err = run_cli("run", RECIPE, "trainer.max_steps==[")
    assert code == 2
    assert "override" in err


def test_missing_recipe_file(run_cli):
    code, _, err = run_cli("run", "recipes/does_not_exist.yaml")
    assert code == 2 and "file not found" in err


def test_missing_model_path(run_cli, tmp_path):
    code, _, err = run_cli("run", RECIPE, "model.factory=null", f"model.path={tmp_path}/nope", f"run.output_dir={tmp_path}", *FAST)
    assert code == 4
    assert "does not exist" in err and "model.path" in err


def test_bad_rows_beyond_threshold(run_cli, tmp_path):
    rows = [{"prompt": "1+1=", "response": "2"}] * 6 + [{"prompt": "2+2="}] * 3 + [{"prompt": "3+3=", "response": ""}]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, _, err = run_cli(
        "run", RECIPE, "data.train.synthetic=null", "data.train.num_examples=0", f"data.train.path={data}",
        "data.eval=null", "data.max_bad_fraction=0.2", f"run.output_dir={tmp_path}", *FAST,
    )
    assert code == 3
    assert "4 of 10 rows are bad" in err and "missing field 'response'" in err and "max_bad_fraction" in err


def test_missing_data_file(run_cli, tmp_path):
    code, _, err = run_cli(
        "run", RECIPE, "data.train.synthetic=null", "data.train.num_examples=0", f"data.train.path={tmp_path}/none.jsonl",
        f"run.output_dir={tmp_path}", *FAST,
    )
    assert code == 3 and "does not exist" in err


def test_dry_run_prints_counts_and_starts_nothing(run_cli, tmp_path):
    code, out, _ = run_cli("run", RECIPE, "--dry-run", f"run.output_dir={tmp_path}")
    assert code == 0
    assert "samples_per_step: 64" in out and "optimizer_steps: 250" in out and "tokens_per_step" in out
    assert not os.listdir(tmp_path)


def test_list_items_overridable_by_index():
    """#28.9: `reward.nodes.0.fn=...` changes one node of the recipe's list."""
    cfg, resolved = load_recipe(
        "recipes/grpo_tiny_arith.yaml",
        ["model.factory={arch:llama}", "reward.nodes.0.fn=posttrain.rewards.builtins.math_answer", "reward.nodes.0.weight=0.5"],
    )
    assert cfg.reward.nodes[0].fn == "posttrain.rewards.builtins.math_answer" and cfg.reward.nodes[0].weight == 0.5
    assert resolved["reward"]["nodes"][0]["name"] == "correct"  # the item's other keys kept


@pytest.mark.parametrize("override, needles", [
    ("reward.nodes.3.fn=x", ["key 'reward.nodes.3'", "index 3 is out of range: the list has 1 items", "fix: use an index from 0 to 0"]),
    ("reward.nodes.first.fn=x", ["key 'reward.nodes.first'", "must be an index", "fix: write reward.nodes.0"]),
])  # fmt: skip
def test_bad_list_index_override(run_cli, override, needles):
    code, _, err = run_cli("run", "recipes/grpo_tiny_arith.yaml", "model.factory={arch:llama}", override, "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert all(n in err for n in needles), err


def test_key_of_another_algorithm_says_what_to_do(run_cli):
    """#28.9: DPO's `loss:` in an SFT recipe used to end with "use one of: " and nothing."""
    code, _, err = run_cli("run", RECIPE, "algorithm.loss=sigmoid", "--dry-run")
    assert code == 2 and "SFTConfig takes no keys" in err
    fix = err.split("fix:")[1]
    assert "remove it" in fix and "algorithm._target_=posttrain.offline.dpo.DPOConfig" in fix
