"""The response cache (docs/routing.md): hits and misses through real daemons and the
official client, per-key scope, Cache-Control, stream replay, Redis shared by two
replicas and a Redis that dies at run time; the key, LRU and replay as functions."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon.cache import (
    Entry,
    MemoryCache,
    cache_key,
    cacheable,
    completion_from_chunks,
    replay,
)
from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    REDIS_URL,
    ServerThread,
    base_config,
    cli,
    client_for,
    free_port,
    ledger_rows,
    running,
    wait_for,
)
from tests.test_routing import metric, scrape
from tests.test_shared_limits import private_redis

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PRICING = {"input_per_million": 2.0, "output_per_million": 8.0}
# What the fake upstream reports (11 prompt, 3 completion tokens), at PRICING.
COST = (11 * 2.0 + 3 * 8.0) / 1e6
ASK = {"model": "m", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}


def config(upstream_url: str, **cache: Any) -> dict[str, Any]:
    return base_config(
        models=[
            {
                "name": "m",
                "provider": "openai",
                "model": "up-model",
                "api_base": upstream_url + "/v1",
                "pricing": PRICING,
            }
        ],
        cache={"enabled": True, **cache},
    )


def post(url: str, body: dict[str, Any], key: str = ADMIN_KEY, **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def create_key(config_dir: Path, name: str, *args: str) -> str:
    config = str(config_dir / "config.yaml")
    result = cli("keys", "create", "--name", name, "--json", "--config", config, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(result.stdout)["key"])


# -- through a daemon ------------------------------------------------------------------


def test_a_hit_is_the_same_object_costs_nothing_and_records_the_saving(tmp_path: Path) -> None:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as up, running(tmp_path, config(up.url)) as daemon:
        client = client_for(daemon.url)
        first = client.chat.completions.with_raw_response.create(**ASK)
        second = client.chat.completions.with_raw_response.create(**ASK)
        assert first.headers["x-chatvault-cache"] == "miss"
        assert second.headers["x-chatvault-cache"] == "hit"
        assert second.headers["x-chatvault-model"] == "m"
        assert second.headers["x-chatvault-attempts"] == "0"
        assert first.parse().model_dump() == second.parse().model_dump()
        assert len(state.posts()) == 1
        rows = wait_for(lambda: len(r := ledger_rows(daemon.ledger_path)) == 2 and r)
        metrics = scrape(daemon.url)
    miss, hit = rows
    assert miss["cache_result"] == "miss" and math.isclose(miss["cost_usd"], COST)
    assert miss["attempts"] == 1 and miss["saved_usd"] == 0
    assert hit["cache_result"] == "hit" and hit["cost_usd"] == 0 and hit["attempts"] == 0
    assert math.isclose(hit["saved_usd"], COST) and hit["input_tokens"] == 0
    assert metric(metrics, "chatvault_cache_requests_total", model="m", result="hit") == 1
    assert metric(metrics, "chatvault_cache_requests_total", model="m", result="miss") == 1
    assert math.isclose(metric(metrics, "chatvault_cache_saved_usd_total", model="m"), COST)


def test_streams_hit_and_are_replayed_as_sse(tmp_path: Path) -> None:
    state = Upstream(reply_words=("one", "two", "three"))
    with ServerThread(openai_upstream(state)) as up, running(tmp_path, config(up.url)) as daemon:
        client = client_for(daemon.url)
        # A streamed miss is stored; a plain request then hits it ...
        streamed = client.chat.completions.create(
            **ASK, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(streamed)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        wait_for(lambda: len(ledger_rows(daemon.ledger_path)) == 1)
        raw = client.chat.completions.with_raw_response.create(**ASK)
        assert raw.headers["x-chatvault-cache"] == "hit"
        assert raw.parse().choices[0].message.content == text
        assert raw.parse().usage is not None and raw.parse().usage.completion_tokens == 3
        # ... and a streaming request is answered from it as SSE, usage included.
        with client.chat.completions.with_streaming_response.create(
            **ASK, stream=True, stream_options={"include_usage": True}
        ) as response:
            assert response.headers["x-chatvault-cache"] == "hit"
            assert response.headers["content-type"].startswith("text/event-stream")
            replayed = list(response.parse())
        assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == text
        assert replayed[-1].usage is not None and replayed[-1].usage.prompt_tokens == 11
        assert {c.id for c in replayed} == {chunks[0].id}
        assert len(state.posts()) == 1


def test_the_cache_is_per_key_unless_global(tmp_path: Path) -> None:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as up:
        with running(tmp_path / "key", config(up.url)) as daemon:
            other = create_key(tmp_path / "key", "other")
            assert post(daemon.url, ASK).headers["x-chatvault-cache"] == "miss"
            wait_for(lambda: post(daemon.url, ASK).headers["x-chatvault-cache"] == "hit")
            # Another key asking the same question does not see the first key's answer.
            assert post(daemon.url, ASK, other).headers["x-chatvault-cache"] == "miss"
        assert len(state.posts()) == 2
        with running(tmp_path / "global", config(up.url, scope="global")) as daemon:
            other = create_key(tmp_path / "global", "other")
            assert post(daemon.url, ASK).headers["x-chatvault-cache"] == "miss"
            wait_for(lambda: post(daemon.url, ASK, other).headers["x-chatvault-cache"] == "hit")
        assert len(state.posts()) == 3


def test_cache_control_and_nondeterministic_requests(tmp_path: Path) -> None:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as up, running(tmp_path, config(up.url)) as daemon:
        # no-store: neither read nor written.
        r = post(daemon.url, ASK, **{"cache-control": "no-store"})
        assert r.headers["x-chatvault-cache"] == "bypass"
        assert post(daemon.url, ASK).headers["x-chatvault-cache"] == "miss"
        assert len(state.posts()) == 2
        wait_for(lambda: post(daemon.url, ASK).headers["x-chatvault-cache"] == "hit")
        # no-cache: not read (the upstream answers again), but the answer is stored.
        state.reply_words = ("fresh",)
        r = post(daemon.url, ASK, **{"cache-control": "no-cache"})
        assert r.headers["x-chatvault-cache"] == "bypass" and len(state.posts()) == 3
        assert r.json()["choices"][0]["message"]["content"] == "fresh"
        wait_for(
            lambda: post(daemon.url, ASK).json()["choices"][0]["message"]["content"] == "fresh"
        )
        # Unset temperature (the provider's default, 1) and n > 1: never cached by default.
        for body in ({**ASK, "temperature": None}, {**ASK, "n": 2}, {**ASK, "temperature": 0.7}):
            body = {k: v for k, v in body.items() if v is not None}
            for _ in range(2):
                assert post(daemon.url, body).headers["x-chatvault-cache"] == "bypass"
        assert len(state.posts()) == 3 + 6


def test_a_hit_does_not_spend_budget(tmp_path: Path) -> None:
    """A key whose budget is spent still gets its cached answers, at no cost."""
    state = Upstream(usage=(100_000, 0))  # one answer costs 0.2 USD, the whole budget
    with ServerThread(openai_upstream(state)) as up, running(tmp_path, config(up.url)) as daemon:
        key = create_key(tmp_path, "tight", "--budget-usd", "0.01")
        body = {**ASK, "max_tokens": 3}
        assert post(daemon.url, body, key).status_code == 200
        # The budget is gone: a new question is refused ...
        other = {**body, "messages": [{"role": "user", "content": "something else"}]}
        wait_for(lambda: post(daemon.url, other, key).status_code == 429)
        # ... and the cached answer is still served, at no cost.
        r = post(daemon.url, body, key)
        assert r.status_code == 200 and r.headers["x-chatvault-cache"] == "hit"
        assert len(state.posts()) == 1
        rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "cache_result = 'hit'"))
        assert rows[0]["cost_usd"] == 0 and math.isclose(rows[0]["saved_usd"], 0.2)


def test_redis_shares_hits_between_two_replicas(tmp_path: Path) -> None:
    state = Upstream()
    prefix = f"cvtest-{uuid.uuid4().hex[:12]}"
    cache = {"backend": "redis", "redis_url": REDIS_URL, "scope": "global"}
    with ServerThread(openai_upstream(state)) as up:
        shared = config(up.url, **cache)
        shared["limits"] = {"key_prefix": prefix}
        with running(tmp_path / "a", shared) as a, running(tmp_path / "b", shared) as b:
            client_a, client_b = client_for(a.url), client_for(b.url)
            miss = client_a.chat.completions.with_raw_response.create(**ASK)
            assert miss.headers["x-chatvault-cache"] == "miss"

            def hit_on_b() -> Any:
                raw = client_b.chat.completions.with_raw_response.create(**ASK)
                return raw if raw.headers["x-chatvault-cache"] == "hit" else None

            hit = wait_for(hit_on_b)
            assert hit.parse().model_dump() == miss.parse().model_dump()
            assert len(state.posts()) == 1
            rows = wait_for(lambda: ledger_rows(b.ledger_path, "cache_result = 'hit'"))
            assert math.isclose(rows[0]["saved_usd"], COST) and rows[0]["cost_usd"] == 0


def test_a_redis_lost_at_run_time_degrades_to_no_cache(tmp_path: Path) -> None:
    port = free_port()
    state = Upstream()
    with ServerThread(openai_upstream(state)) as up:
        c = config(up.url, backend="redis", redis_url=f"redis://127.0.0.1:{port}/0")
        with private_redis(port, tmp_path) as redis_server, running(tmp_path / "d", c) as daemon:
            assert post(daemon.url, ASK).headers["x-chatvault-cache"] == "miss"
            wait_for(lambda: post(daemon.url, ASK).headers["x-chatvault-cache"] == "hit")
            redis_server.terminate()
            redis_server.wait(10)
            # Never an error to the client: the upstream answers.
            r = post(daemon.url, ASK)
            assert r.status_code == 200 and r.headers["x-chatvault-cache"] == "bypass"
            health = httpx.get(daemon.url + "/health", headers=ADMIN).json()
            external = health["components"]["external_apis"]
            assert external["status"] == "degraded"
            assert external["response_cache"]["reachable"] is False
            assert "cannot be reached" in external["response_cache"]["last_error"]
            metrics = scrape(daemon.url)
            assert metric(metrics, "chatvault_cache_requests_total", result="error") >= 1


# -- the pieces ------------------------------------------------------------------------


def test_the_key_covers_what_changes_the_answer_and_nothing_else() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    key = cache_key("chat", base, "k1")
    assert key == cache_key("chat", {**base, "stream": True, "user": "u"}, "k1")
    assert key == cache_key("chat", dict(reversed(base.items())), "k1")
    for changed in (
        {**base, "temperature": 0.5},
        {**base, "messages": [{"role": "user", "content": "y"}]},
        {**base, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {**base, "model": "other"},
    ):
        assert cache_key("chat", changed, "k1") != key
    assert cache_key("chat", base, "k2") != key
    assert cacheable(base, False) and not cacheable({**base, "n": 2}, False)
    assert not cacheable({"model": "m", "messages": []}, False)
    assert cacheable({"model": "m", "messages": [], "n": 3}, True)


def test_the_memory_cache_is_bounded_by_bytes_and_expires() -> None:
    now = [0.0]

    def entry(size: int) -> Entry:
        return Entry(b"x" * size, 0.0, "m", "p", "u")

    cache = MemoryCache(max_bytes=3 * entry(800).size, ttl_s=10, clock=lambda: now[0])

    async def run() -> None:
        for k in "abc":
            cache.put(k, entry(800))
        assert await cache.get("a") is not None  # "a" is now the most recent
        cache.put("d", entry(800))  # evicts the least recently used: "b"
        assert await cache.get("b") is None
        assert all([await cache.get(k) for k in "acd"])
        assert cache.status.bytes <= cache.max_bytes and cache.status.entries == 3
        cache.put("huge", entry(10_000))  # bigger than the whole cache: not kept
        assert await cache.get("huge") is None and await cache.get("c") is not None
        now[0] += 10
        assert await cache.get("a") is None and cache.status.entries == 2

    asyncio.run(run())


def test_replay_and_reassembly_round_trip() -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "up",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            },
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    events = replay(orjson.dumps(completion), include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    rebuilt = completion_from_chunks(events)
    assert rebuilt is not None and orjson.loads(rebuilt) == completion
    # A stream cut before its finish reason is not an answer to keep.
    assert completion_from_chunks(events[:1]) is None
    without_usage = replay(orjson.dumps(completion), include_usage=False)
    assert all(b'"usage"' not in e for e in without_usage)


@pytest.mark.parametrize("raw", [b"", b"not json\nbody", b"[1]\nbody", b"[1, 2, 3, 4]"])
def test_a_damaged_entry_is_a_miss(raw: bytes) -> None:
    assert Entry.decode(raw) is None
