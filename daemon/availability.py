"""Is a deployment up? One answer, read by the router and by health.

Two feeds: background probes of each distinct upstream server (a models listing),
and real traffic (a burst of consecutive failures marks a deployment down before the
next probe; a success brings it back).

    availability = Availability(deployments, failure_threshold=3)
    availability.report_failure(deployment, "upstream_timeout")
    availability.is_up(deployment)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from daemon.deployment import Deployment


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
    deployments: list[Deployment] = field(default_factory=list)
    checked_at: float | None = None
    reachable: bool | None = None  # None: not probed yet
    latency_s: float | None = None
    error: str | None = None


@dataclass
class TrafficState:
    consecutive_failures: int = 0
    down_reason: str | None = None  # set by a burst of failures in real traffic
    last_error: str | None = None


class Availability:
    def __init__(self, deployments: Sequence[Deployment], *, failure_threshold: int) -> None:
        self.deployments = list(deployments)
        self.threshold = failure_threshold
        self.traffic = {d.index: TrafficState() for d in self.deployments}
        self.upstreams: dict[str, UpstreamState] = {}
        for d in self.deployments:
            key = upstream_name(d)
            if key is None:
                continue
            state = self.upstreams.get(key)
            if state is None:
                url = getattr(d.provider, "probe_url", None) or d.config.api_base or ""
                state = self.upstreams[key] = UpstreamState(key, url)
            state.deployments.append(d)

    # -- traffic --------------------------------------------------------------------

    def report_success(self, d: Deployment) -> None:
        state = self.traffic[d.index]
        state.consecutive_failures = 0
        state.down_reason = None

    def report_failure(self, d: Deployment, kind: str) -> None:
        state = self.traffic[d.index]
        state.consecutive_failures += 1
        state.last_error = kind
        if state.consecutive_failures >= self.threshold:
            state.down_reason = (
                f"{state.consecutive_failures} consecutive upstream failures ({kind})"
            )

    # -- probes ---------------------------------------------------------------------

    def probed(
        self,
        upstream: UpstreamState,
        *,
        reachable: bool,
        error: str | None,
        latency_s: float,
        at: float,
    ) -> None:
        upstream.reachable, upstream.error, upstream.latency_s = reachable, error, latency_s
        upstream.checked_at = at
        if reachable:
            for d in upstream.deployments:
                self.report_success(d)

    # -- the answer -------------------------------------------------------------------

    def problem(self, d: Deployment) -> str | None:
        """Why this deployment cannot serve now, or None."""
        if d.problem:
            return d.problem
        key = upstream_name(d)
        if key is not None:
            upstream = self.upstreams[key]
            if upstream.reachable is False:
                return f"upstream unreachable: {upstream.error}"
        return self.traffic[d.index].down_reason

    def is_up(self, d: Deployment) -> bool:
        return self.problem(d) is None
