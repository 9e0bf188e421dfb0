"""Traces received by a real OTLP/gRPC receiver from a real daemon."""

from __future__ import annotations

import json
import secrets
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link

from bench.otlp import OTLPReceiver, ReceivedSpan
from daemon.config import TracingConfig
from daemon.otel_env import resolve
from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    ServerThread,
    base_config,
    client_for,
    expected_cost,
    ledger_rows,
    running,
    wait_for,
)

SERVER, CLIENT = 2, 3  # OTLP span kinds
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "2000"}


def traced_config(receiver: OTLPReceiver, **extra: Any) -> dict[str, Any]:
    """Traced to ``receiver``; the tests find their spans by the traceparent they send."""
    tracing = {
        "enabled": True,
        "endpoint": receiver.endpoint,
        "trust_incoming_context": True,
        **extra,
    }
    return base_config(monitoring={"tracing": tracing})


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with (
        OTLPReceiver() as receiver,
        running(
            tmp_path_factory.mktemp("traced"), traced_config(receiver), env=FAST_EXPORT
        ) as daemon,
    ):
        yield daemon, receiver


def spans_of(receiver: OTLPReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    def enough() -> list[ReceivedSpan] | None:
        with receiver.lock:
            found = [s for s in receiver.spans if s.trace_id == trace_id]
        return found if len(found) >= count else None

    return wait_for(enough, timeout=15)


def test_server_and_client_spans_continue_the_callers_trace(traced: Any) -> None:
    daemon, receiver = traced
    header, trace_id, parent_id = traceparent()
    client = client_for(daemon.url, headers={"traceparent": header, "x-user-id": "user-42"})
    secret_prompt = "my very private prompt about zebras"
    raw = client.chat.completions.with_raw_response.create(
        model="mock",
        messages=[{"role": "user", "content": secret_prompt}],
        temperature=0.5,
        max_tokens=50,
    )
    completion = raw.parse()
    spans = spans_of(receiver, trace_id, 2)
    server = next(s for s in spans if s.kind == SERVER)
    upstream = next(s for s in spans if s.kind == CLIENT and s.name.startswith("chat "))

    assert server.name == "POST /v1/chat/completions"
    assert server.parent_span_id == parent_id
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/v1/chat/completions"
    assert server.attributes["client.address"] == "127.0.0.1"
    assert "OpenAI" in server.attributes["user_agent.original"]
    assert server.attributes["user.id"] == "user-42"
    assert server.resource["service.name"] == "chatvault"

    assert upstream.name == "chat mock"
    assert upstream.parent_span_id == server.span_id
    a = upstream.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "mock"
    assert a["gen_ai.request.model"] == "mock"
    assert a["gen_ai.response.model"] == completion.model
    assert a["gen_ai.response.id"] == completion.id
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.max_tokens"] == 50
    assert "gen_ai.request.stream" not in a  # set only when streaming
    assert a["chatvault.user_type"] == "admin" and a["chatvault.key_id"] == "admin"

    row = wait_for(
        lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (raw.headers["x-request-id"],))
    )[0]
    assert row["trace_id"] == trace_id
    # The cost at mock's configured price, from the token counts the client was sent.
    pricing = base_config()["models"][0]["pricing"]
    cost = expected_cost(
        pricing, completion.usage.prompt_tokens, 0, completion.usage.completion_tokens
    )
    assert cost > 0
    assert a["chatvault.cost_usd"] == pytest.approx(cost, rel=1e-9)
    assert row["cost_usd"] == pytest.approx(cost, rel=1e-9)
    # No prompt or completion text by default, anywhere.
    everything = json.dumps([s.attributes for s in spans], default=str)
    assert "zebras" not in everything and "You said" not in everything
    # The JSON access line carries the trace id too.
    log_line = next(
        json.loads(line)
        for line in daemon.log().splitlines()
        if raw.headers["x-request-id"] in line and '"chatvault.access"' in line
    )
    assert log_line["trace_id"] == trace_id


def test_stream_span_ends_with_the_streamed_usage(traced: Any) -> None:
    daemon, receiver = traced
    header, trace_id, _ = traceparent()
    client = client_for(daemon.url, headers={"traceparent": header})
    usage = None
    for chunk in client.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
    assert usage is not None
    upstream = next(s for s in spans_of(receiver, trace_id, 2) if s.kind == CLIENT)
    assert upstream.attributes["gen_ai.request.stream"] is True
    assert upstream.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert upstream.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert upstream.attributes["gen_ai.response.finish_reasons"] == ("stop",)


