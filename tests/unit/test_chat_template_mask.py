"""The SFT loss mask covers exactly the assistant's tokens under a real chat template.

The template is SmolLM2-Instruct's (it inserts a default system prompt when the conversation has
none), on the project's in-code character tokenizer, so the test runs in CI without the download;
the same checks run on the fetched SmolLM2 tokenizer (49k BPE) when it is present, else skip with
the fetch command. Rows come from the word-problem task the SmolLM2 recipes train on.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

from posttrain.data.formatting import make_pair_example, make_sft_example
from posttrain.data.word_problems import WordProblemTask
from posttrain.models.tokenizer import build_char_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench", "real_model"))
from fetch_smollm2 import checkpoint_path, skip_reason  # noqa: E402

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat template, as its tokenizer carries it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM"


def char_tokenizer():
    tok = build_char_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def smollm2_tokenizer():
    path = checkpoint_path()
    if path is None:
        pytest.skip(skip_reason())
    return _load_smollm2(path)


@functools.cache
def _load_smollm2(path: str):  # loaded once for both tests (tens of seconds on a busy machine)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


TOKENIZERS = [pytest.param(char_tokenizer, id="char+smollm2-template"), pytest.param(smollm2_tokenizer, id="smollm2")]
ROWS = WordProblemTask().generate(6, seed=0) + WordProblemTask(system="You are a careful math tutor.").generate(6, seed=1)


def conversation(row):
    return row.get("messages") or [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


@pytest.mark.parametrize("make_tok", TOKENIZERS)
def test_sft_mask_is_exactly_the_assistant_turn(make_tok):
    """For each row: the targets decode to the assistant's content plus its end-of-turn token, and
    nothing else; they are the sequence's tail; the sequence is token for token the template's
    rendering of the whole conversation (up to the final newline the template adds after the turn),
    and the system prompt (the row's, or the template's default) is in the masked prompt."""
    tok = make_tok()
    for row in ROWS:
        ex = make_sft_example(tok, row, max_length=4096)
        assert not isinstance(ex, str)
        mask = ex.loss_mask
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(mask) - start), "targets must be one contiguous tail"
        assert tok.decode(ex.input_ids[start:]) == row["response"] + tok.eos_token
        rendered = tok(tok.apply_chat_template(conversation(row), tokenize=False), add_special_tokens=False)["input_ids"]
        assert rendered[: len(ex.input_ids)] == ex.input_ids and tok.decode(rendered[len(ex.input_ids):]) == "\n"
        prompt = tok.decode(ex.input_ids[:start])
        system = row["messages"][0]["content"] if "messages" in row else DEFAULT_SYSTEM
        assert system in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("make_tok", TOKENIZERS)
def test_dpo_pair_masks_only_the_responses(make_tok):
    """DPO's chosen and rejected share the templated prompt (masked) and differ only in targets."""
    tok = make_tok()
    for row in ROWS[:6]:
        pair = make_pair_example(tok, row, max_length=4096)
        for ex, text in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            start = ex.loss_mask.index(1)
            assert tok.decode(ex.input_ids[start:]) == text + tok.eos_token
        assert pair.chosen.input_ids[: pair.chosen.loss_mask.index(1)] == pair.rejected.input_ids[: pair.rejected.loss_mask.index(1)]
