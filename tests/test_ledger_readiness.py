"""What the ledger writer tells /readyz and /health while the database fails, and how it
counts the rows it journals or drops: a real SQLite store whose writes fail, a real
journal on disk, and the clock passed in.

Then the writer at its edges: the refused-row queue's bound when a burst arrives during
a failed write, the memory queue's bound and the batch size at their exact values, a
write that outlasts ``spill_after_s``, a journal exactly 90 % full, and a journal disk
that refuses writes (``/dev/full`` standing for a full disk). No waiting on time except
for conditions, with deadlines."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from itertools import pairwise
from pathlib import Path

import pytest

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
        submitted = time.monotonic()
        for _ in range(3):
            writer.submit(usage())
        await eventually(lambda: writer.journal_depth == 3, timeout=5)
        # Not before they have waited spill_after_s (the guard looks twice as often).
        assert time.monotonic() - submitted >= 0.2
        assert writer.rows_journaled == 3 and writer.rows_written == 0
        assert await writer.flush()  # replayed from the journal
        assert writer.rows_written == 3 and writer.journal_depth == 0

    scenario(
        tmp_path,
        body,
        journal_dir=tmp_path / "journal",
        flush_interval_s=3600.0,
        spill_after_s=0.2,
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
        started = time.monotonic()
        await writer.close(timeout_s=5)
        assert time.monotonic() - started < 2.5  # done once all is written, not at 5 s
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


class Reports:
    """A writer observer counting the rows reported as stored."""

    def __init__(self) -> None:
        self.written: Counter[str] = Counter()

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        self.written.update(u.row_id for u in rows)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        pass


async def stored(store: Failing) -> int:
    return sum(g.requests for g in await store.usage(0.0, "key"))


# -- refused rows (status >= 400, no cost) ------------------------------------------------


def test_refused_rows_beyond_their_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        for _ in range(5):
            writer.submit(refused_row())
        assert writer.rejected_depth == 2
        assert (writer.rejected_dropped, writer.rows_dropped, writer.billed_dropped) == (3, 3, 0)
        assert await writer.flush()
        assert await stored(store) == 2

    scenario(tmp_path, body, journal=False, rejected_max_queue=2)


def test_a_failed_write_keeps_only_what_fits_after_a_burst_of_refused_rows(
    tmp_path: Path,
) -> None:
    """The bound holds whatever arrives while a write of refused rows fails: the newer
    arrivals keep their place, and of the failed batch only what still fits goes back."""

    async def body(writer: LedgerWriter, store: Failing) -> None:
        first = [refused_row() for _ in range(5)]
        for u in first:
            writer.submit(u)
        store.down = True
        # 4 arrive during the write: room for 1 of the 5 being written (the oldest).
        writer.store = ArrivalsDuringWrite(store, writer, arrivals=4)  # type: ignore[assignment]
        assert not await writer.flush()
        assert writer.rejected_depth == 5
        assert (writer.rejected_dropped, writer.rows_dropped) == (4, 4)
        # 7 arrive during the next failed write, more than the whole bound: 5 fit the
        # emptied queue, 2 are refused at once, and all 5 of the failed batch are dropped.
        writer.store = ArrivalsDuringWrite(store, writer, arrivals=7)  # type: ignore[assignment]
        assert not await writer.flush()
        assert writer.rejected_depth == 5
        assert (writer.rejected_dropped, writer.rows_dropped) == (4 + 2 + 5, 4 + 2 + 5)
        assert writer.billed_dropped == 0
        store.down = False
        writer.store = store
        assert await writer.flush()
        assert writer.rows_written == 5 and await stored(store) == 5
        assert writer.depth == 0

    scenario(tmp_path, body, journal=False, rejected_max_queue=5)


# -- billed rows: the memory queue and the batch size ------------------------------------


def test_a_memory_queue_reaching_max_queue_goes_to_the_journal_at_once(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        writer.submit(usage())
        assert await writer.flush()  # a healthy database: straight in, no journal
        assert (writer.rows_written, writer.rows_journaled) == (1, 0)
        writer.submit(usage())
        writer.submit(usage())
        assert (writer.depth, writer.journal_depth) == (2, 0)
        writer.submit(usage())  # the third reaches the bound
        assert (writer.depth, writer.journal_depth) == (0, 3)
        assert writer.rows_journaled == 3 and writer.rows_dropped == 0
        assert await writer.flush()
        assert writer.rows_written == 4 and await stored(store) == 4

    scenario(
        tmp_path,
        body,
        journal_dir=tmp_path / "journal",
        max_queue=3,
        flush_interval_s=3600.0,
        spill_after_s=3600.0,
    )


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval(tmp_path: Path) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        await writer.start()
        for _ in range(3):
            writer.submit(usage())
        await eventually(lambda: writer.rows_written == 3, timeout=5)
        assert await stored(store) == 3

    scenario(tmp_path, body, journal=False, batch_size=3, flush_interval_s=3600.0)


# -- a write slower than spill_after_s ------------------------------------------------------


class SlowUntilJournaled:
    """A real store whose first write takes long: a request finishes meanwhile, and the
    write returns (successfully) once the guard has moved the batch being written and
    the newcomer to the journal."""

    def __init__(self, store: Failing, writer: LedgerWriter, arrival: Usage) -> None:
        self.inner, self.writer, self.arrival = store, writer, arrival
        self.slow = True

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        if self.slow:
            self.slow = False
            self.writer.submit(self.arrival)
            expected = len(rows) + 1
            await eventually(lambda: self.writer.journal_depth == expected, timeout=5)
        totals: dict[str, float] = await self.inner.write_requests(rows)
        return totals

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_rows_journaled_during_a_slow_write_are_replayed_by_the_same_flush(
    tmp_path: Path,
) -> None:
    """A flush that returns True has written everything, the journal included, and
    stores and reports each row once although the batch in flight was also journaled."""
    reports = Reports()

    async def body(writer: LedgerWriter, store: Failing) -> None:
        rows = [usage() for _ in range(3)]
        writer.submit(rows[0])
        writer.submit(rows[1])
        writer.store = SlowUntilJournaled(store, writer, rows[2])  # type: ignore[assignment]
        assert await writer.flush()
        assert writer.journal_depth == 0 and writer.depth == 0
        assert writer.rows_written == 3
        assert reports.written == Counter(u.row_id for u in rows)
        assert await stored(store) == 3

    scenario(
        tmp_path,
        body,
        journal_dir=tmp_path / "journal",
        batch_size=3,  # the write loop stays asleep: this flush alone writes
        flush_interval_s=3600.0,
        spill_after_s=0.05,
        observers=[reports],
    )


# -- the journal: exactly 90 % full, and a disk that refuses writes -------------------------


def test_the_replica_turns_unready_when_the_journal_is_exactly_90_percent_full(
    tmp_path: Path,
) -> None:
    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        # Rows of different sizes until the journal's size divides by 9, so that a bound
        # of size * 10 / 9 makes it exactly 90 % full (9k / 10k is the float 0.9). With
        # one timestamp the rows differ only by their model's length (sizes a * n + b),
        # so at the latest nine of them add up to a multiple of 9; with the clock's
        # timestamps, of varying length, 39 rows missed it about once in a hundred runs.
        for n in range(1, 40):
            writer.submit(usage(model="m" * n, ts=1_800_000_000.25))
            assert not await writer.flush()
            if writer.journal_bytes % 9 == 0:
                break
        size = writer.journal_bytes
        assert size % 9 == 0
        writer.journal_max_bytes = size * 10 // 9
        ready, why = writer.readiness()
        assert not ready and why == f"ledger database failing ({DISK_FULL}); journal 90% full"
        writer.journal_max_bytes += 1
        assert writer.readiness()[0]

    scenario(tmp_path, body, journal_dir=tmp_path / "journal", journal_max_bytes=1 << 20)


def test_a_journal_disk_that_refuses_writes_keeps_the_rows_in_memory(tmp_path: Path) -> None:
    journal = tmp_path / "journal"

    async def body(writer: LedgerWriter, store: Failing) -> None:
        # The journal's first segment file is a device whose every write fails with
        # ENOSPC: a full disk. Its name is the writer's id (its lock file's) and .s1.
        (lock,) = journal.glob("*.lock")
        (journal / f"{lock.stem}.s00000001.jsonl").symlink_to("/dev/full")
        store.down = True
        rows = [usage() for _ in range(2)]
        for u in rows:
            writer.submit(u)
        assert not await writer.flush()
        assert writer.journal_error is not None
        assert "No space left on device" in writer.journal_error
        assert (writer.depth, writer.journal_depth) == (2, 0)  # nothing lost
        assert (writer.rows_journaled, writer.rows_dropped) == (0, 0)
        # Nothing reaches the disk: as without a journal, the replica is not ready.
        assert not writer.absorbing
        ready, why = writer.readiness()
        assert not ready and why == (
            f"ledger writes fail ({DISK_FULL}) and rows cannot be journaled: {writer.journal_error}"
        )
        # Within ``journal_retry_s`` of the refusal the journal is not tried again.
        rows.append(usage())
        writer.submit(rows[-1])
        assert not await writer.flush()
        assert writer.journal_error is not None and writer.depth == 3
        # Once it has passed, the next attempt leaves the refusing segment behind and
        # journals the rows in a new one: the error is cleared.
        writer.journal_retry_s = 0.0
        assert not await writer.flush()
        assert writer.journal_error is None
        assert (writer.depth, writer.journal_depth, writer.rows_journaled) == (0, 3, 3)
        assert writer.absorbing and writer.readiness()[0]
        store.down = False
        assert await writer.flush()
        assert writer.rows_written == 3 and await stored(store) == 3
        assert writer.billed_dropped == 0

    scenario(
        tmp_path,
        body,
        journal_dir=journal,
        flush_interval_s=3600.0,
        spill_after_s=3600.0,
        journal_retry_s=3600.0,
    )


def test_while_the_journal_disk_refuses_writes_memory_stays_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows that can go neither to the database nor to the journal wait in memory up to
    ``max_queue``, the newest kept, as without a journal: unbounded, they would grow
    until the process is killed and every one of them is lost. Each drop is logged as
    an error; a queue that just reached its bound drops, and logs, nothing."""
    journal = tmp_path / "journal"

    async def body(writer: LedgerWriter, store: Failing) -> None:
        (lock,) = journal.glob("*.lock")
        (journal / f"{lock.stem}.s00000001.jsonl").symlink_to("/dev/full")
        store.down = True
        writer.submit(usage())
        assert not await writer.flush()
        assert writer.journal_error is not None
        rows = [usage() for _ in range(7)]
        for u in rows:
            writer.submit(u)
        assert writer.depth == 3
        assert (writer.billed_dropped, writer.rows_dropped, writer.rows_journaled) == (5, 5, 0)
        logged = [re.search(r"(\d+) billed rows dropped", r.getMessage()) for r in caplog.records]
        assert [int(m[1]) for m in logged if m] == [1] * 5
        assert not writer.readiness()[0]
        # The disk takes writes again: what was kept is journaled, then stored.
        writer.journal_retry_s = 0.0
        assert not await writer.flush()
        assert writer.journal_error is None and writer.journal_depth == 3
        store.down = False
        assert await writer.flush()
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            ids = {r for (r,) in db.execute("SELECT request_id FROM requests")}
        assert ids == {u.request_id for u in rows[-3:]}  # the newest three

    scenario(
        tmp_path,
        body,
        journal_dir=journal,
        max_queue=3,
        flush_interval_s=3600.0,
        spill_after_s=3600.0,
        journal_retry_s=3600.0,
    )