def test_failed_upstream_attempt_has_error_type(traced: Any) -> None:
    daemon, receiver = traced
    header, trace_id, _ = traceparent()
    r = httpx.post(
        daemon.url + "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "mock:fail"}]},
        headers={**ADMIN, "traceparent": header},
    )
    assert r.status_code == 502
    spans = spans_of(receiver, trace_id, 2)
    upstream = next(s for s in spans if s.kind == CLIENT)
    assert upstream.attributes["error.type"] == "upstream_error"
    assert upstream.status_code == 2  # ERROR
    server = next(s for s in spans if s.kind == SERVER)
    assert server.status_code == 2 and server.attributes["http.response.status_code"] == 502


def test_health_and_metrics_are_not_traced(traced: Any) -> None:
    daemon, receiver = traced
    for path in ("/livez", "/readyz", "/metrics"):
        header, trace_id, _ = traceparent()
        httpx.get(daemon.url + path, headers={**ADMIN, "traceparent": header})
        header2, trace_id2, _ = traceparent()
        httpx.get(daemon.url + "/v1/models", headers={**ADMIN, "traceparent": header2})
        spans_of(receiver, trace_id2, 1)  # a later request's span has arrived...
        with receiver.lock:
            assert not [s for s in receiver.spans if s.trace_id == trace_id], (
                path
            )  # ...this one never will


def test_by_default_every_root_span_is_a_request(traced: Any) -> None:
    """No health-probe rounds and no ledger batches in the trace list, only requests."""
    daemon, receiver = traced
    header, trace_id, _ = traceparent()
    client_for(daemon.url, headers={"traceparent": header}).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}]
    )
    spans_of(receiver, trace_id, 2)
    wait_for(lambda: ledger_rows(daemon.ledger_path))  # a batch was written (and a round run)
    with receiver.lock:
        spans = list(receiver.spans)
    by_id = {s.span_id for s in spans}
    for span in spans:
        if span.parent_span_id in by_id:
            continue  # a child of one of ours
        assert span.kind == SERVER and span.name.startswith(("POST ", "GET ")), span.name
    assert not [s for s in spans if s.name in ("INSERT requests", "health probe round")]


def test_ledger_batches_are_traced_when_asked(make_client: MakeClient) -> None:
    exporter = InMemorySpanExporter()
    config = base_config(monitoring={"tracing": {"enabled": True, "trace_ledger": True}})
    client = make_client(config, span_exporter=exporter)
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}
    assert client.post("/v1/chat/completions", json=body, headers=ADMIN).status_code == 200
    tracing = client.app.state.gateway.tracing  # type: ignore[attr-defined]

    def batch() -> list[ReadableSpan]:
        tracing.force_flush()
        return [s for s in exporter.get_finished_spans() if s.name == "INSERT requests"]

    span = wait_for(batch)[0]
    assert span.kind.name == "CLIENT" and span.parent is None
    assert span.attributes["db.system.name"] == "sqlite"
    assert span.attributes["db.operation.batch.size"] >= 1


def remote_config(receiver: OTLPReceiver, upstream_url: str) -> dict[str, Any]:
    """Traced, with one OpenAI-compatible model served by the fake upstream."""
    config = traced_config(receiver)
    config["models"] = [
        {
            "name": "remote",
            "provider": "openai",
            "model": "up-model",
            "api_base": upstream_url + "/v1",
        }
    ]
    return config


def test_health_probes_are_traced_when_asked_under_one_round_span(tmp_path: Path) -> None:
    state = Upstream()
    with OTLPReceiver() as receiver, ServerThread(openai_upstream(state)) as upstream:
        config = remote_config(receiver, upstream.url)
        config["monitoring"]["tracing"]["trace_probes"] = True
        with running(tmp_path, config, env=FAST_EXPORT):
            probe = receiver.wait_for(lambda s: s.name == "GET" and s.kind == CLIENT)[0]
            round_span = receiver.wait_for(lambda s: s.name == "health probe round")[0]
            assert probe.parent_span_id == round_span.span_id
            assert probe.trace_id == round_span.trace_id and not round_span.parent_span_id
            assert probe.attributes["http.request.method"] == "GET"
            assert probe.attributes["server.port"] == upstream.port
            assert probe.attributes["chatvault.upstream"] == f"openai 127.0.0.1:{upstream.port}"
            assert "error.type" not in probe.attributes


