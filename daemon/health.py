"""The deep health check: seven components, judged from state kept in memory.

Nothing slow happens when ``/health`` is called. A background loop probes each
distinct upstream cheaply (a models listing, never a paid completion, each bounded
by a timeout), checks the ledger database (a read and a write), and keeps the
results; real traffic feeds the per-deployment state too, so a burst of upstream
failures marks a model down before the next probe. ``report`` turns that state
into the seed's body, with details only for the admin.

Status rules: the worst component wins, except that tracing, metrics and upstreams
(``external_apis``) can only make the whole ``degraded``. It is ``unhealthy`` when
the database is unusable, the configuration is invalid, or no model is available.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
from opentelemetry.trace import Status, StatusCode

from daemon import __version__
from daemon.config import ConfigError, Settings, load_config
from daemon.ledger.base import Store, StoreCheck
from daemon.router import Deployment

if TYPE_CHECKING:
    from daemon.metrics import MetricsCollector
from daemon.tracing import Tracing, instrument_external_api_call

log = logging.getLogger("chatvault.health")

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}
# Components whose trouble cannot make the whole instance unhealthy.
CAPPED = frozenset({"metrics", "tracing", "external_apis"})


def overall(statuses: dict[str, str]) -> str:
    worst = HEALTHY
    for name, status in statuses.items():
        if name in CAPPED and status == UNHEALTHY:
            status = DEGRADED
        if RANK[status] > RANK[worst]:
            worst = status
    return worst


def upstream_name(d: Deployment) -> str | None:
    """Deployments sharing a server share one probe; in-process models have none."""
    p = d.provider
    if p.server_address is None:
        return None
    return f"{d.provider_name} {p.server_address}:{p.server_port}"


@dataclass
class UpstreamState:
    name: str  # "ollama localhost:11434"
    url: str  # what is probed (shown to the admin only)
    deployments: list[Deployment]
    checked_at: float | None = None
    reachable: bool | None = None  # None: not probed yet
    latency_s: float | None = None
    error: str | None = None


@dataclass
class DeploymentState:
    consecutive_failures: int = 0
    down_reason: str | None = None  # set by a burst of failures in real traffic
    last_error: str | None = None


@dataclass
class Component:
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"status": self.status}

    def detailed(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, **self.details}


class HealthMonitor:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        deployments: list[Deployment],
        clock: Callable[[], float] = time.time,
        tracing: Tracing | None = None,
        metrics: MetricsCollector | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.metrics_series: int | None = None
        self.metrics_error: str | None = None
        self.tracing = tracing  # probes are traced as external API calls
        self.store = store
        self.clock = clock
        self.interval_s = settings.monitoring.health.probe_interval_s
        self.timeout_s = settings.monitoring.health.probe_timeout_s
        self.threshold = settings.monitoring.health.failure_threshold
        self.started = time.time()
        self.deployments = deployments
        self.deployment_state = {d.index: DeploymentState() for d in deployments}
        self.upstreams: dict[str, UpstreamState] = {}
        for d in deployments:
            key = upstream_name(d)
            if key is None:
                continue
            state = self.upstreams.get(key)
            if state is None:
                url = getattr(d.provider, "probe_url", None) or d.config.api_base or ""
                state = self.upstreams[key] = UpstreamState(key, url, [])
            state.deployments.append(d)
        self.store_check: StoreCheck | None = None
        self.store_checked_at: float | None = None
        self.config_problem: str | None = None
        self._config_mtime: float | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading is meaningless; prime it
        self.cpu_percent = 0.0
        self._round_lock = asyncio.Lock()
        self.on_round: Callable[[], None] | None = None  # e.g. refresh health metrics

    # -- traffic feed ---------------------------------------------------------------

    def report_success(self, d: Deployment) -> None:
        state = self.deployment_state[d.index]
        state.consecutive_failures = 0
        state.down_reason = None

    def report_failure(self, d: Deployment, kind: str) -> None:
        state = self.deployment_state[d.index]
        state.consecutive_failures += 1
        state.last_error = kind
        if state.consecutive_failures >= self.threshold:
            state.down_reason = (
                f"{state.consecutive_failures} consecutive upstream failures ({kind})"
            )

    def deployment_problem(self, d: Deployment) -> str | None:
        """Why this deployment cannot serve now, or None."""
        if d.problem:
            return d.problem
        key = upstream_name(d)
        if key is not None:
            upstream = self.upstreams[key]
            if upstream.reachable is False:
                return f"upstream unreachable: {upstream.error}"
        return self.deployment_state[d.index].down_reason

    def is_up(self, d: Deployment) -> bool:
        return self.deployment_problem(d) is None

    # -- background checks ------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.check_round()
            await asyncio.sleep(self.interval_s)

    async def check_round(self) -> None:
        """Probe every upstream and the database at once, each bounded by the timeout."""
        async with self._round_lock:
            await asyncio.gather(
                self._check_store(),
                *(self._probe(u) for u in self.upstreams.values()),
            )
            self._check_config_file()
            self.cpu_percent = self._process.cpu_percent(None)
            if self.metrics is not None:
                # Collecting every series (and, with workers, reading their files) is
                # done here, off the loop, never per /health call.
                try:
                    self.metrics_series = await asyncio.to_thread(self.metrics.series_count)
                    self.metrics_error = None
                except Exception as exc:
                    self.metrics_error = f"{type(exc).__name__}: {exc}"
            if self.on_round is not None:
                self.on_round()

    async def _probe(self, upstream: UpstreamState) -> None:
        provider = upstream.deployments[0].provider
        span = None
        if self.tracing is not None:
            span = instrument_external_api_call(
                self.tracing,
                "GET health probe",
                server_address=provider.server_address,
                server_port=provider.server_port,
                attributes={"http.request.method": "GET", "chatvault.upstream": upstream.name},
            )
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(provider.probe(self.timeout_s), self.timeout_s)
            reachable, error, latency = result.ok, result.error, result.latency_s
        except TimeoutError:
            reachable, error, latency = (
                False,
                f"no answer within {self.timeout_s:g}s",
                time.perf_counter() - started,
            )
        except Exception as exc:  # a probe must never take the loop down
            reachable, error, latency = (
                False,
                f"{type(exc).__name__}: {exc}",
                time.perf_counter() - started,
            )
        upstream.reachable, upstream.error, upstream.latency_s = reachable, error, latency
        upstream.checked_at = self.clock()
        if span is not None:
            if not reachable:
                span.set_attribute("error.type", "unreachable")
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()
        if reachable:
            for d in upstream.deployments:
                self.report_success(d)

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
        source = self.settings.source
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
            load_config(source, os.environ)
            self.config_problem = None
        except ConfigError as exc:
            self.config_problem = f"the file on disk no longer validates: {exc}"

    @property
    def database_ok(self) -> bool:
        """For /readyz: the ledger can be reached (unknown before the first check counts as ok)."""
        return self.store_check is None or self.store_check.ok

    # -- the report -----------------------------------------------------------------------

    def components(self, gateway: Any) -> dict[str, Component]:
        return {
            "database": self._database(gateway),
            "configuration": self._configuration(),
            "authentication": self._authentication(gateway),
            "metrics": self._metrics(gateway),
            "tracing": self._tracing(gateway),
            "external_apis": self._external_apis(),
            "models": self._models(),
        }

    def report(self, gateway: Any, *, detailed: bool) -> tuple[dict[str, Any], int]:
        components = self.components(gateway)
        status = overall({name: c.status for name, c in components.items()})
        body: dict[str, Any] = {"status": status, "timestamp": round(self.clock(), 3)}
        if detailed:
            body["version"] = __version__
            body["components"] = {name: c.detailed() for name, c in components.items()}
            body["performance"] = {
                "memory_usage_mb": round(self._process.memory_info().rss / 1_048_576, 1),
                "cpu_percent": round(self.cpu_percent, 1),
                "uptime_seconds": round(time.time() - self.started, 1),
            }
        else:
            body["components"] = {name: c.public() for name, c in components.items()}
        return body, 503 if status == UNHEALTHY else 200

    def _database(self, gateway: Any) -> Component:
        writer = gateway.writer
        details: dict[str, Any] = {
            "backend": self.store.kind,
            "location": self.store.description,
            "queue_depth": writer.depth,
            "rows_written": writer.rows_written,
            "write_failures": writer.write_failures,
            "rows_dropped": writer.rows_dropped,
        }
        check = self.store_check
        if check is None:
            return Component(HEALTHY, "first check pending", details)
        details.update(
            latency_ms=round(check.latency_s * 1000, 2),
            request_rows=check.request_rows,
            active_keys=check.active_keys,
            size_bytes=check.size_bytes,
            checked_at=self.store_checked_at,
        )
        if check.error:
            details["error"] = check.error
        if not check.ok:
            return Component(UNHEALTHY, "the ledger database cannot be reached", details)
        if not check.writable:
            return Component(UNHEALTHY, "the ledger database cannot be written", details)
        if writer.failing:
            details["last_write_error"] = writer.last_error
            return Component(DEGRADED, "ledger writes are failing and being retried", details)
        return Component(
            HEALTHY, f"reads and writes work ({check.latency_s * 1000:.1f} ms)", details
        )

    def _configuration(self) -> Component:
        s = self.settings
        details: dict[str, Any] = {
            "file": str(s.source) if s.source else None,
            "models_configured": len(s.models),
            "deployments_with_problems": sum(1 for d in self.deployments if d.problem),
        }
        if self.config_problem:
            details["problem"] = self.config_problem
            return Component(
                DEGRADED,
                "running config is valid; the file on disk has changed and does not validate",
                details,
            )
        problems = [f"{d.name}: {d.problem}" for d in self.deployments if d.problem]
        if problems:
            details["problems"] = problems
            return Component(DEGRADED, "valid, with problems: " + "; ".join(problems), details)
        return Component(HEALTHY, f"valid; {len(s.models)} model entries", details)

    def _authentication(self, gateway: Any) -> Component:
        auth = gateway.auth
        admin = gateway.admin_key
        details = {
            "active_keys": auth.active_keys - 1 if auth else 0,  # minus the admin key
            "admin_key_source": admin.source if admin else None,
            "key_store_reachable": auth.store_reachable if auth else False,
        }
        if auth is None:
            return Component(UNHEALTHY, "not started", details)
        if not auth.store_reachable:
            details["error"] = auth.last_refresh_error
            return Component(
                DEGRADED, "key store unreachable; serving keys cached in memory", details
            )
        return Component(HEALTHY, f"{details['active_keys']} active keys", details)

    def _metrics(self, gateway: Any) -> Component:
        if gateway.metrics is None:
            return Component(HEALTHY, "disabled by configuration", {"enabled": False})
        if self.metrics_error is not None:
            details = {"enabled": True, "error": self.metrics_error}
            return Component(DEGRADED, "the registry cannot be collected", details)
        series = self.metrics_series
        details = {"enabled": True, "series": series, "multiprocess": gateway.metrics.multiprocess}
        if series is None:
            return Component(HEALTHY, "first check pending", details)
        return Component(HEALTHY, f"{series} series", details)

    def _tracing(self, gateway: Any) -> Component:
        if gateway.tracing is None:
            return Component(HEALTHY, "disabled by configuration", {"enabled": False})
        status = gateway.tracing.status
        details = {"enabled": True, **status.as_dict()}
        if status.failing:
            return Component(
                DEGRADED, f"spans are not reaching the collector: {status.last_error}", details
            )
        if status.queue_size >= status.queue_capacity:
            return Component(DEGRADED, "the span queue is full; spans are being dropped", details)
        if status.last_success is None:
            return Component(HEALTHY, "no spans exported yet", details)
        return Component(HEALTHY, f"exporting ({status.spans_exported} spans so far)", details)

    def _external_apis(self) -> Component:
        if not self.upstreams:
            return Component(HEALTHY, "no external upstreams configured", {"upstreams": {}})
        entries = {}
        for u in self.upstreams.values():
            entries[u.name] = {
                "url": u.url,
                "reachable": u.reachable,
                "latency_ms": round(u.latency_s * 1000, 1) if u.latency_s is not None else None,
                "last_error": u.error,
                "checked_at": u.checked_at,
            }
        down = [u.name for u in self.upstreams.values() if u.reachable is False]
        pending = [u.name for u in self.upstreams.values() if u.reachable is None]
        details = {"upstreams": entries}
        if len(down) == len(self.upstreams):
            return Component(UNHEALTHY, "no upstream is reachable: " + ", ".join(down), details)
        if down:
            return Component(DEGRADED, "unreachable: " + ", ".join(down), details)
        if pending:
            return Component(HEALTHY, "first check pending for " + ", ".join(pending), details)
        return Component(HEALTHY, f"{len(self.upstreams)} reachable", details)

    def _models(self) -> Component:
        models: dict[str, dict[str, Any]] = {}
        for d in self.deployments:
            entry = models.setdefault(d.name, {"available": False, "deployments": []})
            problem = self.deployment_problem(d)
            entry["deployments"].append(
                {
                    "provider": d.provider_name,
                    "model": d.upstream_model,
                    "available": problem is None,
                    "reason": problem,
                }
            )
            if problem is None:
                entry["available"] = True
        for entry in models.values():
            if not entry["available"]:
                entry["reason"] = "; ".join(str(x["reason"]) for x in entry["deployments"])
        down = [name for name, e in models.items() if not e["available"]]
        details = {"models": models}
        if len(down) == len(models):
            return Component(UNHEALTHY, "no model is available", details)
        if down:
            return Component(DEGRADED, "unavailable: " + ", ".join(down), details)
        return Component(HEALTHY, f"all {len(models)} available", details)
