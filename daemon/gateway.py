"""The composition root: every resource with a lifetime, opened and closed in order.

``Gateway.start`` (called from the app's lifespan) opens the ledger store and its
writer, the key cache, the upstream HTTP client and the deployments, composes the
request pipeline from them, and starts the background loops (health probes, metrics
sampling, business metrics, slow imports). ``stop`` closes everything in reverse.
The request sequence itself lives in ``pipeline.py``; nothing here runs per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from typing import Any

import aiohttp

from daemon.admission import Admission
from daemon.attempts import RetryPolicy, UpstreamCaller
from daemon.auth import Authenticator
from daemon.availability import CIRCUIT_RANK, Availability, deployment_label
from daemon.cache import AnyCache, ResponseCache, open_cache
from daemon.config import Settings
from daemon.deployment import Deployment, build_deployments
from daemon.health import Health
from daemon.keys import hash_key
from daemon.ledger import open_store
from daemon.ledger.base import Store, day_start
from daemon.ledger.writer import LedgerWriter
from daemon.lifecycle import Lifecycle
from daemon.loop_lag import LoopLag
from daemon.metrics import AnyMetrics
from daemon.pipeline import Pipeline
from daemon.probes import Probes
from daemon.providers.litellm_provider import LiteLLMProvider
from daemon.quota import MemoryQuota, Quota
from daemon.quota_redis import RedisQuota
from daemon.router import Router
from daemon.sinks import (
    Accounting,
    CacheSink,
    LedgerSink,
    MetricsSink,
    QuotaSink,
    RoutingSink,
    SpanSink,
)
from daemon.state import AdminKey, ensure_admin_key
from daemon.tracing import AnyTracing, instrument_authentication, instrument_database_operation

log = logging.getLogger("chatvault.gateway")


class Gateway:
    """Owns the resources; ``pipeline``, ``health`` and friends exist once started."""

    pipeline: Pipeline
    auth: Authenticator
    router: Router
    availability: Availability
    probes: Probes
    health: Health
    admin_key: AdminKey

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        metrics: AnyMetrics,
        tracing: AnyTracing,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        quota: Quota | None = None,
    ) -> None:
        self.settings = settings
        self.environ = environ
        self.metrics = metrics
        self.tracing = tracing
        self.clock = clock
        self.lifecycle = Lifecycle()
        ledger = settings.ledger
        self.store: Store = store or open_store(
            ledger.url,
            migrate="apply" if ledger.migrate_on_start else "check",
            journal_dir=ledger.journal_dir,
        )
        self.quota: Quota = quota or open_quota(settings)
        self.cache: AnyCache = open_cache(settings)
        self.writer = LedgerWriter(
            self.store,
            batch_size=settings.ledger.batch_size,
            flush_interval_s=settings.ledger.flush_interval_s,
            max_queue=settings.ledger.max_queue,
            observers=[self.quota, metrics],
            instrument=self._instrument_batch,
            journal_dir=ledger.journal_dir,
            journal_max_bytes=ledger.journal_max_bytes,
            spill_after_s=ledger.spill_after_s,
            rejected_max_queue=ledger.rejected_max_queue,
            ready_during_outage_s=ledger.ready_during_outage_s,
        )
        self._stack = contextlib.AsyncExitStack()
        self.loop_lag = LoopLag(metrics.record_loop_lag)

    # -- lifetime --------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        try:
            # Closed last, after the ledger's final batch spans; bounded in time.
            self._stack.push_async_callback(asyncio.to_thread, self.tracing.shutdown)
            self.admin_key = ensure_admin_key(s.state_file, s.auth.admin_key_env, self.environ)
            await self.store.open()
            self._stack.push_async_callback(self.store.close)
            await self.writer.start()
            self._stack.push_async_callback(self.writer.close)
            await self.quota.start()
            # Closed after the writer: its last batches still raise the spend floors.
            self._stack.push_async_callback(self.quota.aclose)
            if isinstance(self.cache, ResponseCache):
                await self.cache.backend.start()  # an unreachable Redis: refuse to start
                self._stack.push_async_callback(self.cache.backend.aclose)
            self.auth = Authenticator(
                self.store,
                admin_key_hash=hash_key(self.admin_key.key),
                clock=self.clock,
                on_committed_spend=self.quota.set_committed,
                on_revoked=self.quota.release_key,
                refresh_interval_s=s.auth.refresh_interval_s,
                on_attempt=self._on_auth_attempt,
            )
            await self.auth.start()
            self._stack.push_async_callback(self.auth.aclose)
            http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=s.upstream.max_connections, limit_per_host=0, ttl_dns_cache=300
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=s.upstream.connect_timeout_s, sock_read=s.upstream.timeout_s
                ),
            )
            self._stack.push_async_callback(http.close)
            self._compose(build_deployments(s, http, self.environ))
        except BaseException:
            await self._stack.aclose()
            raise
        self._start_warmups()
        self._background(self.probes.run(), "chatvault-health")
        self._background(self.loop_lag.run(), "chatvault-loop-lag")
        if self.metrics.enabled:
            self._background(self._sample_loop(), "chatvault-metrics-sampler")
            self._background(self._business_loop(), "chatvault-business-metrics")
        self.lifecycle.state = "ready"

    def _compose(self, deployments: list[Deployment]) -> None:
        """Wire the request pipeline and health from the opened resources."""
        s = self.settings
        metrics = self.metrics
        self.availability = Availability(
            deployments,
            failure_threshold=s.circuit_failures,
            cooldown_s=s.routing.circuit_breaker.cooldown_s,
            on_change=self._circuit_changed,
        )
        for d in deployments:
            self._circuit_changed(d, "closed")
        self.router = Router(
            deployments,
            self.availability.is_up,
            fallbacks=s.fallbacks,
            strategy=s.routing.strategy,
        )
        self.probes = Probes(
            store=self.store,
            availability=self.availability,
            config_source=s.source,
            environ=self.environ,
            timeout_s=s.monitoring.health.probe_timeout_s,
            interval_s=s.monitoring.health.probe_interval_s,
            tracing=self.tracing,
            count_series=metrics.series_count if metrics.enabled else None,
            clock=self.clock,
        )
        self.health = Health(
            s,
            probes=self.probes,
            availability=self.availability,
            ledger=self.writer,
            keys=self.auth,
            admin_key_source=self.admin_key.source,
            quota=self.quota.status,
            export_status=self.tracing.export_status,
            metrics_multiprocess=metrics.multiprocess if metrics.enabled else None,
            cache=self.cache.status,
            clock=self.clock,
            loop_lag=self.loop_lag,
        )
        self.probes.after_round.append(self._sample_health)
        accounting = Accounting(
            deployments,
            [
                LedgerSink(self.writer),
                QuotaSink(self.quota),
                MetricsSink(metrics),
                RoutingSink(self.router),
                CacheSink(self.cache, metrics),
                SpanSink(self.tracing),
            ],
        )
        self.pipeline = Pipeline(
            auth=self.auth,
            router=self.router,
            lifecycle=self.lifecycle,
            admission=Admission(
                self.quota, metrics, default_max_tokens=s.limits.default_max_tokens
            ),
            caller=UpstreamCaller(
                self.availability,
                self.router,
                self.tracing,
                metrics,
                policy=RetryPolicy(
                    retries=s.retries,
                    backoff_s=s.routing.retry_backoff_s,
                    deadline_s=s.routing.request_deadline_s,
                    default_timeout_s=s.upstream.timeout_s,
                ),
            ),
            accounting=accounting,
            tracing=self.tracing,
            clock=self.clock,
            max_body_bytes=s.server.max_body_bytes,
            cache=self.cache,
            limits=s.requests,
            hide_forbidden_models=s.auth.forbidden_model_status == 404,
        )

    async def stop(self) -> None:
        self.lifecycle.state = "stopped"
        await self._stack.aclose()

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._stack.callback(task.cancel)

    def _start_warmups(self) -> None:
        """Slow imports (litellm) happen after start; /readyz says "starting" until done."""
        providers = [
            d.provider for d in self.router.deployments if isinstance(d.provider, LiteLLMProvider)
        ]
        if not providers:
            return
        self.lifecycle.pending_warmups += 1

        async def warm() -> None:
            try:
                await providers[0].warm()  # one import serves them all
            except Exception:
                log.exception("litellm could not be loaded; its models will fail")
            finally:
                self.lifecycle.pending_warmups -= 1

        self._background(warm(), "chatvault-warmup")

    # -- telemetry glue ---------------------------------------------------------

    def _circuit_changed(self, d: Deployment, state: str) -> None:
        self.metrics.set_circuit(d.name, deployment_label(d), CIRCUIT_RANK[state])

    def _on_auth_attempt(self, result: str) -> None:
        self.metrics.record_auth_attempt(result)
        if result != "success":  # success: the pipeline notes it with the key's id
            instrument_authentication(result)

    def _instrument_batch(self, rows: int) -> AbstractContextManager[Any]:
        if not self.tracing.trace_ledger:  # a root trace per batch is noise; metrics tell it
            return contextlib.nullcontext()
        return instrument_database_operation(
            self.tracing, "INSERT", "requests", system=self.store.kind, rows=rows
        )

    async def _sample_loop(self, interval_s: float = 1.0) -> None:
        while True:
            self.sample_metrics()
            await asyncio.sleep(interval_s)

    def sample_metrics(self) -> None:
        """Copy current state (process, ledger queue, span export) into metrics."""
        self.metrics.sample_process()
        w = self.writer
        self.metrics.sample_ledger(w.depth, w.rows_dropped)
        self.metrics.sample_journal(
            w.journal_depth, w.journal_bytes, w.rejected_dropped, w.rows_journaled, w.rows_recovered
        )
        status = self.tracing.export_status
        if status is not None:
            self.metrics.sample_tracing(status)

    def _sample_health(self) -> None:
        self.metrics.sample_health(
            self.health.statuses(),
            {u.label: u.reachable for u in self.availability.upstreams.values()},
        )

    async def _business_loop(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await self.metrics.update_business_metrics(
                    lambda: self.store.day_stats(day_start(self.clock()))
                )
                self.metrics.record_db("day_stats", "requests", time.perf_counter() - started)
            except Exception as exc:  # the database may be down; health reports it
                log.warning("business metrics refresh failed: %s", exc)
            await asyncio.sleep(self.settings.monitoring.metrics.business_refresh_s)


def open_quota(settings: Settings) -> Quota:
    """The limit store the config asks for."""
    limits = settings.limits
    if limits.backend == "redis":
        return RedisQuota(
            limits.redis_url,
            key_prefix=limits.key_prefix,
            timeout_s=limits.backend_timeout_s,
            fail_open=limits.on_backend_error == "allow",
            reservation_ttl_s=limits.reservation_ttl_s,
        )
    return MemoryQuota()
