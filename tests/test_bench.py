"""A tiny run of the benchmark's parts (the benchmark itself is `make bench`, not a test)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from bench import load
from bench.__main__ import wait_port
from tests.helpers import REPO, free_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--port", str(port), "--chunks", "5"], cwd=REPO
    )
    try:
        wait_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def test_mock_upstream_speaks_openai(upstream: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    answer = httpx.post(f"http://127.0.0.1:{upstream}/v1/chat/completions", json=body).json()
    assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["message"]["content"]
    stream = httpx.post(
        f"http://127.0.0.1:{upstream}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = [e for e in stream.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 5
    assert len(events) == 1 + 5 + 1 + 1 + 1  # role, content, finish, usage, done


def test_load_generator_counts_requests_and_first_bytes(upstream: int) -> None:
    for stream in (False, True):
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
        ).encode()
        request = load.build_request("127.0.0.1", upstream, "/v1/chat/completions", body, {})
        result = asyncio.run(load.run("127.0.0.1", upstream, request, concurrency=4, count=60))
        assert result.requests == 60 and result.errors == 0
        assert len(result.ttfts) == 60
        assert all(t <= total for t, total in zip(result.ttfts, result.latencies, strict=True))
    assert load.percentile([3.0, 1.0, 2.0], 50) == 2.0
