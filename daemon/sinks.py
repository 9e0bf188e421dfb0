"""What happens when a request ends: one ``Usage`` record, handed to a list of sinks.

``Accounting.finish`` prices the record once, then gives it to each sink in order:
the ledger writer first (whatever fails after it, the request is on record), then the
quota store (budget settlement and tokens per minute), metrics and the upstream span. None of them waits
on I/O. A sink that fails is logged and the others still run. Adding a sink (a cache,
an audit log) is one small class here and one line where the app is composed.

    accounting = Accounting(deployments, [LedgerSink(writer), QuotaSink(quota), ...])
    accounting.finish(usage)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from daemon.cache import AnyCache
from daemon.deployment import Deployment
from daemon.errors import as_gateway_error
from daemon.ledger.writer import LedgerWriter
from daemon.metrics import AnyMetrics
from daemon.pricing import cost_usd
from daemon.quota import Quota
from daemon.router import Router
from daemon.tracing import AnyTracing, end_chat_completion
from daemon.usage import Usage

log = logging.getLogger("chatvault.accounting")


class Sink(Protocol):
    def record(self, usage: Usage) -> None: ...


class LedgerSink:
    def __init__(self, writer: LedgerWriter) -> None:
        self.writer = writer

    def record(self, usage: Usage) -> None:
        self.writer.submit(usage)


class QuotaSink:
    """Settle the request's reservation to its real cost, and charge its tokens to the
    key's tokens-per-minute bucket: both are known only now."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota

    def record(self, usage: Usage) -> None:
        ticket = usage.quota_ticket
        if ticket is not None:
            usage.quota_ticket = None
            self.quota.settle(ticket, usage.cost_usd, usage.tokens.total)


class MetricsSink:
    def __init__(self, metrics: AnyMetrics) -> None:
        self.metrics = metrics

    def record(self, usage: Usage) -> None:
        self.metrics.record_usage(usage)


class RoutingSink:
    """Release the serving deployment's in-flight count, and teach the latency strategy
    how long it took (to the first token of a stream: what a client waits for)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def record(self, usage: Usage) -> None:
        deployment = usage.in_flight
        if deployment is None:
            return
        usage.in_flight = None
        latency = None
        if usage.ok:
            latency = usage.ttft_s if usage.stream else usage.upstream_latency_s
        self.router.ended(deployment, latency)


class CacheSink:
    """Store a miss's complete answer, and count every lookup (with a hit's saving)."""

    def __init__(self, cache: AnyCache, metrics: AnyMetrics) -> None:
        self.cache = cache
        self.metrics = metrics

    def record(self, usage: Usage) -> None:
        result = usage.cache_result
        if result is None:
            return
        model = usage.model if usage.known_model else "unknown"
        self.metrics.record_cache(model, result, usage.saved_usd)
        if usage.cache_write is not None and self.cache.enabled:
            self.cache.store(usage)


class SpanSink:
    """Ends the successful upstream attempt's span with the outcome and the tokens (and,
    with capture_content, the captured reply, which it lets go: the row waits in the
    ledger queue)."""

    def __init__(self, tracing: AnyTracing) -> None:
        self.max_content_chars = tracing.max_content_chars if tracing.capture_content else 0

    def record(self, usage: Usage) -> None:
        span = usage.upstream_span
        if span is None:
            return
        usage.upstream_span = None
        end_chat_completion(
            span, usage, error=usage.error_type, max_content_chars=self.max_content_chars
        )


class Accounting:
    def __init__(self, deployments: Sequence[Deployment], sinks: Sequence[Sink]) -> None:
        self.deployments = list(deployments)
        self.sinks = list(sinks)

    def finish(self, usage: Usage) -> None:
        """Account for a finished request, exactly once, whatever path ends it."""
        if usage.finished:
            return
        usage.finished = True
        usage.latency_s = time.perf_counter() - usage.perf_start
        if usage.deployment_index >= 0 and usage.tokens.total:
            usage.cost_usd = cost_usd(usage.tokens, self.deployments[usage.deployment_index].price)
        for sink in self.sinks:
            try:
                sink.record(usage)
            except Exception:  # one sink's bug must not cost the others their record
                log.exception("%s failed (request_id=%s)", type(sink).__name__, usage.request_id)

    def fail(self, usage: Usage, exc: BaseException) -> None:
        """Account for a request that ended with ``exc`` before any response."""
        if isinstance(exc, asyncio.CancelledError):
            usage.status_code, usage.error_type = 499, "cancelled"
        else:
            error = as_gateway_error(exc)
            usage.status_code, usage.error_type = error.status_code, error.kind
        self.finish(usage)
