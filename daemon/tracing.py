"""OpenTelemetry tracing: one SERVER span per request, one CLIENT span per upstream attempt.

``Tracing`` owns a ``TracerProvider`` per app (never the global one), its exporter
and its export status. When tracing is off the app gets ``NullTracing`` instead (the
OpenTelemetry API's no-op tracer is the model): the same methods, spans that record
nothing, so the request path never asks whether tracing is on. The settings come from
config.yaml and the OTEL_* variables (``daemon/otel_env.py``).

Upstream spans follow the OpenTelemetry GenAI semantic conventions (``chat {model}``,
``gen_ai.*`` attributes), and the traceparent sent upstream names that span. Prompt
and completion text is recorded only with ``monitoring.tracing.capture_content``.

    tracing = Tracing.create(settings.monitoring.tracing, environ)
    span = instrument_chat_completion(tracing, usage, provider=..., ...)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from daemon import __version__
from daemon.config import TracingConfig
from daemon.otel_env import TraceSettings, resolve
from daemon.otlp import GrpcSpanExporter, HttpSpanExporter
from daemon.trace_export import ExportingSpanProcessor, ExportStatus
from daemon.usage import Usage

# gen_ai.request.* attributes from the OpenAI request parameters.
_REQUEST_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}
# Provider labels to the conventions' gen_ai.provider.name values where they differ.
_PROVIDER_NAMES = {
    "bedrock": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "azure": "azure.ai.openai",
    "mistral": "mistral_ai",
}


def _exporter(s: TraceSettings) -> SpanExporter:
    if s.protocol == "http/protobuf":
        return HttpSpanExporter(s.endpoint, headers=s.headers, timeout_s=s.export_timeout_s)
    return GrpcSpanExporter(s.endpoint, headers=s.headers, timeout_s=s.export_timeout_s)


class Tracing:
    enabled = True

    def __init__(self, settings: TraceSettings, exporter: SpanExporter) -> None:
        self.settings = settings
        self.status = ExportStatus(settings.endpoint, settings.protocol, settings.max_queue_size)
        resource = Resource.create(
            {
                **settings.resource_attributes,
                "service.name": settings.service_name,
                "service.version": __version__,
            }
        )
        self.provider = TracerProvider(resource=resource, sampler=settings.sampler)
        self.processor = ExportingSpanProcessor(
            exporter,
            self.status,
            schedule_delay_s=settings.schedule_delay_s,
            max_batch_size=settings.max_batch_size,
            shutdown_timeout_s=min(settings.export_timeout_s, 3.0),
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("chatvault", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.capture_content = settings.capture_content

    @classmethod
    def create(
        cls, config: TracingConfig, environ: Mapping[str, str], exporter: SpanExporter | None = None
    ) -> Tracing | NullTracing:
        settings = resolve(config, environ)
        if not settings.enabled:
            return NullTracing()
        return cls(settings, exporter or _exporter(settings))

    @property
    def export_status(self) -> ExportStatus | None:
        return self.status

    def force_flush(self) -> None:
        self.processor.force_flush()

    def shutdown(self) -> None:
        self.provider.shutdown()

    def inject(self, span: Span, carrier: dict[str, str]) -> None:
        """Put a traceparent naming ``span`` into outgoing headers."""
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))


class NullTracing:
    """Tracing switched off: a no-op tracer, nothing exported, nothing to flush."""

    enabled = False
    capture_content = False
    export_status: ExportStatus | None = None

    def __init__(self) -> None:
        self.tracer: trace.Tracer = trace.NoOpTracer()

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        return None

    def inject(self, span: Span, carrier: dict[str, str]) -> None:
        return None


AnyTracing = Tracing | NullTracing


def start_span(
    tracer: trace.Tracer,
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    context: Context | None = None,
) -> Span:
    """Start a span, then set its attributes in one call.

    Passed to ``start_span`` itself, attributes are validated twice (once more for the
    sampler's result): the biggest part of a span's cost on the request path.
    """
    span = tracer.start_span(name, context=context, kind=kind, record_exception=False)
    if span.is_recording():
        span.set_attributes(attributes)
    return span


# -- instrumentation, one function per kind of work -------------------------------------------


def instrument_external_api_call(
    tracing: AnyTracing,
    name: str,
    *,
    server_address: str | None,
    server_port: int | None,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """Start a CLIENT span for a call leaving the gateway (upstream model, health probe).

    The caller ends it; as the current span's child it joins the request's trace.
    """
    attrs: dict[str, Any] = dict(attributes or {})
    if server_address:
        attrs["server.address"] = server_address
    if server_port:
        attrs["server.port"] = server_port
    return start_span(tracing.tracer, name, kind=SpanKind.CLIENT, attributes=attrs)


def instrument_chat_completion(
    tracing: AnyTracing,
    usage: Usage,
    *,
    provider: str,
    upstream_model: str,
    server_address: str | None,
    server_port: int | None,
    body: Mapping[str, Any],
) -> Span:
    """Start the GenAI CLIENT span for one upstream attempt (``chat {model}``)."""
    operation = "chat" if usage.operation == "chat" else "embeddings"
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": _PROVIDER_NAMES.get(provider, provider),
        "gen_ai.request.model": upstream_model,
        "chatvault.user_type": usage.user_type,
        "chatvault.key_id": usage.key_id,
    }
    if operation == "chat":
        attrs["gen_ai.request.stream"] = usage.stream
    for param, attribute in _REQUEST_PARAMS.items():
        value = body.get(param)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[attribute] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = tuple(stop)
    if tracing.capture_content and operation == "chat":
        attrs["gen_ai.input.messages"] = orjson.dumps(body.get("messages") or []).decode()
    return instrument_external_api_call(
        tracing,
        f"{operation} {upstream_model}",
        server_address=server_address,
        server_port=server_port,
        attributes=attrs,
    )


def output_messages(text: str, finish_reasons: tuple[str, ...]) -> str:
    """``gen_ai.output.messages`` for one assistant reply."""
    message = {
        "role": "assistant",
        "parts": [{"type": "text", "content": text}],
        "finish_reason": finish_reasons[0] if finish_reasons else "stop",
    }
    return orjson.dumps([message]).decode()


def end_chat_completion(
    span: Span, usage: Usage, *, error: str | None = None, output: str | None = None
) -> None:
    """Put the outcome on an upstream span and end it."""
    if not span.is_recording():
        span.end()
        return
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.tokens.input,
        "gen_ai.usage.output_tokens": usage.tokens.output,
        "chatvault.cost_usd": usage.cost_usd,
    }
    if usage.response_model:
        attrs["gen_ai.response.model"] = usage.response_model
    if usage.response_id:
        attrs["gen_ai.response.id"] = usage.response_id
    if usage.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = usage.finish_reasons
    if output is not None:
        attrs["gen_ai.output.messages"] = output
    if error is not None:
        attrs["error.type"] = error
        span.set_status(Status(StatusCode.ERROR, error))
    span.set_attributes(attrs)
    span.end()


def instrument_authentication(
    result: str, principal_key_id: str | None = None, user_type: str | None = None
) -> None:
    """Record the authentication outcome on the current (server) span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attrs = {"chatvault.auth.result": result}
    if principal_key_id is not None:
        attrs["chatvault.key_id"] = principal_key_id
    if user_type is not None:
        attrs["chatvault.user_type"] = user_type
    span.set_attributes(attrs)  # one call: each takes the span's lock


def instrument_rate_limiting(
    allowed: bool, limit_type: str | None = None, retry_after_s: float | None = None
) -> None:
    """Record the limit decision on the current (server) span; a refusal is an event."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("chatvault.rate_limit.allowed", allowed)
    if not allowed:
        span.add_event(
            "rate_limited",
            {
                "chatvault.rate_limit.type": limit_type or "",
                "chatvault.rate_limit.retry_after_s": retry_after_s or 0.0,
            },
        )


@contextmanager
def instrument_database_operation(
    tracing: AnyTracing, operation: str, table: str, *, system: str, rows: int | None = None
) -> Iterator[Span]:
    """A CLIENT span around a ledger operation (the writer's batches)."""
    attrs: dict[str, Any] = {
        "db.system.name": system,
        "db.operation.name": operation,
        "db.collection.name": table,
    }
    if rows is not None:
        attrs["db.operation.batch.size"] = rows
    span = start_span(
        tracing.tracer, f"{operation} {table}", kind=SpanKind.CLIENT, attributes=attrs
    )
    try:
        yield span
    except BaseException as exc:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        raise
    finally:
        span.end()
