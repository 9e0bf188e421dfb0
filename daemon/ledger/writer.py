"""The batching ledger writer: the request path hands rows over and never waits.

``submit`` appends to an in-memory queue and returns. A background task writes the
queue in batches (up to ``batch_size`` rows, at least every ``flush_interval_s``),
retries a failed batch with backoff, and on ``close`` writes everything still queued,
so a SIGTERM loses nothing. The queue is bounded: when the database has been down
long enough to fill it, the oldest rows are dropped and counted, rather than letting
memory grow without limit.

    writer = LedgerWriter(store, batch_size=500, flush_interval_s=0.2)
    await writer.start()
    writer.submit(usage)
    await writer.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from daemon.ledger.base import Store, spend_by_key
from daemon.usage import Usage

log = logging.getLogger("chatvault.ledger")


class WriterObserver(Protocol):
    """Who wants to know about batches: metrics, tracing, the budget book."""

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None: ...

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None: ...


class LedgerWriter:
    def __init__(
        self,
        store: Store,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        max_queue: int = 100_000,
        max_backoff_s: float = 5.0,
        observers: Sequence[WriterObserver] = (),
        instrument: Callable[[int], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.max_backoff_s = max_backoff_s
        self.observers = list(observers)
        self.instrument = instrument  # wraps each batch write, e.g. in a span
        self._queue: deque[Usage] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self.rows_written = 0
        self.write_failures = 0
        self.rows_dropped = 0
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.last_failure: float | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def failing(self) -> bool:
        """The most recent write attempt failed."""
        if self.last_failure is None:
            return False
        return self.last_success is None or self.last_failure > self.last_success

    def submit(self, usage: Usage) -> None:
        if self._closed:
            # Too late to be written: say so rather than lose it silently.
            self.rows_dropped += 1
            log.error("ledger row after shutdown, dropped (request_id=%s)", usage.request_id)
            return
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.rows_dropped += 1
        self._queue.append(usage)
        if len(self._queue) >= self.batch_size:
            self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatvault-ledger-writer")

    async def flush(self) -> bool:
        """Write everything queued now; True when the queue is empty afterwards."""
        while self._queue:
            if not await self._write_one_batch():
                return False
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and write what is left, trying for up to ``timeout_s``."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        deadline = time.monotonic() + timeout_s
        backoff = 0.05
        while self._queue and time.monotonic() < deadline:
            if not await self.flush():
                await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0)))
                backoff = min(backoff * 2, 1.0)
        if self._queue:
            log.error("ledger: %d rows could not be written before exit", len(self._queue))
        self._closed = True

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval_s + backoff)
            self._wakeup.clear()
            if self._closing:
                return
            ok = await self.flush()
            backoff = 0.0 if ok else min(max(backoff * 2, 0.1), self.max_backoff_s)

    async def _write_one_batch(self) -> bool:
        n = min(self.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        return await self._write(batch)

    async def _write(self, batch: list[Usage]) -> bool:
        """Write ``batch``; on failure keep it queued (False), unless the data itself is
        refused: then the rows go one by one and only the refused ones are dropped, so
        one bad row cannot stall the ledger."""
        started = time.perf_counter()
        try:
            with self.instrument(len(batch)) if self.instrument else contextlib.nullcontext():
                totals = await self.store.write_requests(batch)
        except Exception as exc:
            self.write_failures += 1
            self.last_failure = time.time()
            self.last_error = f"{type(exc).__name__}: {exc}"
            for observer in self.observers:
                observer.batch_failed(batch, time.perf_counter() - started, exc)
            if not self.store.is_permanent(exc):
                self._queue.extendleft(reversed(batch))
                log.warning(
                    "ledger write failed (%d rows kept for retry): %s", len(batch), self.last_error
                )
                return False
            if len(batch) == 1:
                self.rows_dropped += 1
                log.error(
                    "ledger refused a row, dropped (request_id=%s): %s",
                    batch[0].request_id,
                    self.last_error,
                )
                return True
            for i, row in enumerate(batch):
                if not await self._write([row]):
                    self._queue.extendleft(reversed(batch[i + 1 :]))
                    return False
            return True
        self.rows_written += len(batch)
        self.last_success = time.time()
        elapsed = time.perf_counter() - started
        for observer in self.observers:
            observer.batch_written(batch, elapsed, totals)
        return True


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
