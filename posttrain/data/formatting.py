"""Turning rows into token ids: SFT examples (prompt masked), preference pairs, RL prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def prompt_text(tokenizer, row: dict[str, Any]) -> str:
    """The prompt as the model sees it: the chat template with a generation prompt when the
    tokenizer has one, the raw prompt otherwise."""
    messages = row.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        messages = [m for m in messages[:-1]]  # all turns before the final assistant turn
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] for m in messages)


def response_text(tokenizer, response: str) -> str:
    """A response followed by the end-of-turn token (so the model learns to stop)."""
    return response + (tokenizer.eos_token or "")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Columns other tools use for posttrain's fields (TRL: prompt/completion; Alpaca: instruction/output):
# a row that has one of these instead is told how to map it (data.fields), not "missing field".
OTHER_NAMES = {
    "prompt": ("question", "instruction", "query", "input"),
    "response": ("completion", "output", "answer", "target"),
    "chosen": ("chosen_response", "preferred"),
    "rejected": ("rejected_response", "dispreferred"),
}


def text_field_problem(row: dict[str, Any], name: str) -> str | None:
    """Why ``row[name]`` is not usable text (None when it is). The reason names the column to map
    (``missing field 'response' (the rows have 'completion')``) or the type found
    (``field 'response' is int, not text``): :func:`posttrain.data.sources.fix_for` turns it into the fix."""
    value = row.get(name)
    if isinstance(value, str):
        return None
    if value is None:
        other = next((o for o in OTHER_NAMES.get(name, ()) if isinstance(row.get(o), str)), None)
        return f"missing field '{name}' (the rows have '{other}')" if other else f"missing field '{name}'"
    return f"field '{name}' is {type(value).__name__}, not text"


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on response tokens (the targets that count)


def sft_row_problem(row: dict[str, Any]) -> str | None:
    parts = row.get("response_parts")
    if parts is not None:
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            return "response_parts must be a list of {text, train} objects"
        if "".join(p["text"] for p in parts) != row.get("response"):
            return "response_parts do not join to the response"
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
            return "messages must end with an assistant turn"
        return None if str(msgs[-1].get("content", "")).strip() else "empty response"
    problem = text_field_problem(row, "prompt") or text_field_problem(row, "response")
    if problem:
        return problem
    return None if row["response"].strip() else "empty response"


def make_sft_example(tokenizer, row: dict[str, Any], max_length: int) -> SFTExample | str:
    """Tokenised example, or a reason string when the row is over-length.

    A row may split its response into ``response_parts``: ``[{"text": ..., "train": bool}, ...]``
    joining to ``response``. Each part is encoded on its own (as a multi-turn rollout encodes each
    turn) and only the parts with ``train`` true are targets: a tool-use demonstration trains the
    policy's turns and not the tool's output, as RL's loss mask does."""
    p = encode(tokenizer, prompt_text(tokenizer, row))
    if row.get("response_parts"):
        r, m = [], []
        for part in row["response_parts"]:
            ids = encode(tokenizer, part["text"])
            r, m = r + ids, m + [int(bool(part.get("train", True)))] * len(ids)
        eos = encode(tokenizer, response_text(tokenizer, ""))
        r, m = r + eos, m + [1] * len(eos)
    else:
        response = row["messages"][-1]["content"] if row.get("messages") else row["response"]
        r = encode(tokenizer, response_text(tokenizer, response))
        m = [1] * len(r)
    if len(p) + len(r) > max_length:
        return "over max_length"
    return SFTExample(p + r, [0] * len(p) + m)


@dataclass
class PairExample:
    chosen: SFTExample
    rejected: SFTExample


def pair_row_problem(row: dict[str, Any]) -> str | None:
    for f in ("prompt", "chosen", "rejected"):
        problem = text_field_problem(row, f)
        if problem:
            return problem
    if not row["chosen"].strip() or not row["rejected"].strip():
        return "empty response"
    return None


def make_pair_example(tokenizer, row: dict[str, Any], max_length: int) -> PairExample | str:
    c = make_sft_example(tokenizer, {"prompt": row["prompt"], "response": row["chosen"]}, max_length)
    r = make_sft_example(tokenizer, {"prompt": row["prompt"], "response": row["rejected"]}, max_length)
    if isinstance(c, str) or isinstance(r, str):
        return "over max_length"
    return PairExample(c, r)


def rl_row_problem(row: dict[str, Any]) -> str | None:
    if row.get("messages"):
        return None
    return text_field_problem(row, "prompt")


# The reason a prompt the rollout engine cannot take is skipped for (a bad row, counted).
OVER_ENGINE_LIMIT = "prompt over rollout.engine.max_model_len - rollout.sampling.max_tokens"


def make_rl_prompt(tokenizer, row: dict[str, Any], max_prompt_tokens: int | None = None) -> tuple[str, list[int]] | str:
    """(prompt text, its token ids) of an RL row, or the reason it is a bad row.

    ``max_prompt_tokens``: the engine's room for a prompt, ``max_model_len - max_tokens``; a longer
    prompt would be refused by the engine mid-run (vLLM raises), so it is skipped here and counted.
    """
    problem = rl_row_problem(row)
    if problem:
        return problem
    text = prompt_text(tokenizer, row)
    ids = encode(tokenizer, text)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return f"{OVER_ENGINE_LIMIT} ({max_prompt_tokens} tokens)"
    return text, ids


def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. Returns input_ids_BT, attention_mask_BT, loss_mask_BT
    where loss_mask_BT[b, t] = 1 when token t is a target (its logprob comes from position t-1)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    lmask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for b, (s, m) in enumerate(zip(seqs, masks, strict=False)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        lmask[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
    lmask[:, 0] = 0  # token 0 has no prediction
    return {"input_ids_BT": ids, "attention_mask_BT": attn, "loss_mask_BT": lmask}
