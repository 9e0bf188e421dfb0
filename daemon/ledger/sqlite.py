"""The SQLite ledger store (the default): one file, WAL mode, one writer thread.

Every statement runs on one dedicated thread, so the event loop never blocks on disk
and the connection is never shared between threads. Several workers (and the CLI)
may open the same file: WAL lets readers proceed while one writes, and the busy
timeout queues writers instead of failing them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from daemon.keys import KeyRecord
from daemon.ledger.base import (
    KEY_COLUMNS,
    REQUEST_COLUMNS,
    DayStats,
    DuplicateKeyName,
    GroupBy,
    StoreCheck,
    UsageGroup,
    key_from_row,
    key_row,
    spend_by_key,
    usage_row,
)
from daemon.usage import Usage

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    user_type TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    budget_usd REAL,
    models TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    spend_usd REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(name, value) VALUES ('keys_generation', 0);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    key_id TEXT NOT NULL,
    user_type TEXT NOT NULL,
    operation TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    error_type TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_s REAL NOT NULL,
    upstream_latency_s REAL,
    ttft_s REAL,
    trace_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id);
"""

_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in REQUEST_COLUMNS)})"
)
_SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM keys"
_GROUP_EXPR = {
    "model": "r.model",
    "key": "COALESCE(k.name, r.key_id)",
    "day": "strftime('%Y-%m-%d', r.ts, 'unixepoch')",
}


