"""Judge node against a small local HTTP server (started here, on 127.0.0.1) with canned replies."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from posttrain.rewards import RewardConfigError, RewardGraph, RewardNode, VerdictParseError
from posttrain.rewards.judge import JudgeRequestError, JudgeReward, parse_verdict

from posttrain.types import RewardSample


class CannedServer:
    """Replies ``respond(body)`` if set, else pops one (status, content) from ``script`` (default PASS).

    Records request bodies and the peak number of requests in flight.
    """

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.respond: Callable[[dict], tuple[int, str]] | None = None
        self.bodies: list[dict] = []
        self.delay_s = 0.0
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.in_flight += 1
                    outer.peak = max(outer.peak, outer.in_flight)
                    if outer.respond is not None:
                        status, content = outer.respond(body)
                    else:
                        status, content = outer.script.pop(0) if outer.script else (200, "PASS")
                time.sleep(outer.delay_s)
                with outer.lock:
                    outer.in_flight -= 1
                payload = (
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    if status == 200
                    else {"error": content}
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[CannedServer]:
    srv = CannedServer()
    yield srv
    srv.httpd.shutdown()


def test_parse_verdict() -> None:
    assert parse_verdict("PASS", "binary") == 1.0
    assert parse_verdict("Looks wrong. Verdict: incorrect", "binary") == 0.0
    assert parse_verdict("no... actually yes", "binary") == 1.0
    assert parse_verdict("Score: 7/10", "scalar") == 1.0  # last number: 10
    assert parse_verdict("score 7", "scalar") == pytest.approx(0.7)
    for text, kind in (("maybe", "binary"), ("zzz", "scalar"), ("score 42", "scalar")):
        with pytest.raises(VerdictParseError):
            parse_verdict(text, kind)


def test_verdicts_retries_and_parse_failures(server: CannedServer, group_of) -> None:
    failed_once: set[str] = set()

    def respond(body: dict) -> tuple[int, str]:
        text = body["messages"][0]["content"]
        if "A 94" in text:
            if text not in failed_once:  # the first request for this sample hits a server error
                failed_once.add(text)
                return 503, "overloaded"
            return 200, "FAIL"
        return 200, "hmm, unsure" if "A x" in text else "PASS"

    server.respond = respond
    judge = JudgeReward(
        server.url, "judge", rubric="Q {prompt} A {completion} ({answer})", backoff_s=0.01, max_concurrency=1
    )
    graph = RewardGraph([RewardNode("judge", judge)], max_failed_fraction=0.5)
    [scored], metrics = graph.score_groups_sync([group_of("37+58?", ["95", "94", "x"], answer="95")])
    assert scored.rewards == [1.0, 0.0, None]  # the unparseable verdict is masked, not 0
    assert metrics["reward/judge/requests"] == 4.0 and metrics["reward/judge/retries"] == 1.0
    assert metrics["reward/judge/parse_failures"] == 1.0 and metrics["reward/judge/errors"] == 1.0
    assert "Q 37+58? A 95 (95)" in [b["messages"][0]["content"] for b in server.bodies]
    assert all(b["model"] == "judge" for b in server.bodies)


def test_rubric_placeholder_error_names_the_field() -> None:
    judge = JudgeReward("http://127.0.0.1:9/v1", "judge", rubric="{prompt} {reference}")
    with pytest.raises(
        RewardConfigError,
        match=r"uses \{reference\}, but the sample has only \['answer', 'completion', 'prompt'\]",
    ):
        asyncio.run(judge(RewardSample("p", "c", {"answer": "1"})))


def test_client_errors_are_not_retried_and_server_errors_give_up(server: CannedServer) -> None:

    judge = JudgeReward(server.url, "judge", max_retries=2, backoff_s=0.01)
    server.script = [(404, "model not found")]
    with pytest.raises(JudgeRequestError, match="HTTP 404.*check base_url"):
        asyncio.run(judge(RewardSample("p", "c")))
    assert len(server.bodies) == 1
    server.script = [(500, "boom")] * 3
    with pytest.raises(JudgeRequestError, match="failed 3 times; last: HTTP 500"):
        asyncio.run(judge(RewardSample("p", "c")))
    assert len(server.bodies) == 4
    dead = JudgeReward("http://127.0.0.1:9/v1", "judge", max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeRequestError, match="ConnectError"):
        asyncio.run(dead(RewardSample("p", "c")))


def test_concurrency_cap_and_rate_limit(server: CannedServer, group_of) -> None:
    server.delay_s = 0.1
    judge = JudgeReward(server.url, "judge", max_concurrency=2)
    graph = RewardGraph([RewardNode("judge", judge)])
    graph.score_groups_sync([group_of("q", [f"c{i}" for i in range(6)])])
    assert server.peak == 2

    server.delay_s, server.peak = 0.0, 0
    limited = JudgeReward(server.url, "judge", rate_limit_per_s=20.0)
    start = time.perf_counter()
    RewardGraph([RewardNode("judge", limited)]).score_groups_sync(
        [group_of("q", [f"c{i}" for i in range(6)])]
    )
    assert time.perf_counter() - start >= 5 / 20.0 - 0.01  # 6 requests at 20/s: >= 0.25 s