def test_traceparent_sent_upstream_names_the_client_span(tmp_path: Path) -> None:
    state = Upstream()
    with OTLPReceiver() as receiver, ServerThread(openai_upstream(state)) as upstream:
        config = remote_config(receiver, upstream.url)
        with running(tmp_path, config, env=FAST_EXPORT) as daemon:
            header, trace_id, _ = traceparent()
            client = client_for(daemon.url, headers={"traceparent": header})
            client.chat.completions.create(
                model="remote", messages=[{"role": "user", "content": "hi"}]
            )
            upstream_span = next(s for s in spans_of(receiver, trace_id, 2) if s.kind == CLIENT)
            sent = state.posts()[-1].headers["traceparent"]
            _, sent_trace, sent_parent, _ = sent.split("-")
            assert sent_trace == trace_id
            assert sent_parent == upstream_span.span_id
            assert upstream_span.name == "chat up-model"
            assert upstream_span.attributes["server.address"] == "127.0.0.1"
            assert upstream_span.attributes["server.port"] == upstream.port
            assert upstream_span.attributes["gen_ai.provider.name"] == "openai"


def test_collector_down_requests_still_succeed_and_failures_are_counted(tmp_path: Path) -> None:
    receiver = OTLPReceiver().start()
    with running(tmp_path, traced_config(receiver), env=FAST_EXPORT) as daemon:
        client = client_for(daemon.url)
        client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "before"}]
        )
        wait_for(
            lambda: (
                httpx.get(daemon.url + "/admin/traces/status", headers=ADMIN).json()[
                    "spans_exported"
                ]
                >= 2
            )
        )
        receiver.stop()
        for _ in range(20):
            assert client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "during"}]
            ).choices

        def failing() -> dict[str, Any] | None:
            status = httpx.get(daemon.url + "/admin/traces/status", headers=ADMIN).json()
            return status if status["export_failures"] >= 1 else None

        status = wait_for(failing, timeout=30)
        assert status["last_error"]
        assert status["endpoint"] == receiver.endpoint and status["protocol"] == "grpc"
        metrics = httpx.get(daemon.url + "/metrics", headers=ADMIN).text
        assert "chatvault_trace_export_failures_total 0.0" not in metrics
        assert "chatvault_trace_export_failures_total" in metrics
        # Shutdown with the collector down is bounded: SIGTERM, then a clean exit.
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0


def test_content_is_captured_only_when_configured(make_client: MakeClient) -> None:
    exporter = InMemorySpanExporter()
    config = base_config(monitoring={"tracing": {"enabled": True, "capture_content": True}})
    client = make_client(config, span_exporter=exporter)
    body = {"model": "mock", "messages": [{"role": "user", "content": "capture this zebra"}]}
    client.post("/v1/chat/completions", json=body, headers=ADMIN)
    client.post("/v1/chat/completions", json={**body, "stream": True}, headers=ADMIN)
    client.app.state.gateway.tracing.force_flush()  # type: ignore[attr-defined]
    chats = [s for s in exporter.get_finished_spans() if s.name == "chat mock"]
    assert len(chats) == 2
    for span in chats:
        assert "capture this zebra" in span.attributes["gen_ai.input.messages"]
        output = json.loads(span.attributes["gen_ai.output.messages"])
        assert output[0]["role"] == "assistant" and "zebra" in output[0]["parts"][0]["content"]


