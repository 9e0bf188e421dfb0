"""The SQLite ledger store (the default): one file, WAL mode, one writer thread.

The database file (and with it SQLite's -wal and -shm files, which copy its mode) is
created 0600: the ledger holds every key's usage and spend.

Every statement runs on one dedicated thread, so the event loop never blocks on disk
and the connection is never shared between threads. Several workers (and the CLI)
may open the same file: WAL lets readers proceed while one writes, and the busy
timeout queues writers instead of failing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
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
    SchemaStatus,
    SchemaTooNew,
    StoreCheck,
    UsageGroup,
    key_from_row,
    key_row,
    spend_by_key,
    usage_row,
)
from daemon.ledger.migrations import (
    LATEST,
    VERSIONS_TABLE_SQLITE,
    pending,
    require_current,
    schema_status,
    too_new_message,
)
from daemon.usage import Usage

T = TypeVar("T")

_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in REQUEST_COLUMNS)})"
)
_SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM keys"
_GROUP_EXPR = {
    "model": "r.model",
    "key": "COALESCE(k.name, r.key_id)",
    "day": "strftime('%Y-%m-%d', r.ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%d %H:00', r.ts, 'unixepoch')",
}


def parse_sqlite_url(url: str) -> tuple[Path, bool]:
    """``sqlite:///path.db`` and ``sqlite:///path.db?mode=ro`` (read-only, e.g. a replica)."""
    rest = url.removeprefix("sqlite:///").removeprefix("sqlite://")
    path, _, query = rest.partition("?")
    return Path(path), "mode=ro" in query.split("&")


class SQLiteStore:
    kind = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        read_only: bool = False,
        migrate: str = "apply",
        migrate_timeout_s: float = 600.0,
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.migrate_mode = "none" if read_only else migrate
        self.migrate_timeout_s = migrate_timeout_s
        self.description = f"sqlite:{path}" + (" (read-only)" if read_only else "")
        # The journal lives beside the database it protects (see daemon/ledger/journal.py).
        self.journal_dir: Path | None = None if read_only else Path(f"{path}.journal")
        self.applied_at_open: list[tuple[int, str]] = []
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
            _create_private(self.path)
            conn = sqlite3.connect(self.path, **options)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                if self.migrate_mode == "apply":
                    self.applied_at_open = _migrate(
                        conn, self._busy_timeout_s, self.migrate_timeout_s
                    )
                elif self.migrate_mode == "check":
                    require_current(_status(conn))
            except BaseException:
                conn.close()
                raise
        self._conn = conn
        self._identity = _identity(self.path)

    async def schema_status(self) -> SchemaStatus:
        return await self._run(_status)

    async def migrate(self) -> list[tuple[int, str]]:
        if self.read_only:
            raise sqlite3.OperationalError(f"{self.path} is opened read-only: cannot migrate")
        busy, limit = self._busy_timeout_s, self.migrate_timeout_s
        return await self._run(lambda conn: _migrate(conn, busy, limit))

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
        keys = list(spend_by_key(rows))

        def write(conn: sqlite3.Connection) -> dict[str, float]:
            try:
                # The common case: no row is stored yet, one executemany.
                with _transaction(conn):
                    conn.executemany(_INSERT_REQUEST, values)
                    return _add_spend(conn, spend_by_key(rows), keys)
            except sqlite3.IntegrityError as exc:
                if "row_id" not in str(exc):
                    raise
            # A batch written before (its commit succeeded, the answer was lost; or a
            # journal replay): insert only the rows not stored yet, and add only their spend.
            with _transaction(conn):
                ids = [u.row_id for u in rows]
                stored: set[str] = set()
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    marks = ", ".join("?" for _ in chunk)
                    cur = conn.execute(
                        f"SELECT row_id FROM requests WHERE row_id IN ({marks})", chunk
                    )
                    stored.update(r[0] for r in cur.fetchall())
                fresh = []
                for u, v in zip(rows, values, strict=True):
                    if u.row_id not in stored:
                        stored.add(u.row_id)  # a row twice in one batch goes in once
                        fresh.append((u, v))
                conn.executemany(_INSERT_REQUEST, [v for _, v in fresh])
                return _add_spend(conn, spend_by_key([u for u, _ in fresh]), keys)

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
        """O(1) in the ledger's size: the highest rowid (a b-tree edge, not a count) stands
        for the row count, and the write probe touches one ``meta`` row."""

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
            (rows,) = conn.execute("SELECT MAX(rowid) FROM requests").fetchone()
            (active,) = conn.execute(
                "SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL"
            ).fetchone()
            writable, error = not self.read_only, None
            if not self.read_only:
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
                request_rows=int(rows or 0),
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
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (the connection is in autocommit).

    A COMMIT that fails (disk full, I/O error, a deferred constraint) leaves SQLite's
    transaction open; without the rollback every later write on this connection would
    fail with "cannot start a transaction within a transaction".
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            _rollback(self.conn)
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _add_spend(
    conn: sqlite3.Connection, spend: dict[str, float], keys: list[str]
) -> dict[str, float]:
    """Add ``spend`` (of the rows just inserted) and read back the totals of ``keys``
    (every key with spend in the batch, inserted or not: the budget book wants them)."""
    conn.executemany(
        "UPDATE keys SET spend_usd = spend_usd + ? WHERE id = ?",
        [(cost, key_id) for key_id, cost in spend.items()],
    )
    if not keys:
        return {}
    marks = ", ".join("?" for _ in keys)
    cur = conn.execute(f"SELECT id, spend_usd FROM keys WHERE id IN ({marks})", keys)
    return {key_id: float(total) for key_id, total in cur.fetchall()}


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use the umask)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _status(conn: sqlite3.Connection) -> SchemaStatus:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    applied: tuple[tuple[int, str, float | None], ...] = ()
    if "schema_migrations" in tables:
        applied = tuple(
            (int(v), str(n), float(a))
            for v, n, a in conn.execute(
                "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
            )
        )
    return schema_status(tables, applied)


def _migrate(conn: sqlite3.Connection, busy_s: float, limit_s: float) -> list[tuple[int, str]]:
    """Apply pending migrations in one IMMEDIATE transaction: a second process waits for
    the lock (up to ``limit_s``), then finds nothing left to do."""
    status = _status(conn)  # without the lock: the common case, nothing pending, stays cheap
    if status.version > LATEST:
        raise SchemaTooNew(too_new_message(status.version))
    if not status.pending:
        return []
    conn.execute(f"PRAGMA busy_timeout = {int(limit_s * 1000)}")
    try:
        with _transaction(conn):
            conn.execute(VERSIONS_TABLE_SQLITE)
            done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
            if max(done, default=0) > LATEST:
                raise SchemaTooNew(too_new_message(max(done)))
            applied = []
            for migration in pending(done):
                for statement in migration.sqlite:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                applied.append((migration.version, migration.name))
            return applied
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'")
