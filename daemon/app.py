"""The app factory. Nothing happens at import; every resource lives in the lifespan.

    app = create_app(load_config(Path("config.yaml")))
    uvicorn.run(app)

Edges are injected, so tests need no monkeypatching: ``clock`` (wall time for limits
and timestamps), ``store`` and ``limiter``, ``environ`` (upstream keys, admin key, OTEL_* variables), ``registry``
(the Prometheus registry; a fresh one per app by default, never the global one),
``span_exporter`` (where spans go; default: OTLP as configured).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware

from daemon import api
from daemon.config import Settings
from daemon.context import RequestContextMiddleware
from daemon.gateway import Gateway
from daemon.ledger.base import Store
from daemon.limits import Limiter
from daemon.metrics import MetricsCollector, MetricsMiddleware
from daemon.tracing import Tracing, TracingMiddleware


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    store: Store | None = None,
    limiter: Limiter | None = None,
    registry: CollectorRegistry | None = None,
    span_exporter: SpanExporter | None = None,
) -> Starlette:
    environ = os.environ if environ is None else environ
    tracing = Tracing.create(settings.monitoring.tracing, environ, span_exporter)
    metrics = None
    if settings.monitoring.metrics.enabled:
        metrics = MetricsCollector(registry if registry is not None else CollectorRegistry())
    gateway = Gateway(
        settings,
        environ=environ,
        clock=clock,
        store=store,
        limiter=limiter,
        metrics=metrics,
        tracing=tracing,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    middleware = [
        Middleware(
            RequestContextMiddleware,
            header=settings.server.request_id_header,
            access_log=settings.server.access_log,
        ),
    ]
    if metrics is not None:
        # Disabled metrics cost nothing: no middleware, no endpoint.
        middleware.append(Middleware(MetricsMiddleware, collector=metrics))
    if tracing is not None:
        middleware.append(Middleware(TracingMiddleware, tracing=tracing))
    app = Starlette(
        routes=api.routes(metrics_enabled=metrics is not None),
        middleware=middleware,
        exception_handlers=api.exception_handlers,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
