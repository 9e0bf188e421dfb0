"""The deep health check: seven components, judged from state kept in memory.

``Health`` reads narrow sources handed to it at construction (the ledger writer's
status, the key cache's status, the span export status, the background probes and
deployment availability), never the gateway. ``report`` turns them into /health's
body, with details only for the admin.

Status rules (``daemon/status.py``): the worst component wins, except that tracing,
metrics and upstreams (``external_apis``) can only make the whole ``degraded``. It is
``unhealthy`` when the database is unusable, the configuration is invalid, or no
model is available.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon import __version__
from daemon.availability import OPEN, Availability, deployment_label
from daemon.cache import CacheStatus
from daemon.config import Settings
from daemon.probes import Probes
from daemon.quota import QuotaStatus
from daemon.status import DEGRADED, HEALTHY, UNHEALTHY, overall
from daemon.trace_export import ExportStatus


class LedgerStatus(Protocol):
    """What health reads of the ledger writer."""

    @property
    def depth(self) -> int: ...
    @property
    def failing(self) -> bool: ...

    @property
    def absorbing(self) -> bool: ...
    @property
    def journal_depth(self) -> int: ...
    @property
    def journal_bytes(self) -> int: ...

    rows_written: int
    write_failures: int
    rows_dropped: int
    billed_dropped: int
    rejected_dropped: int
    last_error: str | None
    last_success: float | None
    journal_error: str | None

    def readiness(self, now: float | None = None) -> tuple[bool, str]: ...


class LagStatus(Protocol):
    """What health reads of the event-loop lag sampler."""

    def summary(self) -> dict[str, float | None]: ...


class _NoLag:
    def summary(self) -> dict[str, float | None]:
        return {"last_ms": None, "max_ms": None, "window_s": 0.0}


_NO_LAG = _NoLag()


class KeyStatus(Protocol):
    """What health reads of the key cache."""

    @property
    def active_keys(self) -> int: ...

    store_reachable: bool
    last_refresh_error: str | None


@dataclass
class Component:
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"status": self.status}

    def detailed(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, **self.details}


class Health:
    def __init__(
        self,
        settings: Settings,
        *,
        probes: Probes,
        availability: Availability,
        ledger: LedgerStatus,
        keys: KeyStatus,
        admin_key_source: str,
        quota: QuotaStatus,
        export_status: ExportStatus | None,  # None: tracing is off
        metrics_multiprocess: bool | None,  # None: metrics are off
        cache: CacheStatus | None = None,  # None: no response cache
        clock: Callable[[], float] = time.time,
        loop_lag: LagStatus = _NO_LAG,
    ) -> None:
        self.settings = settings
        self.loop_lag = loop_lag
        self.probes = probes
        self.availability = availability
        self.ledger = ledger
        self.keys = keys
        self.admin_key_source = admin_key_source
        self.quota = quota
        self.export_status = export_status
        self.metrics_multiprocess = metrics_multiprocess
        self.cache = cache
        self.clock = clock
        self.started = time.time()

    def readiness(self) -> tuple[bool, str]:
        """The ledger's part of /readyz.

        A shared (PostgreSQL) database going away hits every replica at once: going
        unready together would turn a blip into an outage, so the replica stays up
        while its journal absorbs the rows, for ``ready_during_outage_s``. A local
        SQLite file that breaks is this replica's own fault: unready at once, so the
        load balancer sends traffic to a replica that can record it.
        """
        if self.probes.database_ok:
            return True, "ready"
        if self.settings.ledger.url.startswith("sqlite"):
            check = self.probes.store_check
            error = check.error if check is not None and check.error else "unreachable"
            return False, f"local ledger database failing: {error}"
        return self.ledger.readiness()

    def components(self) -> dict[str, Component]:
        return {
            "database": self._database(),
            "configuration": self._configuration(),
            "authentication": self._authentication(),
            "metrics": self._metrics(),
            "tracing": self._tracing(),
            "external_apis": self._external_apis(),
            "models": self._models(),
        }

    def statuses(self) -> dict[str, str]:
        return {name: c.status for name, c in self.components().items()}

    def report(self, *, detailed: bool) -> tuple[dict[str, Any], int]:
        components = self.components()
        status = overall({name: c.status for name, c in components.items()})
        body: dict[str, Any] = {"status": status, "timestamp": round(self.clock(), 3)}
        if detailed:
            body["version"] = __version__
            body["components"] = {name: c.detailed() for name, c in components.items()}
            body["performance"] = {
                "memory_usage_mb": round(self.probes.process.memory_info().rss / 1_048_576, 1),
                "cpu_percent": round(self.probes.cpu_percent, 1),
                "uptime_seconds": round(time.time() - self.started, 1),
                "event_loop_lag": self.loop_lag.summary(),
            }
        else:
            body["components"] = {name: c.public() for name, c in components.items()}
        return body, 503 if status == UNHEALTHY else 200

    def _database(self) -> Component:
        writer, store = self.ledger, self.probes.store
        details: dict[str, Any] = {
            "backend": store.kind,
            "location": store.description,
            "queue_depth": writer.depth,
            "rows_written": writer.rows_written,
            "write_failures": writer.write_failures,
            "rows_dropped": writer.rows_dropped,
            "billed_rows_dropped": writer.billed_dropped,
            "rejected_rows_dropped": writer.rejected_dropped,
            "journal_depth": writer.journal_depth,
            "journal_bytes": writer.journal_bytes,
            "journal_error": writer.journal_error,
            "last_successful_write": writer.last_success,
        }
        check = self.probes.store_check
        if check is None:
            return Component(HEALTHY, "first check pending", details)
        details.update(
            latency_ms=round(check.latency_s * 1000, 2),
            request_rows=check.request_rows,
            active_keys=check.active_keys,
            size_bytes=check.size_bytes,
            checked_at=self.probes.store_checked_at,
        )
        if check.error:
            details["error"] = check.error
        if not check.ok and writer.absorbing:
            return Component(
                DEGRADED,
                f"the ledger database cannot be reached; {writer.journal_depth} rows "
                "journaled on disk, written when it returns",
                details,
            )
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
        deployments = self.availability.deployments
        details: dict[str, Any] = {
            "file": str(s.source) if s.source else None,
            "models_configured": len(s.models),
            "deployments_with_problems": sum(1 for d in deployments if d.problem),
        }
        if self.probes.config_problem:
            details["problem"] = self.probes.config_problem
            return Component(
                DEGRADED,
                "running config is valid; the file on disk has changed and does not validate",
                details,
            )
        problems = [f"{d.name}: {d.problem}" for d in deployments if d.problem]
        if problems:
            details["problems"] = problems
            return Component(DEGRADED, "valid, with problems: " + "; ".join(problems), details)
        return Component(HEALTHY, f"valid; {len(s.models)} model entries", details)

    def _authentication(self) -> Component:
        keys = self.keys
        details: dict[str, Any] = {
            "active_keys": keys.active_keys - 1,  # minus the admin key
            "admin_key_source": self.admin_key_source,
            "key_store_reachable": keys.store_reachable,
            "limit_store": {
                "backend": self.quota.backend,
                "reachable": self.quota.reachable,
                "last_error": self.quota.last_error,
                "fail_open_admissions": self.quota.fail_open_admissions,
            },
        }
        if not self.quota.reachable:
            return Component(
                DEGRADED,
                f"the limit store ({self.quota.backend}) cannot be reached: "
                f"{self.quota.last_error}",
                details,
            )
        if not keys.store_reachable:
            details["error"] = keys.last_refresh_error
            return Component(
                DEGRADED, "key store unreachable; serving keys cached in memory", details
            )
        return Component(HEALTHY, f"{details['active_keys']} active keys", details)

    def _metrics(self) -> Component:
        if self.metrics_multiprocess is None:
            return Component(HEALTHY, "disabled by configuration", {"enabled": False})
        probes = self.probes
        if probes.metrics_error is not None:
            details = {"enabled": True, "error": probes.metrics_error}
            return Component(DEGRADED, "the registry cannot be collected", details)
        series = probes.metrics_series
        details = {"enabled": True, "series": series, "multiprocess": self.metrics_multiprocess}
        if series is None:
            return Component(HEALTHY, "first check pending", details)
        return Component(HEALTHY, f"{series} series", details)

    def _tracing(self) -> Component:
        status = self.export_status
        if status is None:
            return Component(HEALTHY, "disabled by configuration", {"enabled": False})
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
        upstreams = self.availability.upstreams
        cache = self._cache_details()
        if not upstreams:
            details: dict[str, Any] = {"upstreams": {}, **cache}
            if self.cache is not None and not self.cache.reachable:
                return Component(DEGRADED, f"response cache: {self.cache.last_error}", details)
            return Component(HEALTHY, "no external upstreams configured", details)
        entries = {}
        av = self.availability
        for u in upstreams.values():
            entries[u.name] = {
                "url": u.url,
                "reachable": u.reachable,
                "latency_ms": round(u.latency_s * 1000, 1) if u.latency_s is not None else None,
                "last_error": u.error,
                "checked_at": u.checked_at,
                # Its deployments' circuit breakers: traffic's view of the same server.
                "circuits": {deployment_label(d): av.circuit_view(d) for d in u.deployments},
            }
        down = [u.name for u in upstreams.values() if u.reachable is False]
        pending = [u.name for u in upstreams.values() if u.reachable is None]
        tripped = [
            u.name
            for u in upstreams.values()
            if u.reachable is not False
            and all(av.circuits[d.index].state == OPEN for d in u.deployments)
        ]
        details = {"upstreams": entries, **cache}
        if tripped and len(down) + len(tripped) == len(upstreams):
            return Component(
                UNHEALTHY,
                "no upstream is usable: "
                + ", ".join(down + [f"{n} (circuit open)" for n in tripped]),
                details,
            )
        if tripped:
            return Component(DEGRADED, "circuit open: " + ", ".join(tripped), details)
        if self.cache is not None and not self.cache.reachable:
            return Component(DEGRADED, f"response cache: {self.cache.last_error}", details)
        if len(down) == len(upstreams):
            return Component(UNHEALTHY, "no upstream is reachable: " + ", ".join(down), details)
        if down:
            return Component(DEGRADED, "unreachable: " + ", ".join(down), details)
        if pending:
            return Component(HEALTHY, "first check pending for " + ", ".join(pending), details)
        return Component(HEALTHY, f"{len(upstreams)} reachable", details)

    def _cache_details(self) -> dict[str, Any]:
        c = self.cache
        if c is None:
            return {}
        return {
            "response_cache": {
                "backend": c.backend,
                "reachable": c.reachable,
                "last_error": c.last_error,
                "errors": c.errors,
                "entries": c.entries if c.backend == "memory" else None,
                "bytes": c.bytes if c.backend == "memory" else None,
            }
        }

    def _models(self) -> Component:
        models: dict[str, dict[str, Any]] = {}
        for d in self.availability.deployments:
            entry = models.setdefault(d.name, {"available": False, "deployments": []})
            problem = self.availability.problem(d)
            entry["deployments"].append(
                {
                    "deployment": deployment_label(d),
                    "provider": d.provider_name,
                    "model": d.upstream_model,
                    "available": problem is None,
                    "reason": problem,
                    "circuit": self.availability.circuit_view(d),
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
