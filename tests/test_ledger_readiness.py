"""What the ledger writer tells /readyz and /health while the database fails, and how it
counts the rows it journals or drops: a real SQLite store whose writes fail, a real
journal on disk, and the clock passed in."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from daemon.ledger.sqlite import SQLiteStore
from daemon.ledger.writer import LedgerWriter
from daemon.usage import Usage
from tests.fakes import Failing
from tests.helpers import eventually
from tests.test_ledger import usage

DISK_FULL = "OperationalError: database or disk is full"


def scenario(
    tmp_path: Path, body: Callable[[LedgerWriter, Failing], Awaitable[None]], **kwargs: object
) -> None:
    async def run() -> None:
        store = Failing(
            SQLiteStore(tmp_path / "ledger.db"),
            frozenset({"write_requests"}),
            lambda: sqlite3.OperationalError("database or disk is full"),
        )
        await store.open()
        writer = LedgerWriter(store, **kwargs)  # type: ignore[arg-type]
        if writer.journal_dir is not None:
            await writer.start()  # opens the journal
        try:
            await body(writer, store)
        finally:
            await writer.close(timeout_s=0.5)
            await store.close()

    asyncio.run(run())


def test_ready_while_writes_succeed(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        assert writer.readiness() == (True, "ledger writes succeed")
        writer.submit(usage())
        assert await writer.flush()
        assert writer.readiness(now=10**10) == (True, "ledger writes succeed")

    scenario(tmp_path, body, journal=False)


def test_without_a_journal_a_failing_database_makes_the_replica_unready(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        writer.submit(usage())
        assert not await writer.flush()
        assert writer.failing and not writer.absorbing
        assert writer.readiness() == (
            False,
            f"ledger writes fail ({DISK_FULL}) and rows cannot be journaled: no journal configured",
        )

    scenario(tmp_path, body, journal=False)


def test_with_a_journal_the_replica_stays_ready_for_the_grace_period(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        for _ in range(3):
            writer.submit(usage())
        assert not await writer.flush()
        assert writer.absorbing and writer.journal_depth == 3 and writer.rows_journaled == 3
        assert writer.outage_since is not None
        start = writer.outage_since
        ready, why = writer.readiness(now=start + 12)
        assert ready and why == (
            "ledger database failing for 12s; the journal absorbs the rows (3 so far)"
        )
        assert writer.readiness(now=start + 30)[0]  # the grace period is inclusive
        ready, why = writer.readiness(now=start + 31)
        assert not ready and why == (
            f"ledger database failing for 31s ({DISK_FULL}); "
            "3 rows journaled, replayed when it returns"
        )
        # More rows spill after another failed write: the count adds up.
        writer.submit(usage())
        assert not await writer.flush()
        assert writer.rows_journaled == 4 and writer.outage_since == start
        store.down = False
        assert await writer.flush()
        assert writer.readiness() == (True, "ledger writes succeed")
        assert writer.journal_depth == 0 and writer.outage_since is None

    scenario(tmp_path, body, journal_dir=tmp_path / "journal", ready_during_outage_s=30.0)


def test_a_nearly_full_journal_makes_the_replica_unready(tmp_path: Path) -> None:
    row_bytes = 600  # about one journal line

    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        writer.submit(usage())
        assert not await writer.flush()
        assert writer.journal_depth == 1
        writer.journal_max_bytes = int(writer.journal_bytes / 0.95)
        ready, why = writer.readiness()
        assert not ready and why == f"ledger database failing ({DISK_FULL}); journal 95% full"
        writer.journal_max_bytes = writer.journal_bytes * 2
        assert writer.readiness()[0]

    scenario(tmp_path, body, journal_dir=tmp_path / "journal", journal_max_bytes=10 * row_bytes)


def test_rows_that_do_not_fit_the_journal_are_counted_as_dropped(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        for _ in range(10):
            writer.submit(usage())
        assert not await writer.flush()
        kept = writer.journal_depth
        assert 0 < kept < 10
        assert writer.rows_journaled == kept
        assert (writer.billed_dropped, writer.rows_dropped) == (10 - kept, 10 - kept)
        writer.submit(usage())  # the journal is full now: this one is lost too, and counted
        assert not await writer.flush()
        assert writer.journal_depth == kept
        assert (writer.billed_dropped, writer.rows_dropped) == (11 - kept, 11 - kept)

    scenario(tmp_path, body, journal_dir=tmp_path / "journal", journal_max_bytes=1000)


def test_without_a_journal_the_memory_queue_drops_the_oldest_billed_rows(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        rows = [usage() for _ in range(5)]
        for u in rows:
            writer.submit(u)
        assert writer.depth == 3
        assert (writer.rows_dropped, writer.billed_dropped) == (2, 2)
        assert await writer.flush()
        stored = await store.usage(0.0, "key")
        assert sum(g.requests for g in stored) == 3

    scenario(tmp_path, body, journal=False, max_queue=3)


def test_rows_waiting_in_memory_too_long_are_journaled(tmp_path: Path) -> None:
    """Even with the database healthy: a row waits at most ``spill_after_s`` in memory,
    which bounds what a SIGKILL can lose."""

    async def body(writer: LedgerWriter, store: Failing) -> None:
        for _ in range(3):
            writer.submit(usage())
        await eventually(lambda: writer.journal_depth == 3, timeout=5)
        assert writer.rows_journaled == 3 and writer.rows_written == 0
        assert await writer.flush()  # replayed from the journal
        assert writer.rows_written == 3 and writer.journal_depth == 0

    scenario(
        tmp_path,
        body,
        journal_dir=tmp_path / "journal",
        flush_interval_s=3600.0,
        spill_after_s=0.1,
    )


def test_an_unusable_journal_directory_is_reported_and_rows_wait_in_memory(
    tmp_path: Path,
) -> None:
    (tmp_path / "journal").write_text("a file where the directory should be")

    async def body(writer: LedgerWriter, store: Failing) -> None:
        assert not writer.journal_enabled
        assert writer.journal_error is not None and "journal" in writer.journal_error
        store.down = True
        writer.submit(usage())
        assert not await writer.flush()
        ready, why = writer.readiness()
        assert not ready and why.endswith(f"rows cannot be journaled: {writer.journal_error}")
        assert writer.depth == 1  # kept in memory for the next attempt

    scenario(tmp_path, body, journal_dir=tmp_path / "journal")


def refused_row() -> Usage:
    row = usage(cost=0.0, error="rate_limited")
    row.status_code = 429
    return row


class ArrivalsDuringWrite:
    """A real store whose write fails while more refused requests arrive meanwhile."""

    def __init__(self, store: Failing, writer: LedgerWriter, arrivals: int) -> None:
        self.inner, self.writer, self.arrivals = store, writer, arrivals

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        for _ in range(self.arrivals):
            self.writer.submit(refused_row())
        self.arrivals = 0
        return await self.inner.write_requests(rows)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_refused_rows_kept_for_a_retry_stay_within_their_bound(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        for _ in range(5):
            writer.submit(refused_row())
        writer.store = ArrivalsDuringWrite(store, writer, arrivals=3)  # type: ignore[assignment]
        store.down = True
        assert not await writer.flush()
        # 3 arrived while 5 were being written: 2 of the 5 fit back, 3 are dropped.
        assert writer.rejected_depth == 5 and writer.rejected_dropped == 3
        assert writer.billed_dropped == 0 and writer.rows_dropped == 3
        # Another round: the drops add up.
        writer.store = ArrivalsDuringWrite(store, writer, arrivals=1)  # type: ignore[assignment]
        assert not await writer.flush()
        assert writer.rejected_depth == 5 and writer.rejected_dropped == 4
        assert writer.rows_dropped == 4
        store.down = False
        writer.store = store  # type: ignore[assignment]
        assert await writer.flush()
        assert writer.rejected_depth == 0 and writer.rows_written == 5

    scenario(tmp_path, body, journal=False, rejected_max_queue=5)


def test_close_writes_the_refused_rows_left(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        for _ in range(4):
            writer.submit(refused_row())
        await writer.close(timeout_s=5)
        assert writer.rows_written == 4 and writer.depth == 0
        stored = await store.usage(0.0, "key")
        assert sum(g.requests for g in stored) == 4

    scenario(tmp_path, body, journal=False)


def test_rows_after_close_are_counted_as_dropped(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        await writer.close(timeout_s=1)
        writer.submit(usage())
        writer.submit(refused_row())
        writer.submit(usage())
        assert (writer.rows_dropped, writer.billed_dropped) == (3, 2)

    scenario(tmp_path, body, journal=False)
