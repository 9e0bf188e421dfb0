"""Prometheus metrics: the collector, its pure-ASGI middleware, and the exposition.

``MetricsCollector`` owns its ``CollectorRegistry`` (injected; never the process-wide
default), so two apps in one process, and every test, see only their own series. All
request-level figures come from the one ``Usage`` record per request, the same one
the ledger stores, so the two cannot disagree.

    collector = MetricsCollector(CollectorRegistry())
    collector.record_usage(usage)
    body, content_type = collector.exposition(accept_header)

With several worker processes, prometheus_client's multiprocess mode keeps each
worker's values in a private directory and ``exposition`` sums them per scrape.

Labels are bounded sets (model, provider, user_type, token_type, status, endpoint
template): never a key, a user, an IP or a raw path. A model name that is not in the
config is reported as ``unknown``, so clients cannot create series.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon import __version__
from daemon.context import StatusRecorder, route_template
from daemon.health import RANK, overall
from daemon.ledger.base import DayStats
from daemon.trace_export import ExportStatus
from daemon.usage import TokenCounts, Usage

# GenAI semantic-convention bucket sets, extended where LLM calls run long.
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
    163.84,
    327.68,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
)
TPOT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
# The gateway's own time: sub-millisecond when healthy.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

UNKNOWN = "unknown"
# Routes that are not API traffic, kept out of the HTTP request metrics.
_UNMEASURED = frozenset({"/metrics"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class MetricsCollector:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double every counter's series in the text format and no
        # dashboard reads them; the library's switch for them is process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        def gauge(name: str, doc: str, labels: Sequence[str] = (), mode: str = "livesum") -> Gauge:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)  # type: ignore[arg-type]

        model_labels = ("model", "provider")
        # HTTP
        self.http_requests = counter(
            "chatvault_http_requests",
            "HTTP requests answered, by route template and status code.",
            ("method", "endpoint", "status_code"),
        )
        self.http_duration = histogram(
            "chatvault_http_request_duration_seconds",
            "HTTP request duration, until the last byte of the response (streams included).",
            ("method", "endpoint"),
            DURATION_BUCKETS,
        )
        self.in_flight = gauge(
            "chatvault_http_requests_in_flight", "HTTP requests being served right now."
        )
        # Model requests (from the Usage record)
        self.tokens = counter(
            "chatvault_tokens_processed",
            "Tokens processed, by token type (input, output, cached, reasoning). Cached is part of input; reasoning is part of output.",
            ("model", "provider", "user_type", "token_type"),
        )
        self.cost = counter(
            "chatvault_requests_cost",
            "Cost of model requests in USD.",
            ("model", "provider", "user_type"),
        )
        self.model_requests = counter(
            "chatvault_model_requests",
            "Model requests by outcome: status is success or the error kind.",
            ("model", "provider", "status"),
        )
        self.request_duration = histogram(
            "chatvault_model_request_duration_seconds",
            "Model request duration as the client saw it, arrival to last byte; outcome is success or error.",
            ("model", "provider", "user_type", "outcome"),
            DURATION_BUCKETS,
        )
        self.upstream_latency = histogram(
            "chatvault_upstream_latency_seconds",
            "Time spent waiting on the upstream, whole stream included.",
            model_labels,
            DURATION_BUCKETS,
        )
        self.ttft = histogram(
            "chatvault_time_to_first_token_seconds",
            "Time from arrival to the first streamed token sent to the client.",
            ("model", "provider", "user_type"),
            TTFT_BUCKETS,
        )
        self.tpot = histogram(
            "chatvault_time_per_output_token_seconds",
            "Streaming decode time per output token after the first.",
            model_labels,
            TPOT_BUCKETS,
        )
        self.overhead = histogram(
            "chatvault_gateway_overhead_seconds",
            "The gateway's own share of a request: total duration minus upstream time.",
            model_labels,
            OVERHEAD_BUCKETS,
        )
        # Access control
        self.rate_limited = counter(
            "chatvault_rate_limit_violations",
            "Requests refused by a limit: rpm, tpm or budget.",
            ("limit_type", "user_type"),
        )
        self.auth_attempts = counter(
            "chatvault_auth_attempts",
            "Authentication attempts by method (bearer or none) and result.",
            ("method", "result"),
        )
        # Ledger
        self.db_duration = histogram(
            "chatvault_db_query_duration_seconds",
            "Ledger database operations.",
            ("operation", "table"),
            DB_BUCKETS,
        )
        self.ledger_queue = gauge(
            "chatvault_ledger_queue_depth", "Ledger rows waiting to be written."
        )
        self.ledger_rows = counter("chatvault_ledger_rows_written", "Ledger rows written.")
        self.ledger_failures = counter(
            "chatvault_ledger_write_failures",
            "Ledger batch writes that failed (their rows are kept and retried).",
        )
        self.ledger_dropped = counter(
            "chatvault_ledger_rows_dropped", "Ledger rows dropped because the queue was full."
        )
        # Business gauges, refreshed from the ledger at a modest interval
        self.active_keys = gauge(
            "chatvault_active_keys", "API keys that are not revoked.", mode="max"
        )
        self.requests_today = gauge(
            "chatvault_requests_today",
            "Model requests in the ledger since midnight UTC.",
            mode="max",
        )
        self.spend_today = gauge(
            "chatvault_spend_today_usd", "Spend in the ledger since midnight UTC, USD.", mode="max"
        )
        # Span export
        self.trace_exported = counter(
            "chatvault_trace_spans_exported", "Spans the collector accepted."
        )
        self.trace_failures = counter(
            "chatvault_trace_export_failures",
            "Span export calls that failed (collector down, slow or refusing).",
        )
        self.trace_dropped = counter(
            "chatvault_trace_spans_dropped", "Spans dropped because the export queue was full."
        )
        self.trace_queue = gauge("chatvault_trace_queue_size", "Spans waiting to be exported.")
        self.trace_capacity = gauge(
            "chatvault_trace_queue_capacity", "Capacity of the span export queue.", mode="max"
        )
        self.trace_last_success = gauge(
            "chatvault_trace_last_success_timestamp_seconds",
            "When spans were last exported, unix seconds (0: never).",
            mode="max",
        )
        self._trace_seen = (0, 0, 0)
        # Health, refreshed after each background check round
        self.upstream_up = gauge(
            "chatvault_upstream_up",
            "1 when the upstream answered its last probe, 0 when not.",
            ("upstream",),
            mode="min",
        )
        self.component_status = gauge(
            "chatvault_health_status",
            "Health by component (and overall): 0 healthy, 1 degraded, 2 unhealthy.",
            ("component",),
            mode="max",
        )
        # Process
        self.cpu_seconds = counter(
            "chatvault_process_cpu_seconds", "CPU time used by the gateway's processes."
        )
        self.memory = gauge(
            "chatvault_process_resident_memory_bytes", "Resident memory of the gateway's processes."
        )
        self.start_time = gauge(
            "chatvault_process_start_time_seconds",
            "Start time of the oldest gateway process, unix seconds.",
            mode="min",
        )
        self.build_info = gauge(
            "chatvault_build_info",
            "Build information; the value is always 1.",
            ("version", "python_version"),
            mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

        self._children: dict[tuple[Any, ...], Any] = {}
        self._process = psutil.Process()
        self._cpu_seen = 0.0
        self.start_time.set(self._process.create_time())
        self._dropped_seen = 0
        self.sample_process()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: labels() validates and locks on every
        call, about 4 µs; a request records about ten series."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the seed's methods -------------------------------------------------------

    def record_http_request(
        self, method: str, endpoint: str, status_code: int, duration: float
    ) -> None:
        self._child(self.http_requests, method, endpoint, str(status_code)).inc()
        self._child(self.http_duration, method, endpoint).observe(duration)

    def record_token_usage(
        self, model: str, user_type: str, provider: str, tokens: TokenCounts
    ) -> None:
        for token_type, n in (
            ("input", tokens.input),
            ("output", tokens.output),
            ("cached", tokens.cached),
            ("reasoning", tokens.reasoning),
        ):
            if n:
                self._child(self.tokens, model, provider, user_type, token_type).inc(n)

    def record_request_cost(self, model: str, user_type: str, provider: str, cost: float) -> None:
        if cost:
            self._child(self.cost, model, provider, user_type).inc(cost)

    def record_model_request(self, model: str, provider: str, status: str) -> None:
        self._child(self.model_requests, model, provider, status).inc()

    async def update_business_metrics(self, stats: Callable[[], Awaitable[DayStats]]) -> None:
        day = await stats()
        self.active_keys.set(day.active_keys)
        self.requests_today.set(day.requests_today)
        self.spend_today.set(day.spend_today_usd)

    def get_metrics(self) -> bytes:
        body, _ = self.exposition("")
        return body

    # -- from the Usage record -----------------------------------------------------

    def record_usage(self, u: Usage) -> None:
        model = u.model if u.known_model else UNKNOWN
        provider = u.provider or UNKNOWN
        self.record_model_request(
            model, provider, "success" if u.error_type is None else u.error_type
        )
        self.record_token_usage(model, u.user_type, provider, u.tokens)
        self.record_request_cost(model, u.user_type, provider, u.cost_usd)
        outcome = "success" if u.error_type is None else "error"
        self._child(self.request_duration, model, provider, u.user_type, outcome).observe(
            u.latency_s
        )
        if u.upstream_latency_s is not None:
            self._child(self.upstream_latency, model, provider).observe(u.upstream_latency_s)
            self._child(self.overhead, model, provider).observe(
                max(u.latency_s - u.upstream_latency_s, 0.0)
            )
        if u.ttft_s is not None:
            self._child(self.ttft, model, provider, u.user_type).observe(u.ttft_s)
            if u.tokens.output > 1 and u.error_type is None:
                self._child(self.tpot, model, provider).observe(
                    (u.latency_s - u.ttft_s) / (u.tokens.output - 1)
                )

    def record_auth_attempt(self, result: str) -> None:
        method = "none" if result == "missing" else "bearer"
        self._child(self.auth_attempts, method, result).inc()

    def record_rate_limit(self, limit_type: str, user_type: str) -> None:
        self._child(self.rate_limited, limit_type, user_type).inc()

    def record_db(self, operation: str, table: str, seconds: float) -> None:
        self._child(self.db_duration, operation, table).observe(seconds)

    # -- the ledger writer's observer ----------------------------------------------

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        self.ledger_rows.inc(len(rows))
        self.record_db("insert", "requests", seconds)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        self.ledger_failures.inc()
        self.record_db("insert_failed", "requests", seconds)

    # -- sampled state ---------------------------------------------------------------

    def sample_process(self) -> None:
        cpu = self._process.cpu_times()
        total = cpu.user + cpu.system
        if total > self._cpu_seen:
            self.cpu_seconds.inc(total - self._cpu_seen)
            self._cpu_seen = total
        self.memory.set(self._process.memory_info().rss)

    def sample_ledger(self, depth: int, dropped: int) -> None:
        self.ledger_queue.set(depth)
        if dropped > self._dropped_seen:
            self.ledger_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    def sample_tracing(self, status: ExportStatus) -> None:
        seen = self._trace_seen
        now = (status.spans_exported, status.export_failures, status.spans_dropped)
        for counter, before, after in zip(
            (self.trace_exported, self.trace_failures, self.trace_dropped), seen, now, strict=True
        ):
            if after > before:
                counter.inc(after - before)
        self._trace_seen = now
        self.trace_queue.set(status.queue_size)
        self.trace_capacity.set(status.queue_capacity)
        self.trace_last_success.set(status.last_success or 0)

    def sample_health(self, components: dict[str, str], upstreams: dict[str, bool | None]) -> None:
        for name, status in components.items():
            self.component_status.labels(name).set(RANK[status])
        self.component_status.labels("overall").set(RANK[overall(components)])
        for name, reachable in upstreams.items():
            if reachable is not None:
                self.upstream_up.labels(name).set(1 if reachable else 0)

    def series_count(self) -> int:
        return sum(len(m.samples) for m in self._scrape_registry().collect())

    # -- exposition ---------------------------------------------------------------------

    def _scrape_registry(self) -> CollectorRegistry:
        if not self.multiprocess:
            return self.registry
        merged = CollectorRegistry()  # every worker's values, summed per series
        prom_multiprocess.MultiProcessCollector(merged, path=multiprocess_dir())  # type: ignore[no-untyped-call]
        return merged

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape body in the format the Accept header asks for (OpenMetrics or text).

        Blocking (it may read the multiprocess files): call it from a thread.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self._scrape_registry()), content_type


class MetricsMiddleware:
    """Counts and times every HTTP request by route template; streams pass untouched."""

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
            endpoint = route_template(scope)
            if endpoint not in _UNMEASURED:
                method = scope["method"] if scope["method"] in _METHODS else "OTHER"
                self.collector.record_http_request(
                    method, endpoint, recorder.status, time.perf_counter() - started
                )
