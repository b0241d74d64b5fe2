"""Which text format turns a row into model input: the tokenizer's chat template, a recipe's.

Every row (SFT ``prompt``/``response`` or ``messages``, DPO pairs, RL prompts) is a chat turn,
rendered by the tokenizer's chat template. A tokenizer without one (a base model's) used to get
the prompt and the response glued together with no separator, silently. Now the recipe must say
which format it wants, or the run stops before it starts (exit 4):

- ``data.chat_template``: a Jinja chat template (the text, or the path of a ``.jinja`` file),
  set on the tokenizer in place of its own;
- ``data.prompt_template``: plain text with one ``{prompt}``, e.g. ``"Question: {prompt}\\nAnswer: "``;
  each user turn is rendered through it and the response follows it directly (``"{prompt}"``
  keeps the raw prompt, as for a base model trained on ``"1+2="``-style text).

:func:`apply_templates` is called wherever a run loads its tokenizer (preflight, the offline
runner, the RL controller), so every stage sees the same format.
"""

from __future__ import annotations

import json
import os
from typing import Any

from posttrain.config.errors import ConfigError, ModelLoadError


def plain_chat_template(prompt_template: str) -> str:
    """A Jinja chat template that renders each user turn through ``prompt_template`` (one
    ``{prompt}``), a system turn as its text and a blank line, and an assistant turn as is."""
    before, after = prompt_template.split("{prompt}", 1)
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ " + json.dumps(before) + " + m['content'] + " + json.dumps(after) + " }}"
        "{% elif m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )


def _read_chat_template(value: str) -> str:
    if "{%" in value or "{{" in value:
        return value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    raise ConfigError(
        "data.chat_template", "recipe", f"'{value}' is neither a Jinja template nor an existing file",
        "give the template's text ({% for message in messages %}...) or the path of a .jinja file",
    )


def apply_templates(tokenizer: Any, data_cfg: Any, model_where: str = "the model") -> Any:
    """Set the recipe's template on ``tokenizer`` (returned), or raise ModelLoadError when the
    tokenizer has none and the recipe names none."""
    chat = getattr(data_cfg, "chat_template", None)
    plain = getattr(data_cfg, "prompt_template", None)
    if chat is not None:
        tokenizer.chat_template = _read_chat_template(chat)
    elif plain is not None:
        tokenizer.chat_template = plain_chat_template(plain)
    elif not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{model_where}: its tokenizer has no chat template, so each prompt and its response would be "
            "joined with no separator (the model could not tell where the answer starts).\n"
            "  fix: set data.prompt_template (plain text with {prompt}, e.g. "
            "data.prompt_template='Question: {prompt}\\nAnswer: ', or '{prompt}' for raw text), or "
            "data.chat_template (a Jinja chat template or the path of a .jinja file), or use a checkpoint "
            "whose tokenizer_config.json carries a chat_template"
        )
    return tokenizer
