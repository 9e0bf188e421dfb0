"""Prometheus metrics: the collector, its metric table, and its null twin.

``MetricsCollector`` owns its ``CollectorRegistry`` (injected; never the process-wide
default), so two apps in one process, and every test, see only their own series. All
request-level figures come from the one ``Usage`` record per request, the same one
the ledger stores, so the two cannot disagree.

    collector = MetricsCollector(CollectorRegistry())
    collector.record_usage(usage)
    body = collector.get_metrics(accept_header)

With several worker processes, prometheus_client's multiprocess mode keeps each
worker's values in a private directory and ``get_metrics`` sums them per scrape.

Labels are bounded sets (model, provider, user_type, token_type, status, endpoint
template): never a key, a user, an IP or a raw path. A model name that is not in the
config is reported as ``unknown``, so clients cannot create series.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import choose_encoder

from daemon import __version__
from daemon.ledger.base import DayStats
from daemon.metric_specs import SPECS
from daemon.status import RANK, overall
from daemon.trace_export import ExportStatus
from daemon.usage import TokenCounts, Usage

UNKNOWN = "unknown"


class MetricsCollector:
    enabled = True
    # One attribute per entry of SPECS, typed for the code that records into them.
    http_requests: Counter
    http_duration: Histogram
    in_flight: Gauge
    tokens: Counter
    cost: Counter
    model_requests: Counter
    request_duration: Histogram
    upstream_latency: Histogram
    ttft: Histogram
    tpot: Histogram
    overhead: Histogram
    routing_attempts: Counter
    fallbacks: Counter
    circuit_state: Gauge
    cache_requests: Counter
    cache_saved: Counter
    rate_limited: Counter
    limits_fail_open: Counter
    auth_attempts: Counter
    db_duration: Histogram
    ledger_queue: Gauge
    ledger_rows: Counter
    ledger_failures: Counter
    ledger_dropped: Counter
    journal_depth: Gauge
    journal_bytes: Gauge
    rows_journaled: Counter
    rows_recovered: Counter
    rejected_dropped: Counter
    active_keys: Gauge
    requests_today: Gauge
    spend_today: Gauge
    trace_exported: Counter
    trace_failures: Counter
    trace_dropped: Counter
    trace_queue: Gauge
    trace_capacity: Gauge
    trace_last_success: Gauge
    upstream_up: Gauge
    component_status: Gauge
    loop_lag: Histogram
    cpu_seconds: Counter
    memory: Gauge
    start_time: Gauge
    build_info: Gauge

    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        # `*_created` series double every counter's series in the text format and no
        # dashboard reads them; the library's switch for them is process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # With several workers, prometheus_client keeps each worker's values in files
        # in this directory (it reads PROMETHEUS_MULTIPROC_DIR itself when values are
        # created); the scrape sums them.
        self.multiprocess_dir = multiprocess_dir
        self.multiprocess = multiprocess_dir is not None
        for spec in SPECS:
            setattr(self, spec.attr, spec.build(self.registry))
        # Running totals kept elsewhere (CPU time, the writer's, the exporter's), as
        # last mirrored into each counter.
        self._seen: dict[Any, float] = {}
        self.build_info.labels(__version__, platform.python_version()).set(1)

        self._children: dict[tuple[Any, ...], Any] = {}
        self._process = psutil.Process()
        self.start_time.set(self._process.create_time())
        self.sample_process()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: labels() validates and locks on every
        call, about 4 µs; a request records about ten series."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the public recording methods (operators' code and docs/metrics.md name them) -------------------------------------------------------

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

    def get_metrics(self, accept: str = "") -> bytes:
        """The scrape body, in the format the Accept header asks for (OpenMetrics or text).

        Blocking (it may read the multiprocess files): call it from a thread.
        """
        encoder, _ = choose_encoder(accept)
        body: bytes = encoder(self._scrape_registry())
        return body

    @staticmethod
    def content_type(accept: str = "") -> str:
        return choose_encoder(accept)[1]

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

    def record_attempt(self, model: str, deployment: str, outcome: str) -> None:
        self._child(self.routing_attempts, model, deployment, outcome).inc()

    def record_fallback(self, from_model: str, to_model: str, reason: str) -> None:
        self._child(self.fallbacks, from_model, to_model, reason).inc()

    def set_circuit(self, model: str, deployment: str, rank: int) -> None:
        self._child(self.circuit_state, model, deployment).set(rank)

    def record_cache(self, model: str, result: str, saved_usd: float) -> None:
        self._child(self.cache_requests, model, result).inc()
        if saved_usd:
            self._child(self.cache_saved, model).inc(saved_usd)

    def record_auth_attempt(self, result: str) -> None:
        method = "none" if result == "missing" else "bearer"
        self._child(self.auth_attempts, method, result).inc()

    def record_rate_limit(self, limit_type: str, user_type: str) -> None:
        self._child(self.rate_limited, limit_type, user_type).inc()

    def record_limits_fail_open(self) -> None:
        self.limits_fail_open.inc()

    def record_db(self, operation: str, table: str, seconds: float) -> None:
        self._child(self.db_duration, operation, table).observe(seconds)

    def record_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

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

    def _advance(self, counter: Any, total: float) -> None:
        """Move a counter that mirrors a running total by what is new since last time."""
        seen = self._seen.get(counter, 0.0)
        if total > seen:
            counter.inc(total - seen)
            self._seen[counter] = total

    def sample_process(self) -> None:
        cpu = self._process.cpu_times()
        self._advance(self.cpu_seconds, cpu.user + cpu.system)
        self.memory.set(self._process.memory_info().rss)

    def sample_ledger(self, depth: int, dropped: int) -> None:
        self.ledger_queue.set(depth)
        self._advance(self.ledger_dropped, dropped)

    def sample_journal(
        self, depth: int, size: int, rejected_dropped: int, journaled: int, recovered: int
    ) -> None:
        self.journal_depth.set(depth)
        self.journal_bytes.set(size)
        self._advance(self.rejected_dropped, rejected_dropped)
        self._advance(self.rows_journaled, journaled)
        self._advance(self.rows_recovered, recovered)

    def sample_tracing(self, status: ExportStatus) -> None:
        self._advance(self.trace_exported, status.spans_exported)
        self._advance(self.trace_failures, status.export_failures)
        self._advance(self.trace_dropped, status.spans_dropped)
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
        prom_multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return merged


class NullMetrics:
    """Metrics switched off: every recording method does nothing (opentelemetry's
    no-op meter is the model), so the request path never asks whether metrics are on."""

    enabled = False
    multiprocess = False

    def record_http_request(
        self, method: str, endpoint: str, status_code: int, duration: float
    ) -> None:
        return None

    def record_usage(self, u: Usage) -> None:
        return None

    def record_auth_attempt(self, result: str) -> None:
        return None

    def record_attempt(self, model: str, deployment: str, outcome: str) -> None:
        return None

    def record_fallback(self, from_model: str, to_model: str, reason: str) -> None:
        return None

    def set_circuit(self, model: str, deployment: str, rank: int) -> None:
        return None

    def record_cache(self, model: str, result: str, saved_usd: float) -> None:
        return None

    def record_rate_limit(self, limit_type: str, user_type: str) -> None:
        return None

    def record_limits_fail_open(self) -> None:
        return None

    def record_db(self, operation: str, table: str, seconds: float) -> None:
        return None

    def record_loop_lag(self, seconds: float) -> None:
        return None

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        return None

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        return None

    def sample_process(self) -> None:
        return None

    def sample_ledger(self, depth: int, dropped: int) -> None:
        return None

    def sample_journal(
        self, depth: int, size: int, rejected_dropped: int, journaled: int, recovered: int
    ) -> None:
        return None

    def sample_tracing(self, status: ExportStatus) -> None:
        return None

    def sample_health(self, components: dict[str, str], upstreams: dict[str, bool | None]) -> None:
        return None

    async def update_business_metrics(self, stats: Callable[[], Awaitable[DayStats]]) -> None:
        return None

    def series_count(self) -> int:
        return 0


AnyMetrics = MetricsCollector | NullMetrics
