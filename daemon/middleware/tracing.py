"""One SERVER span per request, continuing an incoming W3C traceparent (pure ASGI)."""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.middleware.asgi import StatusRecorder, route_template
from daemon.tracing import Tracing, start_span

# Probes and scrapes are not traffic.
UNTRACED = frozenset({"/metrics", "/livez", "/readyz", "/health"})


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
