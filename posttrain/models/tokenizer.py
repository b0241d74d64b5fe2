"""A character-level tokenizer defined in code, with a chat template.

Nothing can be downloaded on the machines posttrain is tested on, so tests and demos build their
tokenizer here. It is a real `tokenizers` WordLevel tokenizer wrapped in
`PreTrainedTokenizerFast`, so it saves to a Hugging Face directory that transformers and vLLM
load like any other (tokenizer.json + tokenizer_config.json with the chat template).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, "<|endoftext|>"]
# Printable ASCII plus newline: enough for arithmetic, countdown, code and chat markup.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Return a character-level fast tokenizer (vocab: 5 special tokens + 96 characters)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One token per character; special tokens are matched before this split runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=["<|endoftext|>"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
