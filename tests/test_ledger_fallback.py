"""The ledger writer's row-by-row fallback: when the database refuses a batch because of
the data in it, the rows go one at a time, the refused row alone is dropped, and every
other row is stored once and reported once (to the budget book, the metrics), even when
the database also fails for a moment in the middle of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from daemon.budget import SpendBook
from daemon.keys import create_key
from daemon.ledger import open_store
from daemon.ledger.base import Store
from daemon.ledger.writer import LedgerWriter
from daemon.usage import Usage
from tests.test_ledger import pend, store_url, usage  # noqa: F401 (fixture)

# A lone surrogate cannot be encoded as UTF-8: every database driver refuses the row.
UNSTORABLE = "model-\ud800"


class Reports:
    """A writer observer that keeps what it was told."""

    def __init__(self) -> None:
        self.written: Counter[str] = Counter()
        self.failed: list[tuple[int, str]] = []  # rows in the batch, the error's type

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        assert 0 <= seconds < 10  # a duration, for the metrics
        self.written.update(u.row_id for u in rows)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        assert 0 <= seconds < 10
        self.failed.append((len(rows), type(error).__name__))


class FailsOnceAlone:
    """A real store that loses its connection the first time ``row_id`` is written on its
    own (the fallback's single-row write), as a database restarting mid-batch would."""

    def __init__(self, store: Store, row_id: str) -> None:
        self.inner = store
        self.row_id = row_id
        self.failed = False
        self.journal_dir = None

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        if not self.failed and len(rows) == 1 and rows[0].row_id == self.row_id:
            self.failed = True
            raise ConnectionResetError("connection lost")
        return await self.inner.write_requests(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def stored_row_ids(store: Store, url: str) -> Counter[str]:
    """Every row_id in the requests table, read with the driver directly."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return Counter(r[0] for r in conn.execute("SELECT row_id FROM requests"))
    import asyncpg

    base, _, query = url.partition("?")
    conn = await asyncpg.connect(base, server_settings=dict([query.split("=", 1)]))
    try:
        return Counter(r[0] for r in await conn.fetch("SELECT row_id FROM requests"))
    finally:
        await conn.close()


def scenario(url: str, flaky: bool) -> None:
    async def run() -> None:
        store = open_store(url)
        await store.open()
        key = create_key(name="app", now=1.0).record
        await store.insert_key(key)
        rows = [usage(key.id, cost=0.01 * (i + 1)) for i in range(7)]
        rows[2].model = rows[5].model = UNSTORABLE
        bad = [rows[2], rows[5]]
        good = [u for u in rows if u not in bad]
        target: Store = FailsOnceAlone(store, rows[4].row_id) if flaky else store  # type: ignore[assignment]
        book, reports = SpendBook(), Reports()
        sizes: list[int] = []  # what the instrument (a span per write) was told

        def instrument(n: int) -> contextlib.AbstractContextManager[None]:
            sizes.append(n)
            return contextlib.nullcontext()

        writer = LedgerWriter(
            target,
            batch_size=50,
            observers=[book, reports],
            journal=False,
            instrument=instrument,
        )
        for u in rows:
            writer.submit(u)
            pend(book, key.id, u.cost_usd)
        if flaky:
            assert not await writer.flush()  # the connection dropped: kept for a retry
        assert await writer.flush()
        assert await stored_row_ids(store, url) == Counter(u.row_id for u in good)
        assert reports.written == Counter(u.row_id for u in good)  # each reported once
        assert writer.rows_written == len(good)
        assert (writer.billed_dropped, writer.rows_dropped) == (2, 2)
        assert writer.depth == 0
        # The whole batch was tried first, then each row on its own.
        assert sizes[0] == len(rows) and set(sizes[1:]) == ({1, len(rows)} if flaky else {1})
        assert reports.failed[0][0] == len(rows)
        assert ("ConnectionResetError" in {e for _, e in reports.failed}) is flaky
        expected = sum(u.cost_usd for u in good)
        assert await store.key_spend() == {key.id: pytest.approx(expected)}
        # The refused row's cost was really spent upstream: this process's budget book
        # keeps counting it (never less than the ledger), the ledger cannot.
        assert book.spent(key.id) == pytest.approx(expected + sum(u.cost_usd for u in bad))
        await store.close()

    asyncio.run(run())


def test_a_refused_row_is_dropped_alone_and_the_rest_are_stored_once(store_url: str) -> None:  # noqa: F811
    scenario(store_url, flaky=False)


def test_a_connection_lost_during_the_fallback_stores_and_reports_nothing_twice(
    store_url: str,  # noqa: F811
) -> None:
    scenario(store_url, flaky=True)
