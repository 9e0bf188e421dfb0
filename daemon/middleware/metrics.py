"""Counts and times every HTTP request by route template, as pure ASGI: streams pass untouched."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.metrics import MetricsCollector
from daemon.middleware.asgi import StatusRecorder, route_template

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """``app = MetricsMiddleware(app, collector)``"""

    def __init__(self, app: ASGIApp, collector: MetricsCollector) -> None:
        self.app = app
        self.collector = collector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":  # the scrape itself is not traffic
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        in_flight = self.collector.in_flight
        in_flight.inc()
        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            in_flight.dec()
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.collector.record_http_request(
                method, route_template(scope), recorder.status, time.perf_counter() - started
            )
