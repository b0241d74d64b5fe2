"""LLM-judge node: asks an OpenAI-compatible chat endpoint to grade a completion against a rubric.

Binary verdicts map PASS/YES/CORRECT to 1.0 and FAIL/NO/INCORRECT to 0.0 (the last such word in
the reply counts); scalar verdicts take the last number in the reply, in [0, scale_max], divided
by scale_max. A reply with no verdict raises VerdictParseError: the sample is masked and counted
(``reward/<node>/parse_failures``), never scored 0. Requests are retried with exponential backoff
on connection errors, timeouts, 429 and 5xx; a rate limit and a concurrency cap protect the
endpoint.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from typing import Any, Literal

import httpx
from posttrain.rewards.errors import RewardConfigError, RewardError, VerdictParseError

from posttrain.types import RewardSample

DEFAULT_RUBRIC = (
    "You are grading an answer.\nQuestion:\n{prompt}\n\nAnswer:\n{completion}\n\n"
    "Is the answer correct and well formed? Reply with one word: PASS or FAIL."
)
_BINARY = re.compile(r"\b(pass|fail|yes|no|incorrect|correct)\b", re.IGNORECASE)
_POSITIVE = {"pass", "yes", "correct"}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JudgeRequestError(RewardError):
    """The judge endpoint failed after all retries, or refused the request (4xx)."""


def parse_verdict(text: str, verdict: Literal["binary", "scalar"], scale_max: float = 10.0) -> float:
    """The reward in a judge's reply; raises VerdictParseError when there is none."""
    if verdict == "binary":
        words = _BINARY.findall(text)
        if not words:
            raise VerdictParseError(f"no PASS/FAIL verdict in judge reply {text[:80]!r}")
        return 1.0 if words[-1].lower() in _POSITIVE else 0.0
    numbers = _NUMBER.findall(text)
    if not numbers or not 0.0 <= float(numbers[-1]) <= scale_max:
        raise VerdictParseError(f"no score in [0, {scale_max:g}] in judge reply {text[:80]!r}")
    return float(numbers[-1]) / scale_max


class _LoopState:
    """Client, concurrency cap and rate-limit clock of one event loop (httpx clients are loop-bound)."""

    def __init__(self, timeout_s: float, max_concurrency: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = httpx.AsyncClient(timeout=timeout_s)
        self.sem = asyncio.Semaphore(max_concurrency)
        self.rate_lock = asyncio.Lock()
        self.next_slot = 0.0


class JudgeReward:
    """Sample-mode reward node calling ``{base_url}/chat/completions``.

    ``rubric`` is formatted with ``prompt``, ``completion`` and the sample's dataset fields.
    ``extra_body`` is merged into each request (e.g. vLLM's ``{"structured_outputs": {"choice":
    ["PASS", "FAIL"]}}``). The API key, if any, is read from the environment variable ``api_key_env``.
    """

    reward_mode = "sample"

    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str = DEFAULT_RUBRIC,
        verdict: Literal["binary", "scalar"] = "binary",
        scale_max: float = 10.0,
        max_tokens: int = 16,
        temperature: float = 0.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        rate_limit_per_s: float | None = None,
        max_concurrency: int = 8,
        request_timeout_s: float = 30.0,
        api_key_env: str = "OPENAI_API_KEY",
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if verdict not in ("binary", "scalar"):
            raise RewardConfigError(f"judge verdict={verdict!r}; use 'binary' or 'scalar'")
        if rate_limit_per_s is not None and rate_limit_per_s <= 0:
            raise RewardConfigError(f"judge rate_limit_per_s must be > 0 or null, got {rate_limit_per_s}")
        if max_retries < 0 or max_concurrency < 1:
            raise RewardConfigError("judge needs max_retries >= 0 and max_concurrency >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.rubric, self.verdict, self.scale_max = model, rubric, verdict, scale_max
        self.max_tokens, self.temperature = max_tokens, temperature
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.rate_limit_per_s, self.max_concurrency = rate_limit_per_s, max_concurrency
        self.request_timeout_s, self.api_key_env = request_timeout_s, api_key_env
        self.extra_body = dict(extra_body or {})
        self._state: _LoopState | None = None
        self.reset_step_metrics()

    def reset_step_metrics(self) -> None:
        """Zero the counters reported by :meth:`step_metrics` (the graph calls this every step)."""
        self._counts = {"requests": 0, "retries": 0, "http_errors": 0, "parse_failures": 0}

    def step_metrics(self) -> dict[str, float]:
        """Counters since the last reset: requests sent, retries, HTTP failures, unparseable replies."""
        return {k: float(v) for k, v in self._counts.items()}

    def _loop_state(self) -> _LoopState:
        if self._state is None or self._state.loop is not asyncio.get_running_loop():
            self._state = _LoopState(self.request_timeout_s, self.max_concurrency)
        return self._state

    async def _wait_rate_slot(self, state: _LoopState) -> None:
        if self.rate_limit_per_s is None:
            return
        async with state.rate_lock:
            now = time.monotonic()
            wait = state.next_slot - now
            state.next_slot = max(now, state.next_slot) + 1.0 / self.rate_limit_per_s
        if wait > 0:
            await asyncio.sleep(wait)

    async def _post(self, body: dict[str, Any]) -> str:
        state = self._loop_state()
        key = os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._counts["retries"] += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            await self._wait_rate_slot(state)
            async with state.sem:
                self._counts["requests"] += 1
                try:
                    resp = await state.client.post(self.url, json=body, headers=headers)
                except httpx.TransportError as exc:  # connection refused, reset, read timeout, ...
                    self._counts["http_errors"] += 1
                    last = f"{type(exc).__name__}: {exc}"
                    continue
            if resp.status_code == 429 or resp.status_code >= 500:
                self._counts["http_errors"] += 1
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                self._counts["http_errors"] += 1
                raise JudgeRequestError(
                    f"judge endpoint {self.url} refused the request (HTTP {resp.status_code}: {resp.text[:200]}); "
                    "check base_url, model and extra_body"
                )
            try:
                return resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeRequestError(
                    f"judge endpoint {self.url} sent no chat completion: {resp.text[:200]}"
                ) from None
        raise JudgeRequestError(
            f"judge endpoint {self.url} failed {self.max_retries + 1} times; last: {last}"
        )

    async def __call__(self, sample: RewardSample) -> float:
        values = {**sample.fields, "prompt": sample.prompt, "completion": sample.completion}
        try:
            content = self.rubric.format_map(values)
        except KeyError as exc:
            raise RewardConfigError(
                f"judge rubric uses {{{exc.args[0]}}}, but the sample has only {sorted(values)}; "
                "fix the rubric or add that dataset field (write literal braces as {{ }})"
            ) from None
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            **self.extra_body,
        }
        reply = await self._post(body)
        try:
            return parse_verdict(reply, self.verdict, self.scale_max)
        except VerdictParseError:
            self._counts["parse_failures"] += 1
            raise
