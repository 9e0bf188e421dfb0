"""Budgets: each key's spend, so that admission can refuse a key over its budget.

The ledger is the truth; this book adds what is still on its way there.
"""

from __future__ import annotations

from collections.abc import Sequence

from daemon.ledger.base import spend_by_key
from daemon.usage import Usage


class SpendBook:
    """Each key's spend: what the ledger has committed plus what is still queued here.

    Budgets are checked against ``spent(key)`` before each request. The writer reports
    every committed batch with the keys' new committed totals, and in the same step the
    batch leaves ``pending``, so a request is never counted twice or missed.
    """

    def __init__(self) -> None:
        self._committed: dict[str, float] = {}
        self._pending: dict[str, float] = {}

    def spent(self, key_id: str) -> float:
        return self._committed.get(key_id, 0.0) + self._pending.get(key_id, 0.0)

    def add(self, key_id: str, cost: float) -> None:
        if cost:
            self._pending[key_id] = self._pending.get(key_id, 0.0) + cost

    def set_committed(self, totals: dict[str, float]) -> None:
        # Spend only grows: an older snapshot must not undo a newer total.
        for key_id, total in totals.items():
            if total > self._committed.get(key_id, 0.0):
                self._committed[key_id] = total

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        for key_id, cost in spend_by_key(rows).items():
            left = self._pending.get(key_id, 0.0) - cost
            if left > 1e-12:
                self._pending[key_id] = left
            else:
                self._pending.pop(key_id, None)
        self.set_committed(totals)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        return None
