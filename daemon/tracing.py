"""OpenTelemetry tracing: one SERVER span per request, one CLIENT span per upstream attempt.

``Tracing`` owns a ``TracerProvider`` per app (never the global one), its exporter
and its export status. When tracing is off the app gets ``NullTracing`` instead (the
OpenTelemetry API's no-op tracer is the model): the same methods, spans that record
nothing, so the request path never asks whether tracing is on. The settings come from
config.yaml and the OTEL_* variables (``daemon/otel_env.py``).

Upstream spans follow the OpenTelemetry GenAI semantic conventions (``chat {model}``,
``gen_ai.*`` attributes), and the traceparent sent upstream names that span. Prompt
and completion text is recorded only with ``monitoring.tracing.capture_content``, in
the conventions' message shapes (``genai_content.py``), bounded per span. Health probes
and ledger batches are traced only when configured: by default every root span is a
request.

    tracing = Tracing.create(settings.monitoring.tracing, environ)
    span = instrument_chat_completion(tracing, usage, provider=..., ...)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from daemon import __version__, genai_content
from daemon.config import TracingConfig
from daemon.otel_env import TraceSettings, resolve
from daemon.otlp import GrpcSpanExporter, HttpSpanExporter
from daemon.trace_export import ExportingSpanProcessor, ExportStatus
from daemon.usage import Usage

# gen_ai.request.* attributes from the OpenAI chat request parameters (``n`` is apart:
# the conventions want gen_ai.request.choice.count only when it is not 1).
_REQUEST_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
# usage.operation to gen_ai.operation.name (the body sent upstream is chat-shaped).
_OPERATION_NAMES = {
    "chat": "chat",
    "responses": "chat",
    "text_completion": "text_completion",
    "embeddings": "embeddings",
}
# Provider labels (ours and litellm's) to the conventions' registered
# gen_ai.provider.name values where they differ; others are sent as they are.
_PROVIDER_NAMES = {
    "bedrock": "aws.bedrock",
    "bedrock_converse": "aws.bedrock",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "azure": "azure.ai.openai",
    "azure_text": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "mistral": "mistral_ai",
    "codestral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
    "watsonx_text": "ibm.watsonx.ai",
    "moonshot": "moonshot_ai",
    "cohere_chat": "cohere",
    "text-completion-openai": "openai",
}
# response_format.type to gen_ai.output.type.
_OUTPUT_TYPES = {"text": "text", "json_object": "json", "json_schema": "json"}
# The client's conversation id, put into the request's context by the middleware.
CONVERSATION_ID = otel_context.create_key("chatvault.conversation_id")


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
        self.max_content_chars = settings.max_content_chars
        self.trace_probes = settings.trace_probes
        self.trace_ledger = settings.trace_ledger

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
    max_content_chars = 0
    trace_probes = False
    trace_ledger = False
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
    links: list[Link] | None = None,
) -> Span:
    """Start a span, then set its attributes in one call.

    Passed to ``start_span`` itself, attributes are validated twice (once more for the
    sampler's result): the biggest part of a span's cost on the request path. So a
    sampler sees a span's name, kind, parent and links, not its attributes.
    """
    span = tracer.start_span(name, context=context, kind=kind, links=links, record_exception=False)
    if span.is_recording():
        span.set_attributes(attributes)
    return span


# -- instrumentation, one function per kind of work -------------------------------------------


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
    """Start the GenAI CLIENT span for one upstream attempt (``chat {model}``).

    Attributes are built only for a span that records: an unsampled request pays for
    the span alone.
    """
    # The conventions' well-known names: a Responses API call is a chat.
    operation = _OPERATION_NAMES.get(usage.operation, "chat")
    span = tracing.tracer.start_span(
        f"{operation} {upstream_model}", kind=SpanKind.CLIENT, record_exception=False
    )
    if not span.is_recording():
        return span
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": _PROVIDER_NAMES.get(provider, provider),
        "gen_ai.request.model": upstream_model,
        "chatvault.user_type": usage.user_type,
        "chatvault.key_id": usage.key_id,
    }
    if server_address:
        attrs["server.address"] = server_address
    if server_port:
        attrs["server.port"] = server_port
    conversation = otel_context.get_value(CONVERSATION_ID)
    if conversation is not None:
        attrs["gen_ai.conversation.id"] = conversation
    if operation == "embeddings":
        _embeddings_request(attrs, body)
    else:  # the body sent upstream is chat-shaped
        _chat_request(attrs, usage, body)
        if tracing.capture_content:
            messages, cut = genai_content.input_messages(
                body.get("messages"), tracing.max_content_chars
            )
            attrs["gen_ai.input.messages"] = messages
            if cut:
                attrs["chatvault.content_truncated"] = True
    span.set_attributes(attrs)  # one call: each takes the span's lock
    return span


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chat_request(attrs: dict[str, Any], usage: Usage, body: Mapping[str, Any]) -> None:
    if usage.stream:
        attrs["gen_ai.request.stream"] = True  # the conventions: set only when streaming
    for param, attribute in _REQUEST_PARAMS.items():
        value = body.get(param)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[attribute] = value
    n = body.get("n")
    if _int(n) and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = tuple(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        output_type = _OUTPUT_TYPES.get(str(response_format.get("type")))
        if output_type is not None:
            attrs["gen_ai.output.type"] = output_type


def _embeddings_request(attrs: dict[str, Any], body: Mapping[str, Any]) -> None:
    encoding = body.get("encoding_format")
    if isinstance(encoding, str):
        attrs["gen_ai.request.encoding_formats"] = (encoding,)
    dimensions = body.get("dimensions")
    if _int(dimensions):
        attrs["gen_ai.embeddings.dimension.count"] = dimensions


def _output(usage: Usage, max_chars: int, error: str | None) -> tuple[str, bool] | None:
    """The captured reply as ``gen_ai.output.messages``; the captured copy is let go."""
    if usage.output_body is not None:
        body, usage.output_body = usage.output_body, None
        return genai_content.output_from_body(body, max_chars)
    if usage.output_text is not None:
        text, usage.output_text = usage.output_text, None
        return genai_content.output_from_text(
            text, usage.finish_reasons, max_chars, error=error is not None
        )
    return None


def end_chat_completion(
    span: Span, usage: Usage, *, error: str | None = None, max_content_chars: int = 0
) -> None:
    """Put the outcome on an upstream span and end it.

    Token counts are set when known: on success, or when a failed call still reported
    (or was estimated to have used) some. The output messages come from the content
    captured on ``usage`` (``capture_content``), bounded by ``max_content_chars``.
    """
    if not span.is_recording():
        usage.output_body = usage.output_text = None
        span.end()
        return
    attrs: dict[str, Any] = {}
    tokens = usage.tokens
    if error is None or tokens.input or tokens.output:
        attrs["gen_ai.usage.input_tokens"] = tokens.input
        if usage.operation != "embeddings":  # not an embeddings attribute
            attrs["gen_ai.usage.output_tokens"] = tokens.output
        attrs["chatvault.cost_usd"] = usage.cost_usd
    if tokens.cached:
        attrs["gen_ai.usage.cache_read.input_tokens"] = tokens.cached
    if tokens.reasoning:
        attrs["gen_ai.usage.reasoning.output_tokens"] = tokens.reasoning
    if usage.estimated_reason:
        attrs["chatvault.tokens_estimated"] = usage.estimated_reason
    if usage.response_model:
        attrs["gen_ai.response.model"] = usage.response_model
    if usage.response_id:
        attrs["gen_ai.response.id"] = usage.response_id
    if usage.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = usage.finish_reasons
    if usage.stream and usage.ttft_s is not None and usage.attempt_started:
        # From this attempt's start (the span's), not from the request's arrival.
        attrs["gen_ai.response.time_to_first_chunk"] = max(
            usage.perf_start + usage.ttft_s - usage.attempt_started, 0.0
        )
    if max_content_chars:
        output = _output(usage, max_content_chars, error)
        if output is not None:
            attrs["gen_ai.output.messages"] = output[0]
            if output[1]:
                attrs["chatvault.content_truncated"] = True
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
