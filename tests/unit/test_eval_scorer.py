"""eval/accuracy on file data is scored like the reward (posttrain/rl/evaluation.py).

The recipe is the GRPO demo with a boxed-answer eval file and a ``math_answer`` reward graph, loaded
by the real config loader; prompts go through the real prompt pipeline with the tiny model's
tokenizer. Only generation is scripted (the greedy completions a policy might write), so the
scoring path is what is tested, in milliseconds.
"""

from __future__ import annotations

import json

import pytest
from posttrain.rewards.config import build_reward_graph

from posttrain.config.errors import ConfigError
from posttrain.config.loader import load_recipe
from posttrain.data.sources import load_rows
from posttrain.models.loading import load_tokenizer
from posttrain.rl.evaluation import Evaluator, eval_scorer
from posttrain.rl.prompts import prompt_records
from posttrain.types import Completion, Group

GRPO = "recipes/grpo_tiny_arith.yaml"
SFT = "recipes/sft_tiny_arith.yaml"
ROWS = [  # (a, b): the eval file's questions; answers a + b
    (51, 88), (17, 48), (30, 12), (9, 90),
]
# What the policy "writes" greedily for each row: right & boxed, right in a sentence, wrong & boxed, boxed right.
COMPLETIONS = ["The sum is \\boxed{139}.", "17 + 48 = 65", "\\boxed{41}", "\\boxed{99}"]
MATH = "{name: correct, fn: posttrain.rewards.builtins.math_answer}"


@pytest.fixture()
def eval_file(tmp_path):
    path = tmp_path / "boxed.jsonl"
    with open(path, "w") as f:
        for a, b in ROWS:
            f.write(json.dumps({"prompt": f"What is {a} + {b}? Put the final answer in \\boxed{{}}.", "answer": str(a + b)}) + "\n")
    return str(path)


def scripted_generate(prompts, sampling):
    """Greedy 'generation': the scripted completion of each eval row, in order."""
    assert sampling.temperature == 0.0 and sampling.n == 1
    return [
        Group(p, [Completion(p, 0, [1] * len(COMPLETIONS[i]), COMPLETIONS[i], [0.0] * len(COMPLETIONS[i]),
                             [0] * len(COMPLETIONS[i]), "stop")])  # fmt: skip
        for i, p in enumerate(prompts)
    ]


def evaluate(overrides: list[str]) -> dict[str, float]:
    """Load the recipe with ``overrides``, build eval exactly as the controller does, run it once."""
    cfg, _ = load_recipe(GRPO, ["model.factory={arch:llama}", *overrides])
    tok = load_tokenizer(cfg.model)
    held_out = prompt_records(load_rows(cfg.data.eval, "data.eval"), tok, "data.eval", cfg.data.max_bad_fraction)
    assert len(held_out) == len(ROWS)
    graph = build_reward_graph(cfg.reward) if cfg.reward.nodes else None
    scorer = eval_scorer(cfg.eval, cfg.data.eval, graph, build_reward_graph)
    return Evaluator(held_out, scorer, scripted_generate, cfg.eval.max_new_tokens, 0, 1)()


def test_file_eval_uses_the_reward_graph(eval_file):
    """math_answer reads the final answer: rows 0 and 1 are right (boxed, and '= 65' as the last
    number), row 2 is wrong, row 3 is right. Exact match of the first line (the old scorer) gave 0.0."""
    out = evaluate([f"data.eval.path={eval_file}", f"reward.nodes=[{MATH}]"])
    assert out["eval/accuracy"] == pytest.approx(3 / 4)
    assert out["eval/reward"] == pytest.approx(3 / 4)


def test_pass_reward_is_full_credit_of_the_graph(eval_file):
    """A format node worth 0.5 next to math_answer: only completions that reach eval.pass_reward
    (1.0 by default) count, so the format credit alone never makes an answer 'correct'."""
    fmt = "{name: fmt, fn: posttrain.rewards.builtins.format_reward, weight: 0.5}"
    out = evaluate([f"data.eval.path={eval_file}", f"reward.nodes=[{MATH},{fmt}]"])
    assert out["eval/accuracy"] == pytest.approx(3 / 4)
    strict = evaluate([f"data.eval.path={eval_file}", f"reward.nodes=[{MATH},{fmt}]", "eval.pass_reward=1.5"])
    assert strict["eval/accuracy"] == 0.0  # no completion is in <answer> tags: none reaches 1.5


def test_explicit_scorer_overrides_the_graph(eval_file):
    """eval.scorer scores eval alone: an exact-answer scorer accepts none of the four completions
    (each first line is more than the number) though the graph's math_answer accepts three."""
    exact = "{name: exact, fn: posttrain.rewards.builtins.exact_answer}"
    out = evaluate([f"data.eval.path={eval_file}", f"reward.nodes=[{MATH}]", f"eval.scorer={exact}"])
    assert out["eval/accuracy"] == 0.0


def test_synthetic_eval_keeps_the_task_checker():
    """A synthetic task knows its answers: its checker still scores, whatever the graph (the
    scripted completions are not the first-line answers the arithmetic task expects)."""
    cfg, _ = load_recipe(GRPO, ["model.factory={arch:llama}", f"reward.nodes=[{MATH}]"])
    scorer = eval_scorer(cfg.eval, cfg.data.eval, build_reward_graph(cfg.reward), build_reward_graph)
    assert type(scorer).__name__ == "CheckerScorer"
    assert scorer.checker == cfg.data.eval.synthetic.is_correct


def test_scorer_on_an_offline_recipe_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_recipe(SFT, ["eval.scorer={name: c, fn: posttrain.rewards.builtins.math_answer}"])
    assert err.value.key == "eval.scorer" and "online-RL recipes only" in str(err.value)