# -- retry pacing while the database fails --------------------------------------------------


class Attempts:
    """A writer observer recording when each failed write happened (monotonic)."""

    def __init__(self) -> None:
        self.failed_at: list[float] = []

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        pass

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        self.failed_at.append(time.monotonic())


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in pairwise(times)]


def test_the_write_loop_backs_off_exponentially_while_the_database_fails(tmp_path: Path) -> None:
    """Between failed attempts the loop waits ``flush_interval_s`` plus a backoff that
    starts at 0.1 s and doubles; a loaded machine only makes the gaps longer, so the
    test checks them from below."""
    attempts = Attempts()

    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        await writer.start()
        writer.submit(usage())
        await eventually(lambda: len(attempts.failed_at) >= 4, timeout=15)
        for gap, backoff in zip(gaps(attempts.failed_at), (0.1, 0.2, 0.4), strict=False):
            assert gap >= 0.9 * (0.01 + backoff)
        store.down = False
        await eventually(lambda: writer.rows_written == 1, timeout=15)

    scenario(tmp_path, body, journal=False, flush_interval_s=0.01, observers=[attempts])


def test_close_retries_with_a_doubling_pause_until_its_deadline(tmp_path: Path) -> None:
    attempts = Attempts()

    async def body(writer: LedgerWriter, store: Failing) -> None:
        store.down = True
        writer.submit(usage())
        started = time.monotonic()
        await writer.close(timeout_s=1.0)
        # It kept trying until the deadline, and its last pause was cut to end there
        # (0.05 + 0.1 + 0.2 + 0.4, then 0.25 s, not 0.8).
        assert 1.0 <= time.monotonic() - started < 1.4
        # 0.05 s, then 0.1, 0.2, 0.4: at least four tries, and pauses at least that long.
        assert len(attempts.failed_at) >= 4
        for gap, pause in zip(gaps(attempts.failed_at), (0.05, 0.1, 0.2), strict=False):
            assert gap >= 0.9 * pause
        assert writer.depth == 1  # kept in memory (no journal): logged, not lost silently

    scenario(tmp_path, body, journal=False, observers=[attempts])


def test_the_write_loop_keeps_its_pace_before_and_after_an_outage(tmp_path: Path) -> None:
    """No backoff before the first failure, and none left once the database is back:
    a row is written within about ``flush_interval_s`` (0.01 s here; 0.5 s allowed for a
    loaded machine, against the 0.8 s the backoff would have reached)."""
    attempts = Attempts()

    async def written_soon(writer: LedgerWriter, count: int) -> None:
        submitted = time.monotonic()
        writer.submit(usage())
        await eventually(lambda: writer.rows_written == count, timeout=15)
        assert time.monotonic() - submitted < 0.5

    async def body(writer: LedgerWriter, store: Failing) -> None:
        await writer.start()
        await written_soon(writer, 1)
        store.down = True
        writer.submit(usage())
        await eventually(lambda: len(attempts.failed_at) >= 4, timeout=15)  # backoff 0.4 s
        store.down = False
        await eventually(lambda: writer.rows_written == 2, timeout=15)
        await written_soon(writer, 3)

    scenario(tmp_path, body, journal=False, flush_interval_s=0.01, observers=[attempts])
