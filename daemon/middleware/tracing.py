"""One SERVER span per request (pure ASGI).

An incoming W3C ``traceparent`` is continued only with
``monitoring.tracing.trust_incoming_context``; otherwise the request starts its own
trace, so a client can neither force sampling nor choose the trace id that the ledger
and the access log record, and the client's context is kept as a span link.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.middleware.asgi import StatusRecorder, route_template
from daemon.tracing import CONVERSATION_ID, Tracing, start_span

# Probes and scrapes are not traffic.
UNTRACED = frozenset({"/metrics", "/livez", "/readyz", "/health"})
# A client's conversation (session, thread) id, for gen_ai.conversation.id.
CONVERSATION_HEADER = b"x-chatvault-conversation-id"


class TracingMiddleware:
    """One SERVER span per request; continues an incoming traceparent if trusted."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.user_header = tracing.settings.user_id_header
        self.trust = tracing.settings.trust_incoming_context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        conversation: str | None = None
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
            elif name == CONVERSATION_HEADER:
                conversation = value.decode("latin-1")[:256]
        client = scope.get("client")
        if client:
            attrs["client.address"] = client[0]
        parent = links = None
        if carrier:
            incoming = self.tracing.propagator.extract(carrier)
            if self.trust:
                parent = incoming
            else:
                remote = trace.get_current_span(incoming).get_span_context()
                if remote.is_valid:
                    links = [Link(remote)]
        span = start_span(
            self.tracer,
            scope["method"],
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attrs,
            links=links,
        )
        context = trace.set_span_in_context(span, parent)
        if conversation:
            context = otel_context.set_value(CONVERSATION_ID, conversation, context)
        token = otel_context.attach(context)
        state = scope.setdefault("state", {})
        # Our own span's trace id, whatever the client sent: the ledger and the log join on it.
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
