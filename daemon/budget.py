"""Budgets: what a request may cost at most, and whether that still fits a key's budget.

At admission a request reserves its worst case (``worst_case_cost``); when it ends the
reservation is settled to the real cost, or released when it failed. Concurrent
requests therefore cannot overshoot a budget together: each one's worst case was set
aside before it reached the upstream. The maths here is pure; ``SpendBook`` keeps the
state for one process (``daemon/quota.py``); the Redis store keeps it for many
(``daemon/quota_redis.py``). The ledger stays the truth: spend never drops below
what the ledger has committed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.ledger.base import spend_by_key
from daemon.pricing import Price, cost_usd
from daemon.usage import TokenCounts, Usage

# A token is about four bytes of JSON body (English text, plus the JSON around it);
# the estimate is settled to the real count when the request ends.
BYTES_PER_TOKEN = 4


def worst_case_tokens(
    body: dict[str, Any], body_bytes: int, operation: str, default_max_tokens: int
) -> TokenCounts:
    """The most tokens this request can be billed for: its prompt, estimated from the
    body, plus ``max_tokens`` (or the configured default cap) for each of ``n`` choices."""
    prompt = math.ceil(body_bytes / BYTES_PER_TOKEN)
    if operation == "embeddings":
        return TokenCounts(input=prompt)
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    n = body.get("n") or 1
    return TokenCounts(input=prompt, output=int(cap) * int(n))


def worst_case_cost(tokens: TokenCounts, prices: Sequence[Price]) -> float:
    """At the dearest price among the deployments that may serve the request."""
    return max((cost_usd(tokens, p) for p in prices), default=0.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether ``amount`` fits a budget given what is spent and what is reserved."""

    allowed: bool
    exhausted: bool  # nothing at all is left: no smaller request would pass either
    remaining_usd: float  # budget - spent - reserved, never below 0


def judge(budget: float, spent: float, reserved: float, amount: float) -> Verdict:
    remaining = max(budget - spent - reserved, 0.0)
    if spent >= budget:
        return Verdict(False, True, 0.0)
    return Verdict(amount <= remaining, False, remaining)


def usd(amount: float) -> str:
    """Money in messages: enough digits to be true ($0.000015, not $0.00)."""
    if amount == 0:
        return "$0"
    if amount >= 1:
        return f"${amount:,.2f}"
    return "$" + f"{amount:.10f}".rstrip("0").rstrip(".")


class SpendBook:
    """Each key's spend in this process: what the ledger has committed, plus what is
    still queued here, plus what in-flight requests have reserved.

    The writer reports every committed batch with the keys' new committed totals, and
    in the same step the batch leaves ``pending``, so a request is never counted twice
    or missed.
    """

    def __init__(self) -> None:
        self._committed: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._reserved: dict[str, float] = {}
        self._reservations: dict[int, tuple[str, float]] = {}
        self._next_id = 0

    def spent(self, key_id: str) -> float:
        return self._committed.get(key_id, 0.0) + self._pending.get(key_id, 0.0)

    def reserved(self, key_id: str) -> float:
        return self._reserved.get(key_id, 0.0)

    def reserve(self, key_id: str, budget: float, amount: float) -> tuple[Verdict, int | None]:
        verdict = judge(budget, self.spent(key_id), self.reserved(key_id), amount)
        if not verdict.allowed:
            return verdict, None
        self._next_id += 1
        self._reservations[self._next_id] = (key_id, amount)
        self._reserved[key_id] = self._reserved.get(key_id, 0.0) + amount
        return verdict, self._next_id

    def settle(self, key_id: str, reservation: int | None, cost: float) -> None:
        """Replace the reservation (if any) by the real cost."""
        held = self._reservations.pop(reservation, None) if reservation is not None else None
        if held is not None:
            left = self._reserved.get(held[0], 0.0) - held[1]
            if left > 1e-12:
                self._reserved[held[0]] = left
            else:
                self._reserved.pop(held[0], None)
        if cost:
            self._pending[key_id] = self._pending.get(key_id, 0.0) + cost

    def release_key(self, key_id: str) -> None:
        """A revoked key's reservations go (its in-flight requests still settle their cost)."""
        self._reserved.pop(key_id, None)
        for rid in [r for r, (k, _) in self._reservations.items() if k == key_id]:
            del self._reservations[rid]

    def set_committed(self, totals: dict[str, float]) -> None:
        # Spend only grows: an older snapshot must not undo a newer total.
        for key_id, total in totals.items():
            if total > self._committed.get(key_id, 0.0):
                self._committed[key_id] = total

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        # Rows replayed from an earlier process's journal were never pending here.
        fresh = [u for u in rows if not u.recovered]
        for key_id, cost in spend_by_key(fresh).items():
            left = self._pending.get(key_id, 0.0) - cost
            if left > 1e-12:
                self._pending[key_id] = left
            else:
                self._pending.pop(key_id, None)
        self.set_committed(totals)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        return None
