"""The hand-written OTLP encoding equals the SDK's; the HTTP transport delivers it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import NonRecordingSpan, SpanContext, TraceState

from daemon.otlp import Encoder, HttpSpanExporter
from tests.helpers import free_port


def make_spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "t", "deployment.environment": "test", "n": 3})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("scope-a", "1.2.3")
    other = provider.get_tracer("scope-b")
    remote = SpanContext(
        0xABC,
        0xDEF,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "x")]),
    )
    parent_ctx = trace.set_span_in_context(NonRecordingSpan(remote))
    server = tracer.start_span(
        "POST /v1/chat/completions",
        context=parent_ctx,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "POST",
            "http.response.status_code": 200,
            "ratio": 0.25,
            "ok": True,
            "finish": ("stop", "length"),
            "counts": (1, 2),
            "unicode": "zébrä ✓",
            "negative": -7,
            "big": 2**40,
        },
    )
    server.add_event("rate_limited", {"retry": 1.5})
    client = tracer.start_span(
        "chat m",
        context=trace.set_span_in_context(server),
        kind=SpanKind.CLIENT,
        links=[Link(remote, {"why": "retry"})],
    )
    client.set_status(Status(StatusCode.ERROR, "upstream_error"))
    client.end()
    server.end()
    lone = other.start_span("INSERT requests", kind=SpanKind.INTERNAL)
    lone.end()
    return list(memory.get_finished_spans())


def test_encoding_parses_to_the_same_request_as_the_sdks() -> None:
    spans = make_spans()
    ours = ExportTraceServiceRequest.FromString(Encoder().encode(spans))
    reference = encode_spans(spans)
    assert ours == reference
    # Encoded twice with the same encoder (cached resource and scopes): same bytes.
    encoder = Encoder()
    assert encoder.encode(spans) == encoder.encode(spans)


class _Collector(BaseHTTPRequestHandler):
    received: list[bytes] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(body)
        assert self.headers["content-type"] == "application/x-protobuf"
        assert self.headers["x-team"] == "ml"
        self.send_response(type(self).status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_http_exporter_delivers_and_reports_failures() -> None:
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exporter = HttpSpanExporter(
            f"http://127.0.0.1:{port}/v1/traces", headers={"x-team": "ml"}, timeout_s=2
        )
        spans = make_spans()
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        (body,) = _Collector.received
        assert ExportTraceServiceRequest.FromString(body) == encode_spans(spans)
        _Collector.status = 400  # not retryable
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert exporter.last_error is not None and "HTTP 400" in exporter.last_error
        exporter.shutdown()
    finally:
        server.shutdown()
    dead = HttpSpanExporter(f"http://127.0.0.1:{free_port()}/v1/traces", headers={}, timeout_s=0.6)
    assert dead.export(spans) is SpanExportResult.FAILURE
    assert dead.last_error is not None and "ConnectionRefused" in dead.last_error
