"""Every metric ChatVault exports, as a table: name, type, labels, buckets, help text.

``MetricsCollector`` builds one attribute per row. docs/metrics.md describes them for
operators; a new metric is one row here, one typed attribute on the collector, and
the method that records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# fmt: off
# GenAI semantic-convention bucket sets, extended where LLM calls run long.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84, 327.68)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# The gateway's own time: sub-millisecond when healthy.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_MODEL = ("model", "provider")
_MODEL_USER = ("model", "provider", "user_type")


@dataclass(frozen=True)
class Spec:
    """One metric: the attribute that holds it, and how to build it."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms
    mode: str = "livesum"  # gauges: how worker processes' values combine

    def build(self, registry: CollectorRegistry) -> Any:
        if self.kind is Histogram:
            return Histogram(
                self.name, self.doc, self.labels, registry=registry, buckets=self.buckets
            )
        if self.kind is Gauge:
            mode: Any = self.mode  # one of prometheus_client's multiprocess modes
            return Gauge(
                self.name, self.doc, self.labels, registry=registry, multiprocess_mode=mode
            )
        return Counter(self.name, self.doc, self.labels, registry=registry)


# Every metric ChatVault exports (docs/metrics.md describes them for operators).
SPECS = (
    # HTTP
    Spec("http_requests", Counter, "chatvault_http_requests", "HTTP requests answered, by route template and status code.", ("method", "endpoint", "status_code")),
    Spec("http_duration", Histogram, "chatvault_http_request_duration_seconds", "HTTP request duration, until the last byte of the response (streams included).", ("method", "endpoint"), DURATION_BUCKETS),
    Spec("in_flight", Gauge, "chatvault_http_requests_in_flight", "HTTP requests being served right now."),
    # Model requests, from the Usage record
    Spec("tokens", Counter, "chatvault_tokens_processed", "Tokens processed, by token type (input, output, cached, reasoning). Cached is part of input; reasoning is part of output.", ("model", "provider", "user_type", "token_type")),
    Spec("cost", Counter, "chatvault_requests_cost", "Cost of model requests in USD.", _MODEL_USER),
    Spec("model_requests", Counter, "chatvault_model_requests", "Model requests by outcome: status is success or the error kind.", ("model", "provider", "status")),
    Spec("request_duration", Histogram, "chatvault_model_request_duration_seconds", "Model request duration as the client saw it, arrival to last byte; outcome is success or error.", (*_MODEL_USER, "outcome"), DURATION_BUCKETS),
    Spec("upstream_latency", Histogram, "chatvault_upstream_latency_seconds", "Time spent waiting on the upstream, whole stream included.", _MODEL, DURATION_BUCKETS),
    Spec("ttft", Histogram, "chatvault_time_to_first_token_seconds", "Time from arrival to the first streamed token sent to the client.", _MODEL_USER, TTFT_BUCKETS),
    Spec("tpot", Histogram, "chatvault_time_per_output_token_seconds", "Streaming decode time per output token after the first.", _MODEL, TPOT_BUCKETS),
    Spec("overhead", Histogram, "chatvault_gateway_overhead_seconds", "The gateway's own share of a request: total duration minus upstream time.", _MODEL, OVERHEAD_BUCKETS),
    # Routing and the response cache (docs/routing.md); deployment is "models[i]", never a URL
    Spec("routing_attempts", Counter, "chatvault_routing_attempts", "Upstream attempts by the public model and deployment tried; outcome is success or the error kind.", ("model", "deployment", "outcome")),
    Spec("fallbacks", Counter, "chatvault_fallbacks", "Requests handed from a model to its fallback, by the reason the model could not answer.", ("from_model", "to_model", "reason")),
    Spec("circuit_state", Gauge, "chatvault_circuit_state", "Each deployment's circuit breaker: 0 closed, 1 half-open (trial), 2 open (skipped).", ("model", "deployment"), mode="max"),
    Spec("cache_requests", Counter, "chatvault_cache_requests", "Response cache lookups: hit, miss, bypass (Cache-Control), error (backend unreachable).", ("model", "result")),
    Spec("cache_saved", Counter, "chatvault_cache_saved_usd", "What cache hits would have cost upstream, USD.", ("model",)),
    # Access control
    Spec("rate_limited", Counter, "chatvault_rate_limit_violations", "Requests refused by a limit: rpm, tpm or budget.", ("limit_type", "user_type")),
    Spec("limits_fail_open", Counter, "chatvault_limits_fail_open", "Requests admitted without a limit check because the shared limit store was unreachable (limits.on_backend_error: allow)."),
    Spec("auth_attempts", Counter, "chatvault_auth_attempts", "Authentication attempts by method (bearer or none) and result.", ("method", "result")),
    # Ledger
    Spec("db_duration", Histogram, "chatvault_db_query_duration_seconds", "Ledger database operations.", ("operation", "table"), DB_BUCKETS),
    Spec("ledger_queue", Gauge, "chatvault_ledger_queue_depth", "Ledger rows waiting to be written."),
    Spec("ledger_rows", Counter, "chatvault_ledger_rows_written", "Ledger rows written."),
    Spec("ledger_failures", Counter, "chatvault_ledger_write_failures", "Ledger batch writes that failed (their rows are kept and retried)."),
    Spec("journal_depth", Gauge, "chatvault_ledger_journal_rows", "Billed ledger rows in the on-disk journal, waiting for the database."),
    Spec("journal_bytes", Gauge, "chatvault_ledger_journal_bytes", "Size of the on-disk ledger journal."),
    Spec("rows_journaled", Counter, "chatvault_ledger_rows_journaled", "Billed ledger rows written to the on-disk journal (database unreachable or slow)."),
    Spec("rows_recovered", Counter, "chatvault_ledger_rows_recovered", "Ledger rows replayed from a journal left by an earlier process."),
    Spec("rejected_dropped", Counter, "chatvault_ledger_rejected_rows_dropped", "Rows of refused requests (no cost) not recorded because their own queue was full."),
    Spec("ledger_dropped", Counter, "chatvault_ledger_rows_dropped", "Ledger rows dropped because the queue was full."),
    # Business gauges, refreshed from the ledger at a modest interval
    Spec("active_keys", Gauge, "chatvault_active_keys", "API keys that are not revoked.", mode="max"),
    Spec("requests_today", Gauge, "chatvault_requests_today", "Model requests in the ledger since midnight UTC.", mode="max"),
    Spec("spend_today", Gauge, "chatvault_spend_today_usd", "Spend in the ledger since midnight UTC, USD.", mode="max"),
    # Span export
    Spec("trace_exported", Counter, "chatvault_trace_spans_exported", "Spans the collector accepted."),
    Spec("trace_failures", Counter, "chatvault_trace_export_failures", "Span export calls that failed (collector down, slow or refusing)."),
    Spec("trace_dropped", Counter, "chatvault_trace_spans_dropped", "Spans dropped because the export queue was full."),
    Spec("trace_queue", Gauge, "chatvault_trace_queue_size", "Spans waiting to be exported."),
    Spec("trace_capacity", Gauge, "chatvault_trace_queue_capacity", "Capacity of the span export queue.", mode="max"),
    Spec("trace_last_success", Gauge, "chatvault_trace_last_success_timestamp_seconds", "When spans were last exported, unix seconds (0: never).", mode="max"),
    # Health, refreshed after each background check round
    Spec("upstream_up", Gauge, "chatvault_upstream_up", "1 when the upstream answered its last probe, 0 when not.", ("upstream",), mode="min"),
    Spec("component_status", Gauge, "chatvault_health_status", "Health by component (and overall): 0 healthy, 1 degraded, 2 unhealthy.", ("component",), mode="max"),
    # Process
    Spec("loop_lag", Histogram, "chatvault_event_loop_lag_seconds", "How much later than asked the event loop woke a sleeping task (sampled every 0.1 s): time every request waited behind other work.", (), LOOP_LAG_BUCKETS),
    Spec("cpu_seconds", Counter, "chatvault_process_cpu_seconds", "CPU time used by the gateway's processes."),
    Spec("memory", Gauge, "chatvault_process_resident_memory_bytes", "Resident memory of the gateway's processes."),
    Spec("start_time", Gauge, "chatvault_process_start_time_seconds", "Start time of the oldest gateway process, unix seconds.", mode="min"),
    Spec("build_info", Gauge, "chatvault_build_info", "Build information; the value is always 1.", ("version", "python_version"), mode="max"),
)
# fmt: on
