"""Routing (docs/routing.md): retries per failure kind, fallbacks, load balancing,
circuit breakers and the request deadline, against real upstreams on loopback and real
`chatvault serve` processes; the strategies and retry rules as pure functions."""

from __future__ import annotations

import contextlib
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.attempts import backoff_s, retry_after_s, retry_reason
from daemon.availability import Availability
from daemon.config import ConfigError, ModelConfig, parse_config
from daemon.deployment import Deployment
from daemon.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.pricing import Price
from daemon.providers.mock import MockProvider
from daemon.router import least_busy, lowest_latency, smooth_weighted
from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    REPO,
    Daemon,
    ServerThread,
    base_config,
    cli,
    client_for,
    free_port,
    ledger_rows,
    new_key,
    running,
    wait_for,
    write_config,
)

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
# Prices used by every openai deployment here; the fakes report 11 prompt + 3 completion tokens.
PRICING = {"input_per_million": 2.0, "output_per_million": 8.0}
# The per-model timeout that bounds the wait for response headers: first_byte_timeout_s
# where the provider has it (the hardening branch), else timeout_s (its read timeout).
FIRST_BYTE_KEY = (
    "first_byte_timeout_s" if "first_byte_timeout_s" in ModelConfig.model_fields else "timeout_s"
)


