"""OpenTelemetry tracing: one SERVER span per request, one CLIENT span per upstream attempt.

``Tracing`` owns a ``TracerProvider`` per app (never the global one), its exporter
and its export status. The standard ``OTEL_*`` variables override config.yaml, as
operators expect in containers. When tracing is off there is no ``Tracing`` object
at all: no middleware, no spans, nothing per request.

Upstream spans follow the OpenTelemetry GenAI semantic conventions (``chat {model}``,
``gen_ai.*`` attributes), and the traceparent sent upstream names that span. Prompt
and completion text is recorded only with ``monitoring.tracing.capture_content``.

    tracing = Tracing.create(settings.monitoring.tracing, environ)
    app = TracingMiddleware(app, tracing)
    span = instrument_chat_completion(tracing, usage, deployment, call)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon import __version__
from daemon.config import TracingConfig
from daemon.context import StatusRecorder, route_template
from daemon.otlp import GrpcSpanExporter, HttpSpanExporter
from daemon.trace_export import ExportingSpanProcessor, ExportStatus
from daemon.usage import Usage

log = logging.getLogger("chatvault.tracing")

UNTRACED = frozenset({"/metrics", "/livez", "/readyz", "/health"})
_TRUE = ("true", "1", "yes", "on")
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


@dataclass(frozen=True)
class TraceSettings:
    """Config merged with the OTEL_* environment."""

    enabled: bool
    endpoint: str
    protocol: str  # grpc | http/protobuf
    headers: dict[str, str]
    service_name: str
    resource_attributes: dict[str, str]
    sampler: Sampler
    capture_content: bool
    user_id_header: bytes | None
    export_timeout_s: float
    max_queue_size: int
    schedule_delay_s: float
    max_batch_size: int


def _pairs(value: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (values URL-encoded), as OTEL_*_HEADERS and OTEL_RESOURCE_ATTRIBUTES."""
    out = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(val.strip())
    return out


def _sampler(name: str | None, arg: str | None, default_ratio: float) -> Sampler:
    ratio = default_ratio
    if arg:
        try:
            ratio = min(max(float(arg), 0.0), 1.0)
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using %s", arg, ratio)
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name:
        if name in samplers:
            return samplers[name]
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported; using parentbased_traceidratio", name)
    return ParentBased(TraceIdRatioBased(ratio)) if ratio < 1.0 else ParentBased(ALWAYS_ON)


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(environ[name])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


def resolve(config: TracingConfig, environ: Mapping[str, str]) -> TraceSettings:
    """The effective settings: OTEL_* variables win over the config file."""
    e = environ
    enabled = config.enabled and e.get("OTEL_SDK_DISABLED", "").strip().lower() not in _TRUE
    protocol = (
        e.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or e.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or config.protocol
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        log.warning("OTLP protocol %r is not supported; using grpc", protocol)
        protocol = "grpc"
    endpoint = e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        endpoint = e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint and protocol == "http/protobuf":
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # the spec appends the signal path
    if not endpoint:
        endpoint = config.endpoint
        if protocol == "http/protobuf" and not urlsplit(endpoint).path.strip("/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    headers = dict(config.headers)
    headers.update(_pairs(e.get("OTEL_EXPORTER_OTLP_HEADERS", "")))
    headers.update(_pairs(e.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")))
    resource = _pairs(e.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    service = (
        e.get("OTEL_SERVICE_NAME") or resource.pop("service.name", None) or config.service_name
    )
    return TraceSettings(
        enabled=enabled,
        endpoint=endpoint,
        protocol=protocol,
        headers=headers,
        service_name=service,
        resource_attributes=resource,
        sampler=_sampler(
            e.get("OTEL_TRACES_SAMPLER"), e.get("OTEL_TRACES_SAMPLER_ARG"), config.sample_ratio
        ),
        capture_content=config.capture_content,
        user_id_header=config.user_id_header.lower().encode() if config.user_id_header else None,
        export_timeout_s=_positive(e, "OTEL_BSP_EXPORT_TIMEOUT", config.export_timeout_s * 1000)
        / 1000,
        max_queue_size=int(_positive(e, "OTEL_BSP_MAX_QUEUE_SIZE", config.max_queue_size)),
        schedule_delay_s=_positive(e, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000,
        max_batch_size=int(_positive(e, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
    )


def _exporter(s: TraceSettings) -> SpanExporter:
    if s.protocol == "http/protobuf":
        return HttpSpanExporter(s.endpoint, headers=s.headers, timeout_s=s.export_timeout_s)
    return GrpcSpanExporter(s.endpoint, headers=s.headers, timeout_s=s.export_timeout_s)


class Tracing:
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
    ) -> Tracing | None:
        settings = resolve(config, environ)
        if not settings.enabled:
            return None
        return cls(settings, exporter or _exporter(settings))

    def shutdown(self) -> None:
        self.provider.shutdown()

    def inject(self, span: Span, carrier: dict[str, str]) -> None:
        """Put a traceparent naming ``span`` into outgoing headers."""
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))


def start_span(
    tracer: trace.Tracer,
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    context: otel_context.Context | None = None,
) -> Span:
    """Start a span, then set its attributes in one call.

    Passed to ``start_span`` itself, attributes are validated twice (once more for the
    sampler's result): the biggest part of a span's cost on the request path.
    """
    span = tracer.start_span(name, context=context, kind=kind, record_exception=False)
    if span.is_recording():
        span.set_attributes(attributes)
    return span


# -- the seed's instrumentation functions -------------------------------------------


def instrument_external_api_call(
    tracing: Tracing,
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
    tracing: Tracing,
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
    tracing: Tracing | None, operation: str, table: str, *, system: str, rows: int | None = None
) -> Iterator[Span | None]:
    """A CLIENT span around a ledger operation (the writer's batches)."""
    if tracing is None:
        yield None
        return
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


# -- the middleware ---------------------------------------------------------------------


class TracingMiddleware:
    """One SERVER span per request, continuing an incoming W3C traceparent."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.user_header = tracing.settings.user_id_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        attrs: dict[str, Any] = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        for name, value in scope["headers"]:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode()] = value.decode("latin-1")
            elif name == b"user-agent":
                attrs["user_agent.original"] = value.decode("latin-1")
            elif name == self.user_header:
                attrs["user.id"] = value.decode("latin-1")[:256]
        client = scope.get("client")
        if client:
            attrs["client.address"] = client[0]
        parent = self.tracing.propagator.extract(carrier) if carrier else None
        span = start_span(
            self.tracer, scope["method"], context=parent, kind=SpanKind.SERVER, attributes=attrs
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        state = scope.setdefault("state", {})
        state["trace_id"] = format(span.get_span_context().trace_id, "032x")
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            if span.is_recording():
                status_code = recorder.status
                route = route_template(scope)
                end: dict[str, Any] = {"http.response.status_code": status_code}
                if route != "unmatched":
                    span.update_name(f"{scope['method']} {route}")
                    end["http.route"] = route
                if status_code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    end["error.type"] = str(status_code)
                span.set_attributes(end)
            span.end()
            otel_context.detach(token)
