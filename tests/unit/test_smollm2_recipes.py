"""The SmolLM2 recipes load (every key in the schema) and say what the README claims of them.

The checkpoint is not needed: a factory model replaces ``model.path`` on the command line, as a
user would point the recipe at another model. Running them needs the fetch (bench/real_model).
"""

from __future__ import annotations

import pytest

from posttrain.config.loader import load_recipe

RECIPES = ["grpo_smollm2_arith", "grpo_smollm2_arith_lora", "sft_smollm2_arith", "dpo_smollm2_arith"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_holds_out_the_eval_split(name):
    cfg, resolved = load_recipe(f"recipes/{name}.yaml", ["model.factory={arch:llama}"])
    assert cfg.data.train.synthetic.split == "train" and cfg.data.eval.synthetic.split == "eval"
    assert resolved["model"]["path"] is None  # the command line's factory won


@pytest.mark.parametrize("name", ["grpo_smollm2_arith", "grpo_smollm2_arith_lora"])
def test_grpo_recipes_pack_shared_prompts_and_score_the_boxed_answer(name):
    cfg, _ = load_recipe(f"recipes/{name}.yaml", ["model.factory={arch:llama}"])
    assert cfg.trainer.max_tokens_per_micro_batch and cfg.trainer.share_prefix_min_tokens > 0
    fns = [n.fn for n in cfg.reward.nodes]
    assert fns == ["posttrain.rewards.builtins.math_answer", "posttrain.rewards.boxed.boxed_format"]
    assert (cfg.model.lora is not None) == name.endswith("_lora")
