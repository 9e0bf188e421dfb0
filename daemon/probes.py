"""The background checks behind /health: nothing slow happens when /health is called.

Each round probes every distinct upstream cheaply (a models listing, never a paid
completion), checks the ledger database (a read and a write), re-validates the config
file if it changed on disk, samples CPU and counts metric series, each bounded by the
probe timeout. Results are kept here and in ``Availability``; ``Health`` reads them.

Probes are traced only with ``monitoring.tracing.trace_probes`` (the health metrics
tell their story): then each round is one INTERNAL span, ``health probe round``, with
one HTTP CLIENT span per upstream probed under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from daemon.availability import Availability, UpstreamState
from daemon.config import ConfigError, load_config
from daemon.ledger.base import Store, StoreCheck
from daemon.tracing import AnyTracing, start_span

# CPU time moves in clock ticks (10 ms): read over a few milliseconds, one tick came out
# as 487 % on a 2-core machine right after start. A reading covers at least this long.
CPU_MIN_INTERVAL_S = 1.0


class Probes:
    def __init__(
        self,
        *,
        store: Store,
        availability: Availability,
        config_source: Path | None,
        environ: Mapping[str, str],
        timeout_s: float,
        interval_s: float,
        tracing: AnyTracing,
        count_series: Callable[[], int] | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.availability = availability
        self.config_source = config_source
        self.environ = environ
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.tracing = tracing
        # Not traced by default: a no-op tracer, so the probe code never asks.
        self.tracer = tracing.tracer if tracing.trace_probes else trace.NoOpTracer()
        self.count_series = count_series  # None: metrics are off
        self.clock = clock
        self.store_check: StoreCheck | None = None
        self.store_checked_at: float | None = None
        self.config_problem: str | None = None
        self._config_mtime: float | None = None
        self.metrics_series: int | None = None
        self.metrics_error: str | None = None
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first reading is meaningless; prime it
        self._cpu_read_at = time.monotonic()
        self.cpu_percent = 0.0
        self._round_lock = asyncio.Lock()
        self.after_round: list[Callable[[], None]] = []  # e.g. refresh the health metrics

    async def run(self) -> None:
        while True:
            await self.check_round()
            await asyncio.sleep(self.interval_s)

    async def check_round(self) -> None:
        """Probe every upstream and the database at once, each bounded by the timeout."""
        async with self._round_lock:
            round_span = self.tracer.start_span("health probe round", kind=SpanKind.INTERNAL)
            in_round = trace.set_span_in_context(round_span)
            try:
                await asyncio.gather(
                    self._check_store(),
                    *(self._probe(u, in_round) for u in self.availability.upstreams.values()),
                )
            finally:
                round_span.end()
            self._check_config_file()
            now = time.monotonic()
            if now - self._cpu_read_at >= CPU_MIN_INTERVAL_S:
                self.cpu_percent = self.process.cpu_percent(None)
                self._cpu_read_at = now
            if self.count_series is not None:
                # Collecting every series (and, with workers, reading their files) is
                # done here, off the loop, never per /health call.
                try:
                    self.metrics_series = await asyncio.to_thread(self.count_series)
                    self.metrics_error = None
                except Exception as exc:
                    self.metrics_error = f"{type(exc).__name__}: {exc}"
            for callback in self.after_round:
                callback()

    async def _probe(self, upstream: UpstreamState, context: Context) -> None:
        provider = upstream.deployments[0].provider
        attrs: dict[str, str | int] = {
            "http.request.method": "GET",
            "chatvault.upstream": upstream.name,
        }
        if provider.server_address:
            attrs["server.address"] = provider.server_address
        if provider.server_port:
            attrs["server.port"] = provider.server_port
        # An HTTP client span is named by its method (no URL template is known here).
        span = start_span(
            self.tracer, "GET", kind=SpanKind.CLIENT, attributes=attrs, context=context
        )
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(provider.probe(self.timeout_s), self.timeout_s)
            reachable, error, latency = result.ok, result.error, result.latency_s
        except TimeoutError:
            reachable, error = False, f"no answer within {self.timeout_s:g}s"
            latency = time.perf_counter() - started
        except Exception as exc:  # a probe must never take the loop down
            reachable, error = False, f"{type(exc).__name__}: {exc}"
            latency = time.perf_counter() - started
        self.availability.probed(
            upstream, reachable=reachable, error=error, latency_s=latency, at=self.clock()
        )
        if not reachable and span.is_recording():
            span.set_attribute("error.type", "unreachable")
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    async def _check_store(self) -> None:
        try:
            check = await asyncio.wait_for(self.store.check(), self.timeout_s)
        except TimeoutError:
            check = StoreCheck(
                False, False, self.timeout_s, error=f"no answer within {self.timeout_s:g}s"
            )
        except Exception as exc:
            check = StoreCheck(False, False, 0.0, error=f"{type(exc).__name__}: {exc}")
        self.store_check, self.store_checked_at = check, self.clock()

    def _check_config_file(self) -> None:
        """Does the file on disk still validate? A restart would read it."""
        source = self.config_source
        if source is None:
            return
        try:
            mtime = source.stat().st_mtime
        except OSError as exc:
            self.config_problem = f"{source} cannot be read: {exc.strerror}"
            return
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            load_config(source, self.environ)
            self.config_problem = None
        except ConfigError as exc:
            self.config_problem = f"the file on disk no longer validates: {exc}"

    @property
    def database_ok(self) -> bool:
        """For /readyz: the ledger can be reached (unknown before the first check counts as ok)."""
        return self.store_check is None or self.store_check.ok
