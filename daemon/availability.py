"""Is a deployment up? One answer, read by the router, the upstream caller and health.

Two feeds: background probes of each distinct upstream server (a models listing),
and real traffic, through a circuit breaker per deployment:

    closed ──``failures`` consecutive failures──▶ open ──``cooldown_s``──▶ half-open
      ▲                                            ▲                         │
      └──────────── the trial succeeds ────────────┼──── the trial fails ────┘

While open the deployment is skipped; once the cool-down has passed, one request at a
time is let through as a trial. A good probe closes a circuit only after the cool-down
too: a models listing that works says little about completions that failed a moment
ago, and closing on it made a deployment flap (issue #13). The circuit's state and the
reason are shown in /health and as a metric.

    availability = Availability(deployments, failure_threshold=5, cooldown_s=30)
    availability.report_failure(deployment, "upstream_unreachable")
    availability.admits(deployment)   # may a request try it now?
    availability.is_up(deployment)    # health's and the router's view
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon.deployment import Deployment

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
CIRCUIT_RANK = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the circuit state gauge's values


def upstream_name(d: Deployment) -> str | None:
    """Deployments sharing a server share one probe; in-process models have none."""
    p = d.provider
    if p.server_address is None:
        return None
    return f"{d.provider_name} {p.server_address}:{p.server_port}"


def deployment_label(d: Deployment) -> str:
    """How metrics, the ledger and health name a deployment: its place in the config,
    never its URL (which may carry credentials)."""
    return f"models[{d.index}]"


@dataclass
class UpstreamState:
    name: str  # "ollama localhost:11434" (health, for the admin)
    url: str  # what is probed (shown to the admin only)
    # The metric label: the provider and the first deployment on this server
    # ("ollama models[0]"), never its host, which may be an address /metrics should not
    # show (the public /health does not either).
    label: str
    deployments: list[Deployment] = field(default_factory=list)
    checked_at: float | None = None
    reachable: bool | None = None  # None: not probed yet
    latency_s: float | None = None
    error: str | None = None


@dataclass
class Circuit:
    """One deployment's circuit breaker, fed by real traffic."""

    state: str = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0  # monotonic
    trial_started: float | None = None  # a half-open trial in flight
    reason: str | None = None  # why it opened
    last_error: str | None = None


class Availability:
    def __init__(
        self,
        deployments: Sequence[Deployment],
        *,
        failure_threshold: int,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Deployment, str], None] = lambda d, state: None,
    ) -> None:
        self.deployments = list(deployments)
        self.threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_change = on_change
        self.circuits = {d.index: Circuit() for d in self.deployments}
        self.upstreams: dict[str, UpstreamState] = {}
        # Each deployment's upstream, found once (problem() runs on every routed request).
        self._upstream_of: dict[int, UpstreamState | None] = {}
        for d in self.deployments:
            key = upstream_name(d)
            if key is None:
                self._upstream_of[d.index] = None
                continue
            state = self.upstreams.get(key)
            if state is None:
                url = getattr(d.provider, "probe_url", None) or d.config.api_base or ""
                label = f"{d.provider_name} {deployment_label(d)}"
                state = self.upstreams[key] = UpstreamState(key, url, label)
            state.deployments.append(d)
            self._upstream_of[d.index] = state

    # -- traffic --------------------------------------------------------------------

    def report_success(self, d: Deployment) -> None:
        circuit = self.circuits[d.index]
        circuit.consecutive_failures = 0
        circuit.trial_started = None
        if circuit.state != CLOSED:
            self._set(d, circuit, CLOSED, None)

    def report_failure(self, d: Deployment, kind: str) -> None:
        circuit = self.circuits[d.index]
        circuit.consecutive_failures += 1
        circuit.last_error = kind
        circuit.trial_started = None
        if circuit.state == HALF_OPEN:
            self._open(d, circuit, f"the trial request after the cool-down failed ({kind})")
        elif circuit.state == CLOSED and circuit.consecutive_failures >= self.threshold:
            self._open(
                d, circuit, f"{circuit.consecutive_failures} consecutive upstream failures ({kind})"
            )

    def admits(self, d: Deployment) -> bool:
        """May a request try this deployment now? Closed: yes. Open: not before the
        cool-down, then it turns half-open and lets one trial through at a time."""
        circuit = self.circuits[d.index]
        if circuit.state == CLOSED:
            return True
        now = self.clock()
        if circuit.state == OPEN:
            if now - circuit.opened_at < self.cooldown_s:
                return False
            self._set(d, circuit, HALF_OPEN, circuit.reason)
        # Half-open: one trial at a time; a trial lost without a verdict (its client
        # hung up) frees the slot after another cool-down.
        started = circuit.trial_started
        return started is None or now - started >= self.cooldown_s

    def begin_trial(self, d: Deployment) -> None:
        """A request is about to try this deployment (called after ``admits``)."""
        circuit = self.circuits[d.index]
        if circuit.state == HALF_OPEN:
            circuit.trial_started = self.clock()

    def retry_in(self, d: Deployment) -> float:
        """Seconds until an open circuit admits a trial (0 when it would now)."""
        circuit = self.circuits[d.index]
        if circuit.state != OPEN:
            return 0.0
        return max(self.cooldown_s - (self.clock() - circuit.opened_at), 0.0)

    def _open(self, d: Deployment, circuit: Circuit, reason: str) -> None:
        circuit.opened_at = self.clock()
        self._set(d, circuit, OPEN, reason)

    def _set(self, d: Deployment, circuit: Circuit, state: str, reason: str | None) -> None:
        circuit.state, circuit.reason = state, reason
        self.on_change(d, state)

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
        if not reachable:
            return
        for d in upstream.deployments:
            # A listing that works closes a circuit only once its cool-down is over.
            circuit = self.circuits[d.index]
            if circuit.state != CLOSED and self.retry_in(d) == 0.0:
                self.report_success(d)

    # -- the answer -------------------------------------------------------------------

    def problem(self, d: Deployment) -> str | None:
        """Why this deployment cannot serve now, or None."""
        if d.problem:
            return d.problem
        upstream = self._upstream_of[d.index]
        if upstream is not None and upstream.reachable is False:
            return f"upstream unreachable: {upstream.error}"
        circuit = self.circuits[d.index]
        if circuit.state == OPEN:
            wait = self.retry_in(d)
            if wait > 0:  # past the cool-down it is due a trial: up, for the router
                return f"circuit open: {circuit.reason}; trial in {wait:.0f}s"
        return None

    def is_up(self, d: Deployment) -> bool:
        return self.problem(d) is None

    def circuit_view(self, d: Deployment) -> dict[str, object]:
        """The circuit as /health shows it."""
        circuit = self.circuits[d.index]
        view: dict[str, object] = {
            "state": circuit.state,
            "consecutive_failures": circuit.consecutive_failures,
            "reason": circuit.reason,
            "last_error": circuit.last_error,
        }
        if circuit.state == OPEN:
            view["trial_in_s"] = round(self.retry_in(d), 1)
        return view