class _StuckCollector(SpanExporter):
    """A collector that never answers (stands in for a hung network peer)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


def test_a_stuck_collector_bounds_memory_and_counts_drops(make_client: MakeClient) -> None:
    exporter = _StuckCollector()
    config = base_config(monitoring={"tracing": {"enabled": True, "max_queue_size": 20}})
    client = make_client(config, span_exporter=exporter)
    for _ in range(30):
        assert (
            client.post(
                "/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
                headers=ADMIN,
            ).status_code
            == 200
        )
    status = client.get("/admin/traces/status", headers=ADMIN).json()
    assert status["queue_size"] <= status["queue_capacity"] == 20
    assert status["spans_dropped"] > 0


def test_tracing_off_means_no_spans_and_says_so(make_client: MakeClient) -> None:
    exporter = InMemorySpanExporter()
    client = make_client(
        base_config(monitoring={"tracing": {"enabled": True}}),
        env={"OTEL_SDK_DISABLED": "true"},
        span_exporter=exporter,
    )
    client.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
        headers=ADMIN,
    )
    assert not client.app.state.gateway.tracing.enabled  # type: ignore[attr-defined]
    assert client.get("/admin/traces/status", headers=ADMIN).json() == {"enabled": False}
    assert exporter.get_finished_spans() == ()


def test_otel_environment_overrides_the_config() -> None:
    config = TracingConfig(endpoint="http://collector:4317", protocol="grpc", sample_ratio=1.0)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel.example:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-team=ml",
        "OTEL_SERVICE_NAME": "gateway-eu",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.namespace=ai",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    s = resolve(config, env)
    assert s.enabled and s.protocol == "http/protobuf"
    assert s.endpoint == "http://otel.example:4318/v1/traces"
    assert s.headers == {"authorization": "Bearer abc", "x-team": "ml"}
    assert s.service_name == "gateway-eu"
    assert s.resource_attributes == {"deployment.environment": "prod", "service.namespace": "ai"}
    assert "0.25" in s.sampler.get_description()
    assert (s.max_queue_size, s.schedule_delay_s) == (100, 0.2)
    assert resolve(config, {}).endpoint == "http://collector:4317"
    assert not resolve(config, {"OTEL_SDK_DISABLED": "TRUE"}).enabled
    assert (
        resolve(
            TracingConfig(protocol="http/protobuf", endpoint="http://localhost:4318"), {}
        ).endpoint
        == "http://localhost:4318/v1/traces"
    )


# -- what a client may control (#13) ----------------------------------------------------


def _chat_with_traceparent(client: Any, header: str) -> str:
    """One chat request sent with ``header``; its request id."""
    r = client.post(
        "/v1/chat/completions",
        json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
        headers={**ADMIN, "traceparent": header},
    )
    assert r.status_code == 200
    return str(r.headers["x-request-id"])


def _flushed(client: Any, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    client.app.state.gateway.tracing.force_flush()
    return list(exporter.get_finished_spans())


def _ledger_trace_id(tmp_path: Path, request_id: str) -> str:
    rows = wait_for(
        lambda: ledger_rows(tmp_path / "data" / "ledger.db", "request_id = ?", (request_id,))
    )
    return str(rows[0]["trace_id"])


def test_an_untrusted_traceparent_neither_forces_sampling_nor_names_the_trace(
    make_client: MakeClient, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    config = base_config(monitoring={"tracing": {"enabled": True, "sample_ratio": 0.0}})
    client = make_client(config, span_exporter=exporter)
    header, client_trace, _ = traceparent()  # flags 01: "sampled"
    request_id = _chat_with_traceparent(client, header)
    assert _flushed(client, exporter) == []  # sample_ratio 0 holds
    ledger_trace = _ledger_trace_id(tmp_path, request_id)
    assert len(ledger_trace) == 32 and ledger_trace != client_trace


def test_untrusted_context_is_a_link_and_the_ledger_has_our_trace_id(
    make_client: MakeClient, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    client = make_client(
        base_config(monitoring={"tracing": {"enabled": True}}), span_exporter=exporter
    )
    header, client_trace, client_span = traceparent()
    request_id = _chat_with_traceparent(client, header)
    server = next(s for s in _flushed(client, exporter) if s.kind.name == "SERVER")
    assert server.parent is None  # a trace of its own
    (link,) = server.links
    assert isinstance(link, Link)
    assert format(link.context.trace_id, "032x") == client_trace
    assert format(link.context.span_id, "016x") == client_span
    ours = format(server.context.trace_id, "032x")
    assert ours != client_trace
    assert _ledger_trace_id(tmp_path, request_id) == ours


def test_a_trusted_traceparent_is_continued(make_client: MakeClient, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracing = {"enabled": True, "sample_ratio": 0.0, "trust_incoming_context": True}
    client = make_client(base_config(monitoring={"tracing": tracing}), span_exporter=exporter)
    header, client_trace, client_span = traceparent()
    request_id = _chat_with_traceparent(client, header)
    server = next(s for s in _flushed(client, exporter) if s.kind.name == "SERVER")
    assert server.parent is not None and format(server.parent.span_id, "016x") == client_span
    assert _ledger_trace_id(tmp_path, request_id) == client_trace


def test_captured_content_is_capped_per_span(make_client: MakeClient) -> None:
    exporter = InMemorySpanExporter()
    tracing = {"enabled": True, "capture_content": True, "max_content_chars": 200}
    client = make_client(base_config(monitoring={"tracing": tracing}), span_exporter=exporter)
    huge = "zebra " * 20_000  # 120,000 characters
    many = [{"role": "user", "content": "hi"} for _ in range(2_000)]
    for messages in ([{"role": "user", "content": huge}], many):
        for stream in (False, True):
            r = client.post(
                "/v1/chat/completions",
                json={"model": "mock", "messages": messages, "stream": stream},
                headers=ADMIN,
            )
            assert r.status_code == 200
    chats = [s for s in _flushed(client, exporter) if s.name == "chat mock"]
    assert len(chats) == 4
    for span in chats:
        inputs = span.attributes["gen_ai.input.messages"]
        assert len(inputs) <= 200 + 40  # the budget (which counts the JSON around parts)
        assert json.loads(inputs)[0]["role"] == "user"
        assert len(span.attributes["gen_ai.output.messages"]) <= 200 + 80
        assert span.attributes["chatvault.content_truncated"] is True
