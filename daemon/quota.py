"""The quota store: rate limits and budgets, decided together at admission.

``Quota`` is the protocol; ``MemoryQuota`` keeps the state in this process (one worker)
and ``RedisQuota`` (``daemon/quota_redis.py``) in Redis, shared by every worker and
replica. Admission is one call (one Redis round trip): rate limits first, then the
budget reservation of the request's worst case; a refused request changes nothing.
Settlement (the real tokens and cost, when the request ends) never waits.

    quota = MemoryQuota(clock=time.monotonic)
    admitted = await quota.admit(Ask(limits, budget_usd=5.0, worst_case_usd=0.002))
    quota.settle(admitted.ticket, cost_usd=0.0013, tokens=812)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from daemon.budget import SpendBook, Verdict
from daemon.limits import ALLOW, Decision, KeyLimits, charge, decide
from daemon.usage import Usage


@dataclass(frozen=True, slots=True)
class Ask:
    limits: KeyLimits
    budget_usd: float | None  # None: no budget
    worst_case_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """What admission set aside for one request; handed back at settlement."""

    key_id: str
    tpm: int | None
    reservation: object | None = None  # the store's own handle


@dataclass(frozen=True, slots=True)
class Admitted:
    decision: Decision  # the rate limits' answer, with the x-ratelimit-* headers
    budget: Verdict | None  # None: no budget, or the rate limits refused first
    ticket: Ticket
    fail_open: bool = False  # the store was unreachable and on_backend_error is allow

    @property
    def allowed(self) -> bool:
        return self.decision.allowed and (self.budget is None or self.budget.allowed)


@dataclass
class QuotaStatus:
    """For /health and metrics."""

    backend: str
    reachable: bool = True
    last_error: str | None = None
    fail_open_admissions: int = 0
    settle_failures: int = 0
    details: dict[str, object] = field(default_factory=dict)


class Quota(Protocol):
    status: QuotaStatus

    async def start(self) -> None: ...

    async def admit(self, ask: Ask) -> Admitted: ...

    def settle(self, ticket: Ticket, cost_usd: float, tokens: int) -> None:
        """The request ended: replace its reservation by its real cost, charge its
        tokens. Never waits (a shared store writes in the background)."""
        ...

    def set_committed(self, totals: dict[str, float]) -> None:
        """What the ledger has committed per key: spend never counts less than that."""
        ...

    def release_key(self, key_id: str) -> None:
        """A revoked key: drop its reservations."""
        ...

    # The ledger writer reports each committed batch (see LedgerWriter's observers).
    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None: ...

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None: ...

    async def aclose(self) -> None: ...


class MemoryQuota:
    """Buckets and budgets in this process: exact for one worker; ``serve --workers N``
    refuses this backend (each worker would enforce every limit on its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.book = SpendBook()
        self.status = QuotaStatus("memory")
        self._requests: dict[str, float] = {}
        self._tokens: dict[str, float] = {}

    async def start(self) -> None:
        return None

    async def admit(self, ask: Ask) -> Admitted:
        limits = ask.limits
        key = limits.key_id
        decision = ALLOW
        requests_tat = self._requests.get(key, 0.0)
        if limits.rpm is not None or limits.tpm is not None:
            decision, requests_tat = decide(
                limits, requests_tat, self._tokens.get(key, 0.0), self.clock()
            )
            if not decision.allowed:
                return Admitted(decision, None, Ticket(key, limits.tpm))
        verdict, reservation = None, None
        if ask.budget_usd is not None:
            verdict, reservation = self.book.reserve(key, ask.budget_usd, ask.worst_case_usd)
            if not verdict.allowed:
                return Admitted(decision, verdict, Ticket(key, limits.tpm))
        if limits.rpm is not None:
            self._requests[key] = requests_tat
        return Admitted(decision, verdict, Ticket(key, limits.tpm, reservation))

    def settle(self, ticket: Ticket, cost_usd: float, tokens: int) -> None:
        reservation = ticket.reservation if isinstance(ticket.reservation, int) else None
        self.book.settle(ticket.key_id, reservation, cost_usd)
        if ticket.tpm is not None and tokens > 0:  # only keys with a token limit have a bucket
            key = ticket.key_id
            now = self.clock()
            self._tokens[key] = charge(self._tokens.get(key, 0.0), now, tokens, ticket.tpm)

    def set_committed(self, totals: dict[str, float]) -> None:
        self.book.set_committed(totals)

    def release_key(self, key_id: str) -> None:
        self.book.release_key(key_id)

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        self.book.batch_written(rows, seconds, totals)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        return None

    async def aclose(self) -> None:
        return None