def parse_sqlite_url(url: str) -> tuple[Path, bool]:
    """``sqlite:///path.db`` and ``sqlite:///path.db?mode=ro`` (read-only, e.g. a replica)."""
    rest = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    path, _, query = rest.partition("?")
    return Path(path), "mode=ro" in query.split("&")


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.description = f"sqlite:{path}" + (" (read-only)" if read_only else "")
        self._identity: tuple[int, int] | None = None
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvault-sqlite")
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise sqlite3.OperationalError("the ledger store is not open")
        return fn(self._conn)

    def _connect(self) -> None:
        if self.path.is_dir():
            raise sqlite3.OperationalError(f"{self.path} is a directory, not a database file")
        options: dict[str, Any] = {
            "timeout": self._busy_timeout_s,
            "check_same_thread": False,
            "isolation_level": None,  # explicit transactions only
        }
        if self.read_only:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, **options)
            try:
                conn.execute("SELECT value FROM meta WHERE name = 'keys_generation'")
            except sqlite3.Error:
                conn.close()
                raise sqlite3.OperationalError(
                    f"{self.path} is opened read-only and holds no ChatVault ledger"
                ) from None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, **options)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
        self._conn = conn
        self._identity = _identity(self.path)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._connect)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)

    # -- requests -------------------------------------------------------------

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        values = [usage_row(u) for u in rows]
        spend = spend_by_key(rows)

        def write(conn: sqlite3.Connection) -> dict[str, float]:
            with _transaction(conn):
                conn.executemany(_INSERT_REQUEST, values)
                conn.executemany(
                    "UPDATE keys SET spend_usd = spend_usd + ? WHERE id = ?",
                    [(cost, key_id) for key_id, cost in spend.items()],
                )
                if not spend:
                    return {}
                marks = ", ".join("?" for _ in spend)
                cur = conn.execute(
                    f"SELECT id, spend_usd FROM keys WHERE id IN ({marks})", list(spend)
                )
                return {key_id: float(total) for key_id, total in cur.fetchall()}

        return await self._run(write)

    async def usage(self, since: float, by: GroupBy) -> list[UsageGroup]:
        expr = _GROUP_EXPR[by]
        sql = (
            f"SELECT {expr} AS g, COUNT(*), SUM(r.error_type IS NOT NULL), "
            "SUM(r.input_tokens), SUM(r.output_tokens), SUM(r.cost_usd) "
            "FROM requests r LEFT JOIN keys k ON k.id = r.key_id "
            "WHERE r.ts >= ? GROUP BY g ORDER BY g"
        )

        def query(conn: sqlite3.Connection) -> list[UsageGroup]:
            return [
                UsageGroup(str(g), int(n), int(e or 0), int(i or 0), int(o or 0), float(c or 0))
                for g, n, e, i, o, c in conn.execute(sql, (since,)).fetchall()
            ]

        return await self._run(query)

    async def day_stats(self, day_start: float) -> DayStats:
        def query(conn: sqlite3.Connection) -> DayStats:
            (active,) = conn.execute(
                "SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL"
            ).fetchone()
            n, cost = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0) FROM requests WHERE ts >= ?",
                (day_start,),
            ).fetchone()
            return DayStats(int(active), int(n), float(cost))

        return await self._run(query)

    # -- keys -----------------------------------------------------------------

    async def insert_key(self, record: KeyRecord) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            marks = ", ".join("?" for _ in KEY_COLUMNS)
            try:
                with _transaction(conn):
                    conn.execute(
                        f"INSERT INTO keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks})",
                        key_row(record),
                    )
                    _bump_generation(conn)
            except sqlite3.IntegrityError as exc:
                if "name" in str(exc):
                    raise DuplicateKeyName(record.name) from None
                raise

        await self._run(insert)

    async def revoke_key(self, id_or_name: str, now: float) -> KeyRecord | None:
        def revoke(conn: sqlite3.Connection) -> KeyRecord | None:
            with _transaction(conn):
                row = conn.execute(
                    f"{_SELECT_KEY} WHERE revoked_at IS NULL AND (id = ? OR name = ?)",
                    (id_or_name, id_or_name),
                ).fetchone()
                if row is None:
                    return None
                conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (now, row[0]))
                _bump_generation(conn)
            return dataclasses.replace(key_from_row(row), revoked_at=now)

        return await self._run(revoke)

    async def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"

        def query(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(f"{_SELECT_KEY}{where} ORDER BY created_at").fetchall()
            return [key_from_row(r) for r in rows]

        return await self._run(query)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        def query(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(f"{_SELECT_KEY} WHERE key_hash = ?", (key_hash,)).fetchone()
            return key_from_row(row) if row else None

        return await self._run(query)

    async def keys_generation(self) -> int:
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE name = 'keys_generation'").fetchone()
            return int(row[0]) if row else 0

        return await self._run(query)

    async def key_spend(self) -> dict[str, float]:
        def query(conn: sqlite3.Connection) -> dict[str, float]:
            rows = conn.execute(
                "SELECT id, spend_usd FROM keys WHERE revoked_at IS NULL AND spend_usd > 0"
            ).fetchall()
            return {key_id: float(total) for key_id, total in rows}

        return await self._run(query)

    # -- health ---------------------------------------------------------------

    async def check(self) -> StoreCheck:
        def probe(conn: sqlite3.Connection) -> StoreCheck:
            started = time.perf_counter()
            if _identity(self.path) != self._identity:
                # Writes would go on into the old, unlinked file: nothing anyone can read.
                return StoreCheck(
                    ok=False,
                    writable=False,
                    latency_s=0.0,
                    error=f"{self.path} was replaced or removed while open; restart the daemon",
                )
            (rows,) = conn.execute("SELECT COUNT(*) FROM requests").fetchone()
            (active,) = conn.execute(
                "SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL"
            ).fetchone()
            writable, error = True, None
            try:
                # A real write that leaves nothing behind.
                with _transaction(conn):
                    conn.execute(
                        "INSERT OR REPLACE INTO meta(name, value) VALUES ('health_probe', ?)",
                        (int(time.time()),),
                    )
            except sqlite3.Error as exc:
                writable, error = False, str(exc)
            size = sum(
                p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists()
            )
            return StoreCheck(
                ok=True,
                writable=writable,
                latency_s=time.perf_counter() - started,
                request_rows=int(rows),
                active_keys=int(active),
                size_bytes=size,
                error=error,
            )

        try:
            return await self._run(probe)
        except (sqlite3.Error, OSError) as exc:
            return StoreCheck(ok=False, writable=False, latency_s=0.0, error=str(exc))

    def is_permanent(self, error: BaseException) -> bool:
        return isinstance(
            error,
            sqlite3.IntegrityError | sqlite3.DataError | OverflowError | ValueError | TypeError,
        )


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (the connection is in autocommit)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'")
