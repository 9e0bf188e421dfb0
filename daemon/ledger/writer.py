"""The batching ledger writer: the request path hands rows over and never waits.

``submit`` appends to an in-memory queue and returns. A background task writes the
queue in batches (up to ``batch_size`` rows, at least every ``flush_interval_s``).
Every write is idempotent (rows carry a unique ``row_id``), so retrying a batch
whose commit succeeded but whose answer was lost stores nothing twice.

Billed rows are never dropped for lack of memory. While the database cannot take
them, they go to a journal on local disk (``daemon/ledger/journal.py``) and are
replayed, in order, when it returns; a row that has waited ``spill_after_s`` in
memory (a slow or hung database) is journaled too, so a SIGKILL loses at most the
last moment of rows. Rejected requests (status >= 400 at no cost: 401s, 429s) have
their own bounded queue and never reach the journal: a client hammering with a
refused key cannot push anyone's billed rows out. See docs/ledger.md.

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
from pathlib import Path
from typing import Any, Protocol

from daemon.ledger.base import Store, is_rejected
from daemon.ledger.journal import Journal, JournalError
from daemon.usage import Usage

log = logging.getLogger("chatvault.ledger")

DEFAULT_JOURNAL_MAX_BYTES = 1 << 30


class WriterObserver(Protocol):
    """Who wants to know about batches: metrics, tracing, the budget book.

    ``batch_written`` reports each row once, when it is known to be stored (newly
    inserted, or found already stored by a retry); ``totals`` are the committed spend
    of the batch's keys afterwards. Rows with ``recovered`` set were journaled by an
    earlier process: their spend was never pending in this one.
    """

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
        journal_dir: Path | None = None,
        journal_max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES,
        journal: bool = True,
        spill_after_s: float = 0.5,
        rejected_max_queue: int = 10_000,
        ready_during_outage_s: float = 30.0,
        journal_retry_s: float = 1.0,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.max_backoff_s = max_backoff_s
        self.observers = list(observers)
        self.instrument = instrument  # wraps each batch write, e.g. in a span
        # Where rows wait during outages: ledger.journal_dir, else beside a SQLite file.
        self.journal_dir = (journal_dir or getattr(store, "journal_dir", None)) if journal else None
        self.journal_max_bytes = journal_max_bytes
        self.spill_after_s = spill_after_s
        self.rejected_max_queue = rejected_max_queue
        self.ready_during_outage_s = ready_during_outage_s
        self._journal: Journal | None = None
        self.journal_error: str | None = None
        # After the journal's disk refuses an append, the next try waits this long.
        self.journal_retry_s = journal_retry_s
        self._journal_failed_at = 0.0
        # Billed rows not yet stored anywhere, with the monotonic time they arrived.
        self._queue: deque[tuple[float, Usage]] = deque()
        self._rejected: deque[Usage] = deque()
        # The batch being written straight to the database, and since when.
        self._inflight: list[Usage] | None = None
        self._inflight_since = 0.0
        self._inflight_journaled = False
        # Rows already reported to observers whose journal copy is still to be replayed.
        self._reported: set[str] = set()
        self._wakeup = asyncio.Event()
        self._writing: asyncio.Task[None] | None = None  # the write loop
        self._guarding: asyncio.Task[None] | None = None  # the guard, only with a journal
        self._closing = False
        self._closed = False
        self._last_sync = 0.0
        self.rows_written = 0
        self.write_failures = 0
        self.rows_dropped = 0  # billed and rejected together (the existing metric)
        self.billed_dropped = 0  # journal full or unusable: the number that must stay 0
        self.rejected_dropped = 0  # rejected rows beyond their queue's bound
        self.rows_journaled = 0
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.outage_since: float | None = None  # first failure of the current failing run

    # -- state for health, readiness and metrics ------------------------------------------

    @property
    def depth(self) -> int:
        """Rows waiting in memory (billed and rejected)."""
        return len(self._queue) + len(self._rejected) + len(self._inflight or ())

    @property
    def rejected_depth(self) -> int:
        return len(self._rejected)

    @property
    def journal_depth(self) -> int:
        return self._journal.depth if self._journal is not None else 0

    @property
    def journal_bytes(self) -> int:
        return self._journal.pending_bytes if self._journal is not None else 0

    @property
    def journal_enabled(self) -> bool:
        return self._journal is not None

    @property
    def rows_recovered(self) -> int:
        """Rows found at start in journals left by earlier processes."""
        return self._journal.rows_recovered if self._journal is not None else 0

    @property
    def failing(self) -> bool:
        """The most recent write attempt failed."""
        if self.last_failure is None:
            return False
        return self.last_success is None or self.last_failure > self.last_success

    @property
    def absorbing(self) -> bool:
        """The database is failing and the journal is taking the rows meanwhile (not
        when its disk refuses them: they wait in memory then, as without a journal)."""
        return self.failing and self._journal is not None and self.journal_error is None

    def readiness(self, now: float | None = None) -> tuple[bool, str]:
        """Should this replica take traffic, as far as the ledger goes, and why.

        Ready while writes succeed, and during a database outage shorter than
        ``ready_during_outage_s`` while the journal absorbs the rows (nothing is lost,
        and every replica failing together would only turn a blip into an outage).
        """
        if not self.failing:
            return True, "ledger writes succeed"
        now = time.time() if now is None else now
        down_s = now - (self.outage_since or now)
        error = self.last_error or "unknown error"
        if self._journal is None or self.journal_error is not None:
            reason = self.journal_error or "no journal configured"
            return False, f"ledger writes fail ({error}) and rows cannot be journaled: {reason}"
        used = self._journal.disk_bytes / max(self.journal_max_bytes, 1)
        if used >= 0.9:
            return False, f"ledger database failing ({error}); journal {used:.0%} full"
        if down_s > self.ready_during_outage_s:
            return False, (
                f"ledger database failing for {down_s:.0f}s ({error}); "
                f"{self.journal_depth} rows journaled, replayed when it returns"
            )
        return True, (
            f"ledger database failing for {down_s:.0f}s; the journal absorbs the rows "
            f"({self.journal_depth} so far)"
        )

    # -- the request path -----------------------------------------------------------------

    def submit(self, usage: Usage) -> None:
        if self._closed:
            # Too late to be written: say so rather than lose it silently.
            self.rows_dropped += 1
            if not is_rejected(usage):
                self.billed_dropped += 1
            log.error("ledger row after shutdown, dropped (request_id=%s)", usage.request_id)
            return
        if is_rejected(usage):
            if len(self._rejected) >= self.rejected_max_queue:
                self.rejected_dropped += 1
                self.rows_dropped += 1
                return
            self._rejected.append(usage)
            return
        self._queue.append((time.monotonic(), usage))
        if len(self._queue) >= self.max_queue:
            self._spill("memory queue full")  # pragma: no mutate (log wording)
        elif len(self._queue) >= self.batch_size:
            self._wakeup.set()

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.journal_dir is not None and self._journal is None:
            journal = Journal(self.journal_dir, max_bytes=self.journal_max_bytes)
            try:
                await asyncio.to_thread(journal.open)  # may count a large leftover journal
                self._journal = journal
            except JournalError as exc:
                # The daemon still runs; rows then wait in memory only, and health says so.
                self.journal_error = str(exc)
                log.error("ledger journal unavailable, rows wait in memory only: %s", exc)
        task = asyncio.create_task  # the names only label the tasks for debugging
        self._writing = task(self._run(), name="chatvault-ledger-writer")  # pragma: no mutate
        if self._journal is not None:
            self._guarding = task(self._guard(), name="chatvault-ledger-guard")  # pragma: no mutate

    async def flush(self) -> bool:
        """Write everything waiting now (journal first, then memory); True when done."""
        if self._journal is not None and not self._journal.empty:
            self._spill(None)  # keep the order: newer rows queue up behind the journal
            if not await self._replay():
                return False
        while self._queue:
            n = min(self.batch_size, len(self._queue))
            batch = [self._queue.popleft()[1] for _ in range(n)]
            if not await self._write_direct(batch):
                return False
            if self._journal is not None and not self._journal.empty:
                return await self.flush()  # a slow write was journaled meanwhile
        while self._rejected:
            n = min(self.batch_size, len(self._rejected))
            batch = [self._rejected.popleft() for _ in range(n)]
            if not await self._write(batch):
                room = self.rejected_max_queue - len(self._rejected)
                kept = batch[:room] if room > 0 else []
                self._rejected.extendleft(reversed(kept))
                self.rejected_dropped += len(batch) - len(kept)
                self.rows_dropped += len(batch) - len(kept)
                return False
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop, write what is left for up to ``timeout_s``, journal whatever still is not."""
        self._closing = True
        self._wakeup.set()  # the write loop sees _closing and returns
        if self._guarding is not None:
            self._guarding.cancel()
        for task in (self._writing, self._guarding):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._writing = self._guarding = None
        deadline = time.monotonic() + timeout_s
        backoff = 0.05
        while (self._queue or self._rejected or self.journal_depth) and (
            time.monotonic() < deadline
        ):
            if not await self.flush():
                await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0)))
                backoff = min(backoff * 2, 1.0)
        if self._queue:
            self._spill(None)  # the next start replays them
        if self._queue or self._rejected:  # pragma: no mutate (only decides a log line)
            log.error(
                "ledger: %d rows could not be written or journaled before exit",
                len(self._queue) + len(self._rejected),
            )
        if self._journal is not None:
            if self.journal_depth:
                log.warning(
                    "ledger: %d rows stay in the journal for the next start", self.journal_depth
                )
            await asyncio.to_thread(self._journal.sync)
            self._journal.close()
        self._closed = True

    # -- the loops ----------------------------------------------------------------------------

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

    async def _guard(self) -> None:
        """Journal rows that have waited too long in memory, whatever the write loop is
        doing (a hung database holds it in an await): this bounds what a SIGKILL loses."""
        journal = self._journal
        assert journal is not None  # started only with one
        interval = max(self.spill_after_s / 2, 0.02)
        while True:
            await asyncio.sleep(interval)
            limit = time.monotonic() - self.spill_after_s
            stale = (self._inflight is not None and self._inflight_since < limit) or (
                bool(self._queue) and self._queue[0][0] < limit
            )
            if stale:
                why = f"rows waited over {self.spill_after_s:g}s"  # pragma: no mutate (log wording)
                self._spill(why)
            if time.monotonic() - self._last_sync >= 1.0:
                self._last_sync = time.monotonic()
                await asyncio.to_thread(journal.sync)

    # -- writing --------------------------------------------------------------------------------

    def _spill(self, why: str | None) -> None:
        """Move the in-flight batch (if not yet journaled) and the memory queue into the
        journal, oldest first. Without a journal: bound memory by dropping the oldest."""
        rows: list[Usage] = []
        if self._inflight is not None and not self._inflight_journaled:
            rows.extend(self._inflight)
        rows.extend(u for _, u in self._queue)
        if not rows:
            return
        if self._journal is None:
            self._bound_memory("no journal")  # pragma: no mutate (log wording)
            return
        if (
            self.journal_error is not None
            and time.monotonic() < self._journal_failed_at + self.journal_retry_s
        ):
            # The disk refused the last append: retrying on every request would serialise
            # the whole queue each time, to fail again.
            self._bound_memory("journal unusable")  # pragma: no mutate (log wording)
            return
        try:
            taken = self._journal.append(rows)
        except JournalError as exc:
            self.journal_error = str(exc)
            self._journal_failed_at = time.monotonic()
            log.error("ledger journal write failed, rows stay in memory: %s", exc)
            self._bound_memory("journal unusable")  # pragma: no mutate (log wording)
            return
        self.journal_error = None
        self.rows_journaled += taken
        if why and taken:  # pragma: no mutate (only decides a log line)
            log.info("ledger: %d rows journaled (%s)", taken, why)
        if self._inflight is not None:
            self._inflight_journaled = True
        self._queue.clear()
        lost = len(rows) - taken
        if lost:
            self.rows_dropped += lost
            self.billed_dropped += lost
            log.error(
                "ledger journal full (%d bytes): %d billed rows dropped",
                self.journal_max_bytes,
                lost,
            )

    def _bound_memory(self, why: str) -> None:
        """Rows that can go nowhere but memory: keep the newest ``max_queue`` of them and
        count the rest as dropped, rather than grow until the process is killed and loses
        them all (readiness is down meanwhile, so traffic goes elsewhere)."""
        excess = len(self._queue) - self.max_queue
        if excess <= 0:
            return
        for _ in range(excess):
            self._queue.popleft()
        self.rows_dropped += excess
        self.billed_dropped += excess
        log.error("ledger queue full (%s): %d billed rows dropped", why, excess)

    async def _write_direct(self, batch: list[Usage]) -> bool:
        self._inflight, self._inflight_journaled = batch, False
        self._inflight_since = time.monotonic()
        try:
            ok = await self._write(batch)
        finally:
            journaled, self._inflight = self._inflight_journaled, None
        if ok:
            if journaled:  # stored and reported: its journal copy must not report again
                self._reported.update(u.row_id for u in batch)
            return True
        if not journaled:
            # Back in front of the queue, then (with a journal) onto disk right away.
            now = time.monotonic()
            self._queue.extendleft((now, u) for u in reversed(batch))
            self._spill("database write failed")  # pragma: no mutate (log wording)
        return False

    async def _replay(self) -> bool:
        journal = self._journal
        assert journal is not None
        while True:
            chunk = journal.read(self.batch_size)
            if not chunk.rows:
                journal.commit(chunk)
                return journal.empty or chunk.segment is None
            if not await self._write(chunk.rows):
                return False
            if self._reported:
                for u in chunk.rows:
                    self._reported.discard(u.row_id)
            journal.commit(chunk)

    async def _write(self, batch: list[Usage]) -> bool:
        """Write ``batch``; False when it should be retried later, unless the data itself is
        refused: then the rows go one by one and only the refused ones are dropped, so
        one bad row cannot stall the ledger."""
        started = time.perf_counter()
        try:
            with self.instrument(len(batch)) if self.instrument else contextlib.nullcontext():
                totals = await self.store.write_requests(batch)
        except Exception as exc:
            self.write_failures += 1
            self.last_failure = time.time()
            if self.outage_since is None:
                self.outage_since = self.last_failure
            self.last_error = f"{type(exc).__name__}: {exc}"
            for observer in self.observers:
                observer.batch_failed(batch, time.perf_counter() - started, exc)
            if not self.store.is_permanent(exc):
                log.warning(
                    "ledger write failed (%d rows kept for retry): %s", len(batch), self.last_error
                )
                return False
            if len(batch) == 1:
                self.rows_dropped += 1
                if not is_rejected(batch[0]):
                    self.billed_dropped += 1
                log.error(
                    "ledger refused a row, dropped (request_id=%s): %s",
                    batch[0].request_id,
                    self.last_error,
                )
                return True
            # Rows stored or dropped by an earlier pass over this batch are done: a row
            # stored twice is harmless (idempotent) but would report twice, and a refused
            # row would be counted as dropped again.
            done: list[str] = []
            for row in batch:
                if row.row_id not in self._reported and not await self._write([row]):
                    # Retried later with the rest.
                    self._reported.update(done)
                    return False
                done.append(row.row_id)
            self._reported.difference_update(done)
            return True
        fresh = batch
        if self._reported:
            fresh = [u for u in batch if u.row_id not in self._reported]
        self.rows_written += len(fresh)
        self.last_success = time.time()
        self.outage_since = None
        elapsed = time.perf_counter() - started
        for observer in self.observers:
            observer.batch_written(fresh, elapsed, totals)
        return True
