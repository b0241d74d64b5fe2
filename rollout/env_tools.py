"""The code-interpreter tool environment: the policy's programs run in the sandbox.

Tool-call format (documented for users and demonstrations)::

    <tool>print(347*29+158)</tool>          the policy's turn; sampling stops at "</tool>"
    <output>10221</output>                  the observation (loss mask 0)
    10221<|im_end|>                         a turn without a tool call ends the trajectory

An optional first line ``python`` inside the tag is accepted (``<tool>python\\nprint(1)</tool>``).
The program runs in ``posttrain.sandboxes.Sandbox`` (its isolation and limits: sandboxes/README.md)
as a plain execution: its stdout comes back. A program that crashes gives ``error: <last line of
stderr>``, one that hangs ``error: timed out after Xs``, one past its memory ``error: out of
memory``; output past ``max_output_chars`` is cut with ``...[N more chars]`` (a flood). A sandbox
*harness* fault (SANDBOX_ERROR: not the program's doing) raises, which masks the trajectory.

The observation is escaped (:func:`escape_output`): ``&``, ``<`` and ``>`` become ``&amp;``,
``&lt;`` and ``&gt;``, and bracketed control words (``[INST]``) lose their ``[``, so a program
cannot print ``</output>`` to end its own block early, nor ``<|im_end|>`` or another special
token to end the turn (a tokenizer would read the text as the special token itself).

The final answer (a turn without a tool call) is compared with the row's ``answer_field``: reward
part ``correct`` (1.0 or 0.0) on that turn; ``tool_error_penalty`` (if non-zero) is a per-turn
reward part ``tool_error`` on each turn whose program failed.
"""

from __future__ import annotations

import atexit
import re
import threading
from typing import Any

from posttrain.sandboxes import Limits, Sandbox, SandboxConfig
from posttrain.sandboxes.verdict import Status, Verdict

from .env import StepResult

TOOL_CALL = re.compile(r"<tool>(?:python\n)?(.*?)</tool>", re.DOTALL)
_SANDBOXES: dict[tuple, Sandbox] = {}
_LOCK = threading.Lock()


def shared_sandbox(slots: int, wall_s: float, memory_mb: int, output_bytes: int, allow_weaker: bool) -> Sandbox:
    """One sandbox per distinct setting in this process, shared by every trajectory's env."""
    key = (slots, wall_s, memory_mb, output_bytes, allow_weaker)
    with _LOCK:
        if key not in _SANDBOXES:
            limits = Limits(wall_s=wall_s, cpu_s=max(1, int(wall_s) + 1), memory_mb=memory_mb, output_bytes=output_bytes)
            if not _SANDBOXES:
                atexit.register(close_shared_sandboxes)  # slots, cgroups and the uid lease go with the process
            _SANDBOXES[key] = Sandbox(SandboxConfig(slots=slots, limits=limits, allow_weaker=allow_weaker,
                                                    cgroup_name="posttrain-tool-sandbox"))  # fmt: skip
        return _SANDBOXES[key]


def close_shared_sandboxes() -> None:
    with _LOCK:
        for box in _SANDBOXES.values():
            box.close()
        _SANDBOXES.clear()


def tool_call(action: str) -> str | None:
    """The program of the last complete tool call in ``action``, else None."""
    calls = TOOL_CALL.findall(action)
    return calls[-1] if calls else None


def cap(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters; a longer one is cut, ending ``...[N more chars]``."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(f"...[{len(text)} more chars]"))
    return f"{text[:keep]}...[{len(text) - keep} more chars]"


_CONTROL_WORD = re.compile(r"\[(/?[A-Z][A-Z_]+\])")


def escape_output(text: str) -> str:
    """Program output made inert inside ``<output>...</output>``: no tag, no ``<|...|>`` or
    ``<s>``-style special token, no ``[INST]``-style control word survives as such."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _CONTROL_WORD.sub(r"&#91;\1", text)


def observation_of(verdict: Verdict, wall_s: float, max_chars: int) -> tuple[str, bool]:
    """(observation body, program failed) for a sandbox verdict; raises on a harness fault."""
    if verdict.status is Status.SANDBOX_ERROR:
        raise RuntimeError(f"sandbox harness error (not the program's): {verdict.detail}")
    if verdict.status is Status.TIMEOUT:
        return f"error: timed out after {wall_s:g}s", True
    if verdict.status is Status.OOM:
        return "error: out of memory", True
    if verdict.status is Status.FAIL:
        lines = [line for line in verdict.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else verdict.detail or "exited with an error"
        return cap(f"error: {escape_output(last)}", max_chars), True
    return cap(escape_output(verdict.stdout.rstrip("\n")), max_chars), False


class CodeToolEnv:
    """A Python interpreter tool (run in the sandbox) plus a final-answer check.

    Args:
        answer_field: the row field the final answer must equal ("" : no ``correct`` reward).
        wall_s / memory_mb: per tool call limits in the sandbox.
        max_output_chars: an observation's body at most (then cut, saying so).
        slots: concurrent tool calls (sandbox slots, shared by all trajectories of the process).
        tool_error_penalty: reward part ``tool_error`` on a turn whose program failed (0: none).
        end_on_tool_error: end the trajectory at a failed program instead of going on.
        allow_weaker: serve even when an optional sandbox layer is unavailable (see sandboxes/).
    """

    def __init__(self, answer_field: str = "answer", wall_s: float = 2.0, memory_mb: int = 256, max_output_chars: int = 48,
                 slots: int = 2, tool_error_penalty: float = 0.0, end_on_tool_error: bool = False,
                 allow_weaker: bool = False) -> None:  # fmt: skip
        self.answer_field, self.wall_s, self.memory_mb, self.max_output_chars = answer_field, wall_s, memory_mb, max_output_chars
        self.slots, self.tool_error_penalty, self.end_on_tool_error = slots, tool_error_penalty, end_on_tool_error
        self.allow_weaker = allow_weaker
        self.row: dict[str, Any] = {}

    async def reset(self, row: dict[str, Any]) -> str:
        self.row = row
        return ""

    async def run_tool(self, program: str) -> tuple[str, bool]:
        box = shared_sandbox(self.slots, self.wall_s, self.memory_mb, 4 * self.max_output_chars + 1024, self.allow_weaker)
        return observation_of(await box.arun(program), self.wall_s, self.max_output_chars)

    async def step(self, action: str) -> StepResult:
        program = tool_call(action)
        if program is None:
            return StepResult(rewards=self.final_rewards(action), done=True)
        body, failed = await self.run_tool(program)
        rewards = {"tool_error": self.tool_error_penalty} if failed and self.tool_error_penalty else {}
        info = {"tool_calls": 1.0, "tool_errors": float(failed)}
        return StepResult(f"<output>{body}</output>", rewards, failed and self.end_on_tool_error, info)

    def final_rewards(self, action: str) -> dict[str, float]:
        if not self.answer_field or self.answer_field not in self.row:
            return {}
        return {"correct": float(final_answer(action) == str(self.row[self.answer_field]).strip())}


def final_answer(action: str) -> str:
    """The answer in a final turn: its text before the first newline or end-of-turn marker."""
    for stop in ("<|im_end|>", "<|endoftext|>", "\n"):
        action = action.split(stop, 1)[0]
    return action.strip()
