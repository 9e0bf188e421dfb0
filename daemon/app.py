"""The app factory. Nothing happens at import; every resource lives in the lifespan.

    app = create_app(load_config(Path("config.yaml")))
    uvicorn.run(app)

Edges are injected, so tests need no monkeypatching: ``environ`` (upstream keys, the
admin key, OTEL_* variables, PROMETHEUS_MULTIPROC_DIR: every read of the environment
goes through it), ``clock`` (wall time for timestamps), ``store`` and ``quota`` (limits and budgets),
``registry`` (the Prometheus registry; a fresh one per app by default, never the
global one) and ``span_exporter`` (where spans go; default: OTLP as configured).
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
from daemon.gateway import Gateway
from daemon.ledger.base import Store
from daemon.metrics import AnyMetrics, MetricsCollector, NullMetrics
from daemon.middleware.metrics import MetricsMiddleware
from daemon.middleware.request_context import RequestContextMiddleware
from daemon.middleware.tracing import TracingMiddleware
from daemon.quota import Quota
from daemon.tracing import Tracing


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    store: Store | None = None,
    quota: Quota | None = None,
    registry: CollectorRegistry | None = None,
    span_exporter: SpanExporter | None = None,
) -> Starlette:
    environ = os.environ if environ is None else environ
    tracing = Tracing.create(settings.monitoring.tracing, environ, span_exporter)
    metrics: AnyMetrics = NullMetrics()
    middleware = [
        Middleware(
            RequestContextMiddleware,
            header=settings.server.request_id_header,
            access_log=settings.server.access_log,
        ),
    ]
    # Switched-off telemetry costs nothing per request: no middleware, no endpoint,
    # and null objects for the code that records.
    if settings.monitoring.metrics.enabled:
        collector = MetricsCollector(
            registry if registry is not None else CollectorRegistry(),
            multiprocess_dir=environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
        )
        middleware.append(Middleware(MetricsMiddleware, collector=collector))
        metrics = collector
    if isinstance(tracing, Tracing):
        middleware.append(Middleware(TracingMiddleware, tracing=tracing))
    gateway = Gateway(
        settings,
        environ=environ,
        clock=clock,
        store=store,
        quota=quota,
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

    app = Starlette(
        routes=api.routes(metrics_enabled=metrics.enabled),
        middleware=middleware,
        exception_handlers=api.exception_handlers,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
