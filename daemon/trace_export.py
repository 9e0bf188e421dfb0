"""Getting spans out of the process, and knowing whether they get out.

``ExportingSpanProcessor`` is a batching span processor (a bounded queue, a worker
thread, batches to an exporter) that counts what the SDK's own keeps to itself:
spans exported, export failures, spans dropped because the queue was full, queue
depth, the last success and the last error. ``on_end`` runs on the request path and
is a deque append; everything slow happens on the worker thread, so a collector that
is down or slow never slows a request, and the queue's bound keeps memory flat.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from daemon.otlp import OTLPExporter, encoded

log = logging.getLogger("chatvault.tracing")


@dataclass
class ExportStatus:
    """What an operator needs to know about span export; read by /health, metrics, CLI."""

    endpoint: str
    protocol: str
    queue_capacity: int
    spans_exported: int = 0
    export_failures: int = 0  # failed export calls (batches)
    spans_failed: int = 0  # spans in those batches
    spans_dropped: int = 0  # never queued: the queue was full
    last_success: float | None = None
    last_failure: float | None = None
    last_error: str | None = None
    queue: collections.deque[Any] = field(default_factory=collections.deque, repr=False)

    @property
    def queue_size(self) -> int:
        return len(self.queue)

    def as_dict(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "spans_exported": self.spans_exported,
            "export_failures": self.export_failures,
            "spans_failed": self.spans_failed,
            "spans_dropped": self.spans_dropped,
            "queue_size": self.queue_size,
            "queue_capacity": self.queue_capacity,
            "last_success": self.last_success,
            "last_failure": self.last_failure,
            "last_error": self.last_error,
        }

    @property
    def failing(self) -> bool:
        """The most recent export attempt failed (or spans are being dropped)."""
        if self.last_failure is None:
            return False
        return self.last_success is None or self.last_failure > self.last_success


class ExportingSpanProcessor(SpanProcessor):
    def __init__(
        self,
        exporter: SpanExporter,
        status: ExportStatus,
        *,
        schedule_delay_s: float = 1.0,
        max_batch_size: int = 512,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self.status = status
        self.schedule_delay_s = schedule_delay_s
        self.max_batch_size = max_batch_size
        self.shutdown_timeout_s = shutdown_timeout_s
        self._queue = status.queue
        self._capacity = status.queue_capacity
        # With ChatVault's own OTLP exporters each span is encoded as it ends, on the
        # request path (tens of µs): encoding whole batches on this thread instead would
        # hold the GIL in long stretches and stall the event loop (tail latency).
        self._encode = isinstance(exporter, OTLPExporter)
        self._wake = threading.Event()
        self._stopping = False
        self._deadline: float | None = None
        self._export_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._work, name="chatvault-span-export", daemon=True
        )
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._capacity:
            self.status.spans_dropped += 1
            return
        self._queue.append(encoded(span) if self._encode else span)
        if len(self._queue) >= self.max_batch_size:
            self._wake.set()

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(self.schedule_delay_s)
            self._wake.clear()
            if not self._stopping:
                self._export_all()
        # The final flush happens here too, so that shutdown can stop waiting for it.
        self._export_all(self._deadline)

    def _export_all(self, deadline: float | None = None) -> bool:
        with self._export_lock:
            while self._queue:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                batch = [
                    self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))
                ]
                self._export(batch)
        return True

    def _export(self, batch: Sequence[Any]) -> None:
        try:
            if self._encode:
                assert isinstance(self.exporter, OTLPExporter)
                result = self.exporter.export_encoded(batch)
            else:
                result = self.exporter.export(batch)
        except Exception as exc:  # an exporter must not take the worker down
            result = SpanExportResult.FAILURE
            self.status.last_error = f"{type(exc).__name__}: {exc}"
        now = time.time()
        if result is SpanExportResult.SUCCESS:
            self.status.spans_exported += len(batch)
            self.status.last_success = now
        else:
            self.status.export_failures += 1
            self.status.spans_failed += len(batch)
            self.status.last_failure = now
            reason = getattr(self.exporter, "last_error", None)
            self.status.last_error = reason or self.status.last_error or "export failed"

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._export_all(time.monotonic() + timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued, bounded by ``shutdown_timeout_s`` even if the collector is down."""
        self._deadline = time.monotonic() + self.shutdown_timeout_s
        self._stopping = True
        self._wake.set()
        # A stuck export keeps the (daemon) worker thread; shutdown does not wait for it.
        self._thread.join(self.shutdown_timeout_s)
        left = len(self._queue)
        if left:
            log.warning("tracing: %d spans not exported before shutdown", left)
        self.exporter.shutdown()
