from __future__ import annotations

import pytest

from posttrain.data.formatting import make_sft_example
from posttrain.data.sampler import ResumableSampler
from posttrain.data.tasks import ArithmeticTask, CountdownTask, eval_expression
from posttrain.models.tokenizer import build_char_tokenizer


def test_arithmetic_rows_are_correct_and_deterministic():
    task = ArithmeticTask(digits=3, ops="+-*")
    rows = task.generate(50, seed=3)
    assert rows == task.generate(50, seed=3)
    for r in rows:
        a, op, b = r["prompt"][:3], r["prompt"][3], r["prompt"][4:7]
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert task.is_correct(r, r["answer"] + "<|im_end|>")
        assert not task.is_correct(r, r["rejected"])


def test_countdown_solutions_check_and_cheats_fail():
    task = CountdownTask(num_numbers=3, max_number=9)
    for r in task.generate(50, seed=0):
        assert task.is_correct(r, r["response"])
    assert eval_expression("3*5+7", [3, 5, 7]) == 22
    assert eval_expression("3*3", [3, 5]) is None  # reuse
    assert eval_expression("__import__('os')", [1]) is None
    assert eval_expression("8+1", [3, 5]) is None  # number not given


def test_sft_example_masks_the_prompt():
    tok = build_char_tokenizer()
    ex = make_sft_example(tok, {"prompt": "1+2=", "response": "3"}, max_length=64)
    assert sum(ex.loss_mask) == 2  # "3" and the end-of-turn token
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=False) if m]) == "3<|im_end|>"
    assert make_sft_example(tok, {"prompt": "1+2=", "response": "3"}, max_length=10) == "over max_length"


def test_tool_demonstration_trains_the_policy_turns_not_the_tool_output():
    from posttrain.data.formatting import sft_row_problem
    from posttrain.data.tasks import ToolArithmeticTask

    tok = build_char_tokenizer()
    row = ToolArithmeticTask().generate(1, seed=0)[0]
    assert sft_row_problem(row) is None
    ex = make_sft_example(tok, row, max_length=512)
    plain = make_sft_example(tok, {"prompt": row["prompt"], "response": row["response"]}, max_length=512)
    assert ex.input_ids == plain.input_ids  # the same tokens, only the targets differ
    trained = "".join(tok.decode([t]) for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m)
    output = f"<output>{row['answer']}</output>"
    assert output in row["response"] and output not in trained
    assert trained.startswith("<tool>print(") and trained.endswith(row["answer"] + tok.eos_token)
    assert sum(ex.loss_mask) == sum(plain.loss_mask) - len(output)
    broken = {**row, "response_parts": [{"text": "<tool>x</tool>", "train": True}]}
    assert sft_row_problem(broken) == "response_parts do not join to the response"


@pytest.mark.parametrize("split", [3, 7, 10, 13])
def test_sampler_resume_equals_straight_run_across_epochs(split):
    straight = ResumableSampler(5, seed=1)
    ref = straight.take(20)
    first = ResumableSampler(5, seed=1)
    head = first.take(split)
    resumed = ResumableSampler(5, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(20 - split) == ref
    assert sorted(ref[:5]) == list(range(5)) and ref[:5] != ref[5:10]  # each epoch a new permutation


def test_rl_prompts_over_the_engine_room_are_bad_rows():
    from posttrain.rl.prompts import prompt_records

    tok = build_char_tokenizer()
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+" * 20 + "1=", "answer": "21"}, {"prompt": "2+2="}]
    short = len(prompt_records(rows[:1], tok, "k", 0.0)[0].token_ids)  # "1+1=" in the chat template
    records = prompt_records(rows, tok, "data.train", max_bad_fraction=0.5, max_prompt_tokens=short)
    assert [r.fields for r in records] == [{"answer": "2"}, {}] and [r.ordinal for r in records] == [0, 1]
    assert all(len(r.token_ids) == short for r in records)
    assert len(prompt_records(rows, tok, "data.train", max_bad_fraction=0.5)) == 3  # no limit: all kept


def test_prompt_template_and_chat_template_set_the_format(tmp_path):
    from types import SimpleNamespace

    from posttrain.config.errors import ModelLoadError
    from posttrain.data.templates import apply_templates

    tok = build_char_tokenizer()
    tok.chat_template = None  # a base model's tokenizer
    with pytest.raises(ModelLoadError, match="no chat template"):
        apply_templates(tok, SimpleNamespace(prompt_template=None, chat_template=None))
    apply_templates(tok, SimpleNamespace(prompt_template="Q: {prompt}\nA: ", chat_template=None))
    ex = make_sft_example(tok, {"prompt": "1+2=", "response": "3"}, max_length=64)
    assert tok.decode(ex.input_ids) == "Q: 1+2=\nA: 3<|im_end|>"
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]) == "3<|im_end|>"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    apply_templates(tok, SimpleNamespace(prompt_template=None, chat_template=str(jinja)))
    assert tok.decode(make_sft_example(tok, {"prompt": "1+2=", "response": "3"}, 64).input_ids) == "[1+2=]3<|im_end|>"
