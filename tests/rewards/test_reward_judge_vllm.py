"""Judge node against a real `vllm serve` of a tiny random model, started here on 127.0.0.1.

The tiny model's verdict text is random, so these tests check the plumbing: every request
reaches the server, replies are parsed or counted as parse failures (masked), a server error is
retried, and vLLM's structured outputs make every verdict parseable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from posttrain.rewards import RewardGraph, RewardNode
from posttrain.rewards.judge import JudgeReward

pytestmark = pytest.mark.slow
RUBRIC = "Q:{prompt} A:{completion} PASS or FAIL?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("vllm")
    from posttrain.models.factory import TinyModelSpec, save_tiny_model

    root = tmp_path_factory.mktemp("judge")
    model_dir = save_tiny_model(
        TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128),
        str(root / "model"),
    )
    port = _free_port()
    log = open(root / "serve.log", "w")  # noqa: SIM115 - closed below
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        "judge",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.15",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"vllm serve exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after 240 s:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine process (our own session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _served_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, flags=re.M))


def test_judge_against_vllm_serve(vllm_url: str, group_of) -> None:
    before = _served_requests(vllm_url)
    judge = JudgeReward(f"{vllm_url}/v1", "judge", rubric=RUBRIC, max_tokens=8, temperature=1.0)
    graph = RewardGraph([RewardNode("judge", judge, timeout_s=60)], max_failed_fraction=1.0)
    texts = [f"{37 + 58 + i}" for i in range(8)]
    [scored], metrics = graph.score_groups_sync([group_of("37+58?", texts, answer="95")])
    assert _served_requests(vllm_url) - before == 8  # every sample's request reached the server
    assert metrics["reward/judge/requests"] == 8 and metrics["reward/judge/retries"] == 0
    parsed = [r for r in scored.rewards if r is not None]
    assert all(r in (0.0, 1.0) for r in parsed)
    assert metrics["reward/judge/parse_failures"] == 8 - len(parsed) == metrics["reward/judge/masked"]


def test_structured_outputs_make_every_verdict_parse(vllm_url: str, group_of) -> None:
    judge = JudgeReward(
        f"{vllm_url}/v1",
        "judge",
        rubric=RUBRIC,
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["PASS", "FAIL"]}},
    )
    [scored], metrics = RewardGraph([RewardNode("judge", judge, timeout_s=60)]).score_groups_sync(
        [group_of("37+58?", ["95", "94", "96", "x"], answer="95")]
    )
    assert all(r in (0.0, 1.0) for r in scored.rewards)
    assert metrics["reward/judge/parse_failures"] == 0


def test_server_error_is_retried_through_to_vllm(vllm_url: str, group_of) -> None:
    """A proxy in front of vLLM answers the first request with 503; the judge retries and gets through."""
    seen: list[int] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(len(seen))
            if len(seen) == 1:
                status, data = 503, b'{"error": "warming up"}'
            else:
                resp = httpx.post(
                    vllm_url + self.path,
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=60,
                )
                status, data = resp.status_code, resp.content
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        judge = JudgeReward(
            f"http://127.0.0.1:{proxy.server_address[1]}/v1",
            "judge",
            rubric=RUBRIC,
            max_tokens=8,
            backoff_s=0.05,
            extra_body={"structured_outputs": {"choice": ["PASS", "FAIL"]}},
        )
        [scored], metrics = RewardGraph([RewardNode("judge", judge, timeout_s=60)]).score_groups_sync(
            [group_of("37+58?", ["95"], answer="95")]
        )
    finally:
        proxy.shutdown()
    assert (
        len(seen) == 2
        and metrics["reward/judge/retries"] == 1.0
        and metrics["reward/judge/http_errors"] == 1.0
    )
    assert scored.rewards[0] in (0.0, 1.0)
    assert json.loads(json.dumps(metrics))  # flat, JSON-serialisable metrics
