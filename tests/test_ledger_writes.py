"""Writes that go wrong: a commit whose answer is lost, a COMMIT that fails, a database
that hangs, a flood of refused requests; and what the store shows about itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon.budget import SpendBook
from daemon.keys import create_key
from daemon.ledger import open_store
from daemon.ledger.base import Store
from daemon.ledger.postgres import PostgresStore
from daemon.ledger.sqlite import SQLiteStore, _transaction
from daemon.ledger.writer import LedgerWriter
from daemon.usage import Usage
from tests.helpers import eventually
from tests.test_ledger import pend, store_url, usage  # noqa: F401 (fixture)


class LostAcknowledgement:
    """A real store whose first ``failures`` batch writes commit and then raise, as when
    the connection drops between COMMIT and its answer."""

    def __init__(self, store: Store, failures: int = 1) -> None:
        self.inner = store
        self.failures = failures
        self.kind = store.kind
        self.description = store.description
        self.journal_dir = None

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        totals = await self.inner.write_requests(rows)
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("connection lost after COMMIT")
        return totals

    def is_permanent(self, error: BaseException) -> bool:
        return self.inner.is_permanent(error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_batch_retried_after_its_commit_is_stored_once_and_billed_once(store_url: str) -> None:  # noqa: F811
    async def scenario() -> None:
        store = open_store(store_url)
        await store.open()
        key = create_key(name="app", now=1.0).record
        await store.insert_key(key)
        book = SpendBook()
        wrapped = LostAcknowledgement(store, failures=2)
        writer = LedgerWriter(
            wrapped,
            batch_size=50,
            flush_interval_s=0.01,
            observers=[book],
            journal=False,
        )
        await writer.start()
        rows = [usage(key.id, cost=0.01) for _ in range(120)]
        rows[5].request_id = rows[6].request_id  # clients may repeat their own ids
        for u in rows:
            writer.submit(u)
            pend(book, key.id, u.cost_usd)
        for _ in range(400):
            if writer.rows_written >= 120:
                break
            await asyncio.sleep(0.01)
        await writer.close()
        assert writer.write_failures == 2 and writer.rows_written == 120
        assert await store.key_spend() == {key.id: pytest.approx(1.2)}
        assert book.spent(key.id) == pytest.approx(1.2)  # pending moved once, not twice
        groups = await store.usage(0.0, "key")
        assert [(g.requests, round(g.cost_usd, 6)) for g in groups] == [(120, 1.2)]
        await store.close()

    asyncio.run(scenario())


def test_the_same_batch_written_twice_adds_nothing(store_url: str) -> None:  # noqa: F811
    async def scenario() -> None:
        store = open_store(store_url)
        await store.open()
        key = create_key(name="app", now=1.0).record
        await store.insert_key(key)
        batch = [usage(key.id, cost=0.5) for _ in range(3)]
        first = await store.write_requests(batch)
        # Half old, half new (a replay that overlaps what was written directly).
        again = await store.write_requests([*batch, usage(key.id, cost=0.25), batch[0]])
        assert first == {key.id: pytest.approx(1.5)} and again == {key.id: pytest.approx(1.75)}
        assert sum(g.requests for g in await store.usage(0.0, "model")) == 4
        await store.close()

    asyncio.run(scenario())


def test_a_failed_sqlite_commit_is_rolled_back(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    # A deferred constraint fails at COMMIT itself, and SQLite keeps the transaction open.
    with pytest.raises(sqlite3.IntegrityError), _transaction(conn):
        conn.execute("INSERT INTO child VALUES (42)")
    assert not conn.in_transaction
    with _transaction(conn):  # the connection is usable again
        conn.execute("INSERT INTO parent VALUES (1)")
    assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    conn.close()


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    old = os.umask(0o022)
    try:

        async def scenario() -> None:
            store = SQLiteStore(path)
            await store.open()
            await store.write_requests([usage()])
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
            await store.close()

        asyncio.run(scenario())
    finally:
        os.umask(old)


def test_a_password_in_the_query_string_is_redacted() -> None:
    store = PostgresStore("postgresql://app:pw1@db.internal/ledger?password=pw2&sslmode=require")
    assert "pw1" not in store.description and "pw2" not in store.description
    assert store.description.startswith("postgresql://app:***@db.internal/ledger?")

    async def scenario() -> str:
        # Nothing listens on port 9; the error must not quote either password.
        bad = PostgresStore("postgresql://app@127.0.0.1:9/ledger?password=pw3-secret")
        with pytest.raises(ConnectionError) as caught:
            await bad.open()
        check = await bad.check()
        return f"{caught.value} {check.error}"

    assert "pw3-secret" not in asyncio.run(scenario())


def test_refused_requests_cannot_push_out_billed_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.db"

    async def scenario() -> None:
        store = SQLiteStore(path, busy_timeout_s=0.02)
        await store.open()
        writer = LedgerWriter(
            store, batch_size=100, flush_interval_s=0.02, max_queue=50, rejected_max_queue=20
        )
        await writer.start()
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the database is unavailable for writes
        billed = [usage(cost=0.01) for _ in range(200)]
        for i in range(5000):
            refused = usage(cost=0.0, error="rate_limited")
            refused.status_code = 429
            writer.submit(refused)
            if i % 25 == 0:
                writer.submit(billed[i // 25])
        await eventually(lambda: writer.write_failures >= 1)  # the writer met the lock
        assert writer.rejected_depth == 20 and writer.rejected_dropped == 5000 - 20
        assert writer.billed_dropped == 0 and writer.depth <= 50 + 20 + 100
        blocker.execute("ROLLBACK")
        blocker.close()
        await writer.close()
        await store.close()

    asyncio.run(scenario())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        billed_rows = conn.execute("SELECT COUNT(*) FROM requests WHERE cost_usd > 0").fetchone()
        refused_rows = conn.execute("SELECT COUNT(*) FROM requests WHERE status_code = 429")
        assert billed_rows[0] == 200
        assert refused_rows.fetchone()[0] == 20


class Hung:
    """A real store whose writes hang (a network partition): nothing answers."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.kind = store.kind
        self.description = store.description
        self.hang = True

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        while self.hang:
            await asyncio.sleep(0.01)
        return await self.inner.write_requests(rows)

    def is_permanent(self, error: BaseException) -> bool:
        return False


def test_rows_waiting_on_a_hung_database_reach_the_journal_in_time(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SQLiteStore(tmp_path / "l.db")
        await store.open()
        hung = Hung(store)
        book = SpendBook()
        writer = LedgerWriter(
            hung,  # type: ignore[arg-type]
            flush_interval_s=0.02,
            spill_after_s=0.3,
            journal_dir=tmp_path / "journal",
            observers=[book],
        )
        await writer.start()
        for _ in range(30):
            u = usage(cost=0.1)
            writer.submit(u)
            pend(book, u.key_id, u.cost_usd)
        started = time.monotonic()
        while writer.journal_depth < 30:
            assert time.monotonic() - started < 2, "rows not journaled"
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 0.8  # spill_after_s plus one guard tick
        hung.hang = False
        await writer.close()
        # The in-flight batch was stored and reported; its journal copy, replayed after,
        # is neither stored nor reported again.
        assert writer.rows_written == 30 and writer.journal_depth == 0
        assert sum(g.requests for g in await store.usage(0.0, "model")) == 30
        await store.close()

    asyncio.run(scenario())