def chat(model: str, content: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def post(url: str, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=timeout)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", headers=ADMIN, timeout=10).text


def openai_model(name: str, api_base: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": "up-model",
        "api_base": api_base,
        "pricing": PRICING,
        **extra,
    }


# -- upstreams that fail in each way ---------------------------------------------------


class Scripted:
    """An OpenAI-compatible upstream whose n-th completion gets ``status(n)``; records
    when each arrived."""

    def __init__(self, status: Callable[[int], int], retry_after: str | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        self.arrivals: list[float] = []

    def app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            body = await request.json()
            n = len(self.arrivals)
            self.arrivals.append(time.monotonic())
            status = self.status(n)
            if status != 200:
                headers = {"retry-after": self.retry_after} if self.retry_after else None
                return JSONResponse(
                    {"error": {"message": f"scripted {status}", "type": "x", "code": None}},
                    status_code=status,
                    headers=headers,
                )
            return JSONResponse(
                {
                    "id": f"chatcmpl-s{n}",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "scripted"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
                }
            )

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": []})

        return Starlette(
            routes=[
                Route("/v1/chat/completions", completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
            ]
        )


PROBE_REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 28\r\n"
    b"connection: close\r\n\r\n"
    b'{"object":"list","data":[]} '
)


@contextlib.contextmanager
def raw_listener(reply: bytes | None) -> Iterator[str]:
    """A TCP server that accepts, reads the request, sends ``reply`` (None: nothing) and
    then holds the connection open without another byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            with contextlib.suppress(OSError):
                conn.settimeout(2)
                if conn.recv(65536).startswith(b"GET"):  # a health probe: looks alive
                    conn.sendall(PROBE_REPLY)
                elif reply is not None:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in held:
            conn.close()


# -- each failure kind's retry rule, end to end ----------------------------------------

# (model, retried?, the status the client would see without a retry)
KINDS = [
    ("refused", True),
    ("first_byte", True),
    ("limited", True),
    ("error500", True),
    ("error503", True),
    ("stalled", False),  # answered headers, then no body: a plain timeout, never retried
    ("rejected", False),  # 400: the client's mistake, the same everywhere
]


@pytest.fixture(scope="module")
def failure_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    good = Upstream()
    s500 = Scripted(lambda n: 500)
    s503 = Scripted(lambda n: 503)
    s429 = Scripted(lambda n: 429)
    s400 = Scripted(lambda n: 400)
    stall = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"
    with contextlib.ExitStack() as stack:
        ok = stack.enter_context(ServerThread(openai_upstream(good)))
        # Alive for the first probe round, dead by the time the requests come.
        dying = ServerThread(Scripted(lambda n: 200).app()).__enter__()
        ups = {
            "refused": dying.url + "/v1",
            "first_byte": stack.enter_context(raw_listener(None)),
            "stalled": stack.enter_context(raw_listener(stall)),
            "limited": stack.enter_context(ServerThread(s429.app())).url + "/v1",
            "error500": stack.enter_context(ServerThread(s500.app())).url + "/v1",
            "error503": stack.enter_context(ServerThread(s503.app())).url + "/v1",
            "rejected": stack.enter_context(ServerThread(s400.app())).url + "/v1",
        }
        models = []
        for name, base in ups.items():
            # The failing deployment always goes first (weight 1 against 0), the good one
            # is what a retry moves to.
            models.append(openai_model(name, base, weight=1, **{FIRST_BYTE_KEY: 0.5}))
            models.append(openai_model(name, ok.url + "/v1", weight=0))
        config = base_config(
            models=models,
            routing={"retries": 1, "retry_backoff_s": 0.01, "circuit_breaker": {"failures": 50}},
            monitoring={"tracing": {"enabled": False}, "health": {"probe_interval_s": 3600}},
        )
        daemon = stack.enter_context(running(tmp_path_factory.mktemp("kinds"), config))
        health = httpx.get(daemon.url + "/health?refresh=true", headers=ADMIN, timeout=10)
        assert health.json()["components"]["models"]["status"] == "healthy", health.text
        dying.__exit__(None, None, None)
        yield {"daemon": daemon, "good": good, "order": list(ups)}


@pytest.mark.parametrize(("model", "retried"), KINDS)
def test_each_failure_kind_follows_its_retry_rule(
    failure_daemon: dict[str, Any], model: str, retried: bool
) -> None:
    daemon: Daemon = failure_daemon["daemon"]
    good: Upstream = failure_daemon["good"]
    before = len(good.posts())
    r = post(daemon.url, chat(model, f"kind {model}"))
    if retried:
        assert r.status_code == 200, r.text
        assert r.headers["x-chatvault-attempts"] == "2"
        assert r.headers["x-chatvault-model"] == model
        assert len(good.posts()) == before + 1
        # The answer came from the good deployment, and its row says so.
        rows = wait_for(
            lambda: ledger_rows(daemon.ledger_path, "model = ? AND status_code = 200", (model,))
        )
        assert rows[-1]["attempts"] == 2 and rows[-1]["served_model"] == model
        good_index = 2 * failure_daemon["order"].index(model) + 1
        assert rows[-1]["deployment"] == f"models[{good_index}]"
    else:
        assert r.status_code in (400, 504), r.text
        assert len(good.posts()) == before  # never sent elsewhere


def test_upstream_retry_after_is_passed_on_when_nothing_else_can_answer(tmp_path: Path) -> None:
    """A 429 is retryable; the upstream's own Retry-After (7 s here, not a guess) is what
    a client is told when it reaches the client."""
    s429 = Scripted(lambda n: 429, retry_after="7")
    with ServerThread(s429.app()) as up:
        config = base_config(
            models=[openai_model("only", up.url + "/v1")],
            routing={"retries": 0},
        )
        with running(tmp_path, config) as daemon:
            r = post(daemon.url, chat("only"))
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "upstream_rate_limited"


def test_a_retry_of_the_same_deployment_waits_for_its_retry_after(tmp_path: Path) -> None:
    s429 = Scripted(lambda n: 429 if n == 0 else 200, retry_after="2")
    with ServerThread(s429.app()) as up:
        config = base_config(
            models=[openai_model("only", up.url + "/v1")],
            routing={"retries": 1, "retry_backoff_s": 0.01},
        )
        with running(tmp_path, config) as daemon:
            r = post(daemon.url, chat("only"))
    assert r.status_code == 200 and r.headers["x-chatvault-attempts"] == "2"
    assert len(s429.arrivals) == 2
    # Retry-After (2 s) wins over the 10 ms backoff.
    assert s429.arrivals[1] - s429.arrivals[0] >= 2.0


# -- fallbacks -----------------------------------------------------------------------


def test_a_dead_primary_is_answered_by_its_fallback(tmp_path: Path) -> None:
    good = Upstream()
    # Credentials in the URL must not reach a metric label.
    dead = f"http://user:s3cret-pass@127.0.0.1:{free_port()}/v1"
    with ServerThread(openai_upstream(good)) as up:
        config = base_config(
            models=[
                openai_model("primary", dead, fallbacks=["backup"]),
                openai_model("backup", up.url + "/v1"),
            ],
            routing={"retries": 2, "retry_backoff_s": 0.01},
        )
        with running(tmp_path, config) as daemon:
            client = client_for(daemon.url)
            raw = client.chat.completions.with_raw_response.create(**chat("primary"))
            completion = raw.parse()
            assert completion.choices[0].message.content == "Hello from upstream"
            # Three attempts at the primary (1 + 2 retries), then the backup.
            assert raw.headers["x-chatvault-model"] == "backup"
            assert raw.headers["x-chatvault-attempts"] == "4"
            stream = client.chat.completions.create(**chat("primary"), stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text.strip() == "Hello from upstream"
            rows = wait_for(lambda: len(r := ledger_rows(daemon.ledger_path)) == 2 and r)
            metrics = scrape(daemon.url)
    # The second request: two more failures open the primary's circuit (5 in a row), so
    # it is skipped after them.
    assert [row["attempts"] for row in rows] == [4, 3]
    for row in rows:
        assert row["model"] == "primary" and row["served_model"] == "backup"
        assert row["deployment"] == "models[1]"
        # Billed at the backup's price for the backup's tokens.
        assert math.isclose(row["cost_usd"], (11 * 2.0 + 3 * 8.0) / 1e6)
    assert (
        metric(
            metrics,
            "chatvault_fallbacks_total",
            from_model="primary",
            to_model="backup",
            reason="upstream_unreachable",
        )
        == 2
    )
    assert (
        metric(
            metrics,
            "chatvault_routing_attempts_total",
            model="primary",
            deployment="models[0]",
            outcome="upstream_unreachable",
        )
        == 5
    )
    assert (
        metric(
            metrics,
            "chatvault_routing_attempts_total",
            model="backup",
            deployment="models[1]",
            outcome="success",
        )
        == 2
    )
    assert "s3cret" not in metrics


def test_a_flaky_upstream_with_two_retries_gives_no_errors(tmp_path: Path) -> None:
    """Half its requests answer 500 (every other one): retries: 2 hide all of them, and
    the attempt counters add up to what the upstream saw."""
    flaky = Scripted(lambda n: 500 if n % 2 == 0 else 200)
    with ServerThread(flaky.app()) as up:
        config = base_config(
            models=[openai_model("flaky", up.url + "/v1")],
            routing={"retries": 2, "retry_backoff_s": 0.001},
        )
        with running(tmp_path, config) as daemon:
            client = client_for(daemon.url)
            attempts = 0
            for i in range(100):
                raw = client.chat.completions.with_raw_response.create(**chat("flaky", str(i)))
                assert raw.parse().choices[0].message.content == "scripted"
                attempts += int(raw.headers["x-chatvault-attempts"])
            metrics = scrape(daemon.url)
    served = len(flaky.arrivals)
    failures = sum(1 for n in range(served) if n % 2 == 0)
    assert attempts == served == 200
    labels = {"model": "flaky", "deployment": "models[0]"}
    name = "chatvault_routing_attempts_total"
    assert metric(metrics, name, **labels, outcome="success") == served - failures == 100
    assert metric(metrics, name, **labels, outcome="upstream_error") == failures


# -- circuit breaker -----------------------------------------------------------------


def test_a_circuit_opens_skips_half_opens_and_closes(tmp_path: Path) -> None:
    broken = {"on": True}
    a = Scripted(lambda n: 500 if broken["on"] else 200)
    b = Scripted(lambda n: 200)
    with ServerThread(a.app()) as up_a, ServerThread(b.app()) as up_b:
        config = base_config(
            models=[
                openai_model("m", up_a.url + "/v1", weight=1),
                openai_model("m", up_b.url + "/v1", weight=0),
            ],
            routing={
                "retries": 1,
                "retry_backoff_s": 0.001,
                "circuit_breaker": {"failures": 3, "cooldown_s": 1.0},
            },
            monitoring={"tracing": {"enabled": False}, "health": {"probe_interval_s": 3600}},
        )
        with running(tmp_path, config) as daemon:
            gauge = "chatvault_circuit_state"
            labels = {"model": "m", "deployment": "models[0]"}
            assert metric(scrape(daemon.url), gauge, **labels) == 0
            for _ in range(3):  # A fails, B answers: the client sees nothing wrong
                assert post(daemon.url, chat("m")).status_code == 200
            assert len(a.arrivals) == 3
            assert metric(scrape(daemon.url), gauge, **labels) == 2
            health = httpx.get(daemon.url + "/health", headers=ADMIN).json()
            (dep_a, _) = health["components"]["models"]["models"]["m"]["deployments"]
            assert dep_a["circuit"]["state"] == "open"
            assert "3 consecutive upstream failures" in dep_a["circuit"]["reason"]
            # Open: skipped, B alone answers, in one attempt.
            for _ in range(5):
                r = post(daemon.url, chat("m"))
                assert r.status_code == 200 and r.headers["x-chatvault-attempts"] == "1"
            assert len(a.arrivals) == 3
            # After the cool-down one trial goes to A; it fails: open again.
            time.sleep(1.05)  # the cool-down itself is what is being tested
            assert post(daemon.url, chat("m")).headers["x-chatvault-attempts"] == "2"
            assert len(a.arrivals) == 4
            assert post(daemon.url, chat("m")).headers["x-chatvault-attempts"] == "1"
            assert len(a.arrivals) == 4
            # A recovers; after the next cool-down its trial succeeds and closes it.
            broken["on"] = False
            time.sleep(1.05)
            r = post(daemon.url, chat("m"))
            assert r.status_code == 200 and r.headers["x-chatvault-attempts"] == "1"
            assert len(a.arrivals) == 5
            assert metric(scrape(daemon.url), gauge, **labels) == 0
            assert post(daemon.url, chat("m")).status_code == 200
            assert len(a.arrivals) == 6  # closed: A (weight 1) first again


def test_circuit_states_with_an_injected_clock() -> None:
    now = [100.0]
    d = Deployment(0, ModelConfig(name="m", provider="mock"), MockProvider("m"), Price())
    changes: list[str] = []
    av = Availability(
        [d],
        failure_threshold=2,
        cooldown_s=10,
        clock=lambda: now[0],
        on_change=lambda _, s: changes.append(s),
    )
    av.report_failure(d, "x")
    assert av.admits(d) and av.is_up(d)
    av.report_failure(d, "x")
    assert not av.admits(d) and not av.is_up(d) and changes == ["open"]
    now[0] += 9.9
    assert not av.admits(d)
    now[0] += 0.1
    assert av.admits(d) and changes == ["open", "half_open"]
    av.begin_trial(d)
    assert not av.admits(d)  # one trial at a time
    av.report_failure(d, "x")  # the trial failed: open again, a new cool-down
    assert changes[-1] == "open" and not av.admits(d)
    now[0] += 10
    assert av.admits(d)
    av.begin_trial(d)
    av.report_success(d)
    assert changes[-1] == "closed" and av.admits(d) and av.is_up(d)


# -- load balancing ------------------------------------------------------------------


def test_weighted_shares_are_exact_over_each_round() -> None:
    credit = [0.0, 0.0, 0.0]
    picks = [smooth_weighted(credit, [3, 1, 1]) for _ in range(500)]
    assert [picks.count(i) for i in range(3)] == [300, 100, 100]
    # Interleaved, not in runs: no window of 5 has more than 3 of the first.
    assert all(picks[i : i + 5].count(0) == 3 for i in range(0, 500, 5))
    equal = [0.0, 0.0, 0.0]
    assert [smooth_weighted(equal, [1, 1, 1]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_latency_strategy_prefers_the_fastest_and_explores() -> None:
    rng = random.Random(1234)
    n, trials, explore = 3, 20_000, 0.1
    picks = [lowest_latency([0.3, 0.1, 0.2], rng.random(), explore) for _ in range(trials)]
    share = [picks.count(i) / trials for i in range(n)]
    # Expected: the fastest always, except when exploring uniformly.
    expected = [explore / n, 1 - explore + explore / n, explore / n]
    for got, p in zip(share, expected, strict=True):
        sigma = math.sqrt(p * (1 - p) / trials)
        assert abs(got - p) < 5 * sigma, (share, expected)
    assert lowest_latency([0.1, None, 0.2], 0.99) == 1  # unmeasured: measured first


def test_least_busy_picks_the_fewest_in_flight_and_rotates_ties() -> None:
    assert least_busy([3, 1, 2], 0) == 1
    assert [least_busy([0, 0, 0], s) for s in range(3)] == [0, 1, 2]


def test_weighted_shares_through_a_daemon(tmp_path: Path) -> None:
    a, b = Scripted(lambda n: 200), Scripted(lambda n: 200)
    with ServerThread(a.app()) as up_a, ServerThread(b.app()) as up_b:
        config = base_config(
            models=[
                openai_model("m", up_a.url + "/v1", weight=3),
                openai_model("m", up_b.url + "/v1", weight=1),
            ]
        )
        with running(tmp_path, config) as daemon:
            for i in range(40):
                assert post(daemon.url, chat("m", str(i))).status_code == 200
    assert (len(a.arrivals), len(b.arrivals)) == (30, 10)


def test_least_busy_sends_to_the_idle_deployment(tmp_path: Path) -> None:
    slow, fast = Upstream(delay_s=4.0), Upstream()
    with ServerThread(openai_upstream(slow)) as up_s, ServerThread(openai_upstream(fast)) as up_f:
        config = base_config(
            models=[
                openai_model("m", up_s.url + "/v1"),
                openai_model("m", up_f.url + "/v1"),
            ],
            routing={"strategy": "least-busy"},
        )
        with running(tmp_path, config) as daemon:
            # Find which deployment a first request goes to, and keep it busy.
            threads = [
                threading.Thread(target=post, args=(daemon.url, chat("m", "busy")))
                for _ in range(2)
            ]
            for t in threads:
                t.start()
                time.sleep(0.1)
            wait_for(lambda: len(slow.posts()) + len(fast.posts()) == 2)
            # Two in flight: one each (the second went to the idle one). The slow one
            # stays busy; every request now goes to whichever is free.
            before = len(fast.posts())
            for i in range(4):
                assert post(daemon.url, chat("m", str(i))).status_code == 200
            assert len(slow.posts()) == 1 and len(fast.posts()) == before + 4
            for t in threads:
                t.join(10)


# -- the deadline, and the rules as pure functions -------------------------------------


def test_the_request_deadline_bounds_all_attempts(tmp_path: Path) -> None:
    with raw_listener(None) as hung:
        config = base_config(
            models=[openai_model("slow", hung, **{FIRST_BYTE_KEY: 30})],
            routing={"retries": 3, "request_deadline_s": 0.6},
        )
        with running(tmp_path, config) as daemon:
            started = time.monotonic()
            r = post(daemon.url, chat("slow"))
            took = time.monotonic() - started
    assert r.status_code == 504 and 0.5 < took < 3, (r.status_code, took)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UpstreamUnavailable("x"), "upstream_unreachable"),
        (UpstreamConnectTimeout("x"), "upstream_connect_timeout"),
        (UpstreamFirstByteTimeout("x"), "upstream_first_byte_timeout"),
        (RateLimited("x", code="upstream_rate_limited"), "rate_limited"),
        (RateLimited("x"), None),  # the gateway's own limit, not the upstream's
        (UpstreamTimeout("x"), None),
        (InvalidRequest("x"), None),
        (UpstreamError("x"), None),  # e.g. invalid JSON: it did the work
    ],
)
def test_retry_reasons(error: GatewayError, reason: str | None) -> None:
    assert retry_reason(error) == reason


@pytest.mark.parametrize(("status", "retried"), [(500, True), (502, True), (503, True),
    (504, True), (401, False), (403, False), (404, False), (408, False)])  # fmt: skip
def test_retry_by_upstream_status(status: int, retried: bool) -> None:
    error = UpstreamTimeout("x") if status in (408, 504) else UpstreamError("x")
    error.upstream_status = status
    assert (retry_reason(error) is not None) is retried


def test_backoff_is_exponential_jittered_and_yields_to_retry_after() -> None:
    assert backoff_s(1, 0.1, None, 0.0) == pytest.approx(0.05)
    assert backoff_s(1, 0.1, None, 0.999999) == pytest.approx(0.1, rel=1e-5)
    assert backoff_s(3, 0.1, None, 0.5) == pytest.approx(0.4 * 0.75)
    assert backoff_s(1, 0.1, 2.0, 0.5) == 2.0
    assert backoff_s(4, 1.0, 2.0, 0.999999) == pytest.approx(8.0, rel=1e-5)
    assert retry_after_s(RateLimited("x", headers={"Retry-After": "3"})) == 3.0
    assert retry_after_s(RateLimited("x", headers={"Retry-After": "soon"})) is None


# -- bad configuration -------------------------------------------------------------


BAD = [
    (
        [
            {"name": "a", "provider": "mock", "fallbacks": ["b"]},
            {"name": "b", "provider": "mock", "fallbacks": ["nope"]},
        ],
        {},
        "models[1].fallbacks[0]: unknown model 'nope'",
    ),
    (
        [
            {"name": "a", "provider": "mock", "fallbacks": ["b"]},
            {"name": "b", "provider": "mock", "fallbacks": ["c"]},
            {"name": "c", "provider": "mock", "fallbacks": ["a"]},
        ],
        {},
        "models[0].fallbacks: a cycle: a -> b -> c -> a",
    ),
    (
        [{"name": "a", "provider": "mock", "weight": -1}],
        {},
        "models[0].weight: Input should be greater than or equal to 0",
    ),
    (
        [{"name": "a", "provider": "mock"}],
        {"enabled": True, "backend": "redis", "redis_url": "redis://127.0.0.1:{port}/0"},
        "cache.backend: redis at redis://127.0.0.1:{port}/0 cannot be reached",
    ),
]


@pytest.mark.parametrize(("models", "cache", "message"), BAD)
def test_bad_routing_config_fails_check_and_serve(
    tmp_path: Path, models: list[dict[str, Any]], cache: dict[str, Any], message: str
) -> None:
    port = str(free_port())
    cache = {k: v.replace("{port}", port) if isinstance(v, str) else v for k, v in cache.items()}
    message = message.replace("{port}", port)
    config = base_config(port=free_port(), models=models)
    if cache:
        config["cache"] = cache
    path = write_config(tmp_path, config)
    checked = cli("config", "check", "--config", str(path), cwd=REPO)
    assert checked.returncode == 1 and message in checked.stdout + checked.stderr
    served = cli("serve", "--config", str(path), cwd=REPO, timeout=30)
    assert served.returncode != 0 and message in served.stdout + served.stderr


def test_a_good_routing_config_parses_and_fills_defaults(tmp_path: Path) -> None:
    settings = parse_config(
        base_config(
            models=[
                {"name": "a", "provider": "mock", "fallbacks": ["b"]},
                {"name": "a", "provider": "mock", "model": "other", "fallbacks": ["c", "b"]},
                {"name": "b", "provider": "mock", "fallbacks": ["c"]},
                {"name": "c", "provider": "mock"},
            ]
        ),
        base=tmp_path,
    )
    assert settings.fallbacks == {"a": ["b", "c"], "b": ["c"], "c": []}
    assert settings.retries == 1  # upstream.max_attempts (2) - 1, when routing.retries is unset
    assert settings.routing.strategy == "weighted" and settings.cache.enabled is False
    with pytest.raises(ConfigError, match=r"routing.strategy"):
        parse_config(base_config(routing={"strategy": "fastest"}), base=tmp_path)


# -- the documented example ------------------------------------------------------------


def doc_example() -> dict[str, Any]:
    text = (REPO / "docs" / "routing.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded: dict[str, Any] = yaml.safe_load(block)
    return loaded


def test_the_documented_example_config_serves(tmp_path: Path) -> None:
    example = doc_example()
    a, b, backup = Upstream(), Upstream(), Upstream(reply_words=("from", "backup"))
    with (
        ServerThread(openai_upstream(a)) as up_a,
        ServerThread(openai_upstream(b)) as up_b,
        ServerThread(openai_upstream(backup)) as up_backup,
    ):
        # The example as written, with its upstreams moved to the test's loopback ports.
        bases = [up_a.url + "/v1", up_b.url + "/v1", up_backup.url]
        models = [{**m, "api_base": base} for m, base in zip(example["models"], bases, strict=True)]
        config = base_config(routing=example["routing"], cache=example["cache"], models=models)
        assert (
            cli("config", "check", "--config", str(write_config(tmp_path, config))).returncode == 0
        )
        with running(tmp_path, config) as daemon:
            for i in range(8):
                body = {**chat("primary", f"question {i}"), "temperature": 0}
                r = post(daemon.url, body)
                assert r.status_code == 200 and r.headers["x-chatvault-cache"] == "miss"
            assert (len(a.posts()), len(b.posts())) == (6, 2)  # weights 3 and 1
            r = post(daemon.url, {**chat("primary", "question 0"), "temperature": 0})
            assert r.headers["x-chatvault-cache"] == "hit"
            up_a.__exit__(None, None, None)
            up_b.__exit__(None, None, None)
            r = post(daemon.url, {**chat("primary", "while both are down"), "temperature": 0})
            assert r.status_code == 200 and r.headers["x-chatvault-model"] == "backup"
            assert r.json()["choices"][0]["message"]["content"] == "from backup"


def test_a_journal_row_from_before_routing_reads_as_one_attempt() -> None:
    """Rows journaled by the release before migration 3 have five columns fewer."""
    from daemon.ledger.base import REQUEST_COLUMNS, usage_from_row

    old = ("r1", 1.0, "k", "standard", "chat", "m", "openai", "up", False, 200, None,
           1, 2, 0, 0, 0.5, 0.1, 0.05, None, "t", "row1", False, None)  # fmt: skip
    assert len(old) == REQUEST_COLUMNS.index("served_model")
    usage = usage_from_row(old, recovered=True)
    assert usage.attempts == 1 and usage.cache_result is None and usage.saved_usd == 0.0
    assert usage.cost_usd == 0.5 and usage.row_id == "row1" and usage.recovered


def dead_primary_live_backup(up: ServerThread, **overrides: Any) -> dict[str, Any]:
    """``primary`` refuses connections and falls back to ``backup``, which answers."""
    sections = {
        "routing": {"retries": 0},
        "monitoring": {"tracing": {"enabled": False}, "health": {"probe_interval_s": 3600}},
        **overrides,
    }
    models = [
        openai_model("primary", f"http://127.0.0.1:{free_port()}/v1", fallbacks=["backup"]),
        openai_model("backup", up.url + "/v1"),
    ]
    return base_config(models=models, **sections)


@pytest.mark.parametrize("cache", [None, "global"])
def test_a_fallback_the_key_may_not_use_is_never_tried(
    make_client: MakeClient, make_settings: Callable[..., Any], cache: str | None
) -> None:
    """A key limited to ``primary`` is not answered by ``backup`` (nor billed at its
    price) when ``primary`` is down, not even from the cache when it is shared between
    keys (``scope: global``); a key allowed both is."""
    good = Upstream()
    with ServerThread(openai_upstream(good)) as up:
        overrides = {"cache": {"enabled": True, "scope": cache}} if cache else {}
        config = dead_primary_live_backup(up, **overrides)
        client = make_client(config)
        settings = make_settings(config)
        narrow = new_key(settings, models=("primary",))["key"]
        both = new_key(settings, models=("primary", "backup"))["key"]
        body = {**chat("primary"), "temperature": 0}

        def ask(key: str) -> httpx.Response:
            headers = {"authorization": f"Bearer {key}"}
            return client.post("/v1/chat/completions", json=body, headers=headers)

        served = ask(both)
        assert served.status_code == 200, served.text
        assert served.headers["x-chatvault-model"] == "backup"
        if cache:
            assert ask(both).headers["x-chatvault-cache"] == "hit"  # it was stored
        refused = ask(narrow)
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["code"] == "upstream_unreachable"
        assert len(good.posts()) == 1  # backup answered the allowed key only, once


def test_attempts_and_the_cache_are_told_on_the_request_span(make_client: MakeClient) -> None:
    exporter = InMemorySpanExporter()
    good = Upstream()
    with ServerThread(openai_upstream(good)) as up:
        config = dead_primary_live_backup(
            up,
            cache={"enabled": True},
            monitoring={"tracing": {"enabled": True}, "health": {"probe_interval_s": 3600}},
        )
        client = make_client(config, span_exporter=exporter)
        body = {**chat("primary"), "temperature": 0}
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=body, headers=ADMIN).status_code == 200
        tracing = client.app.state.gateway.tracing  # type: ignore[attr-defined]

        def servers() -> list[ReadableSpan] | None:
            tracing.force_flush()
            found = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
            return found if len(found) == 2 else None

        miss, hit = wait_for(servers)
    (event,) = [e for e in miss.events if e.name == "chatvault.routing.attempt_failed"]
    assert event.attributes == {
        "gen_ai.request.model": "primary",
        "chatvault.deployment": "models[0]",
        "chatvault.attempt": 1,
        "error.type": "upstream_unreachable",
    }
    assert miss.attributes["chatvault.routing.attempts"] == 2
    assert miss.attributes["chatvault.routing.served_model"] == "backup"
    assert miss.attributes["chatvault.cache.result"] == "miss"
    assert hit.attributes["chatvault.cache.result"] == "hit" and not hit.events
    clients = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
    assert [s.attributes.get("error.type") for s in clients] == ["upstream_unreachable", None]


def test_chatvault_health_shows_open_circuits() -> None:
    from chatvault_cli.render import key_figures

    component = {
        "models": {
            "m": {
                "available": True,
                "deployments": [
                    {"deployment": "models[0]", "circuit": {"state": "open"}},
                    {"deployment": "models[1]", "circuit": {"state": "closed"}},
                ],
            }
        }
    }
    assert key_figures("models", component) == "1/1 available, circuit open: models[0]"
