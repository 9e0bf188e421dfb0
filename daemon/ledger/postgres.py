"""The PostgreSQL ledger store (asyncpg): for several replicas sharing one ledger."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from daemon.keys import KeyRecord
from daemon.ledger.base import (
    KEY_COLUMNS,
    REQUEST_COLUMNS,
    DayStats,
    DuplicateKeyName,
    GroupBy,
    SchemaOutdated,
    SchemaStatus,
    SchemaTooNew,
    StoreCheck,
    UsageGroup,
    key_from_row,
    key_row,
    redact_text,
    redact_url,
    spend_by_key,
    usage_row,
)
from daemon.ledger.migrations import (
    LATEST,
    VERSIONS_TABLE_POSTGRES,
    pending,
    require_current,
    schema_status,
    too_new_message,
)
from daemon.usage import Usage

_COLUMN_TYPES = {
    "ts": "float8",
    "stream": "bool",
    "status_code": "int4",
    "input_tokens": "int8",
    "output_tokens": "int8",
    "cached_tokens": "int8",
    "reasoning_tokens": "int8",
    "cost_usd": "float8",
    "latency_s": "float8",
    "upstream_latency_s": "float8",
    "ttft_s": "float8",
    "estimated": "bool",
    "attempts": "int4",
    "saved_usd": "float8",
}
# One statement per batch: the rows as column arrays, duplicates (by row_id) skipped,
# and the inserted rows' spend returned so it is added in the same transaction.
_INSERT_REQUESTS = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(
        f"${i + 1}::{_COLUMN_TYPES.get(c, 'text')}[]" for i, c in enumerate(REQUEST_COLUMNS)
    )
    + ") ON CONFLICT (row_id) DO NOTHING RETURNING key_id, cost_usd"
)
_INSERT_KEY = (
    f"INSERT INTO keys ({', '.join(KEY_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(KEY_COLUMNS)))})"
)
_SELECT_KEY = f"SELECT {', '.join(KEY_COLUMNS)} FROM keys"
_GROUP_EXPR = {
    "model": "r.model",
    "key": "COALESCE(k.name, r.key_id)",
    "day": "to_char(to_timestamp(r.ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "hour": "to_char(to_timestamp(r.ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00')",
}
# Serialises migrations when several workers or replicas start at once.
_SCHEMA_LOCK = 0x43564C44

redact = redact_url  # the name earlier code used


class PostgresStore:
    kind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 5,
        migrate: str = "apply",
        journal_dir: Path | None = None,
    ) -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self.description = redact_url(self.url)
        self.migrate_mode = migrate
        # PostgreSQL is remote: where the journal goes is the operator's choice
        # (ledger.journal_dir), passed in by whoever builds the writer.
        self.journal_dir = journal_dir
        self.applied_at_open: list[tuple[int, str]] = []
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConnectionError("the ledger store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._min, max_size=self._max, command_timeout=10
            )
            if self.migrate_mode == "apply":
                self.applied_at_open = await self.migrate()
            elif self.migrate_mode == "check":
                require_current(await self.schema_status())
        except (SchemaTooNew, SchemaOutdated):
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            # Error texts can quote the DSN (and its ?password=): never let one out.
            message = redact_text(f"{exc}", self.url)
            raise ConnectionError(f"{type(exc).__name__}: {message}") from None

    async def schema_status(self) -> SchemaStatus:
        async with self.pool.acquire() as conn:
            return await _status(conn)

    async def migrate(self) -> list[tuple[int, str]]:
        async with self.pool.acquire() as conn:
            status = await _status(conn)  # without the lock: nothing pending stays cheap
            if status.version > LATEST:
                raise SchemaTooNew(too_new_message(status.version))
            if not status.pending:
                return []
            async with conn.transaction():
                # Held to the end of the transaction: a second replica waits here, then
                # finds every migration recorded.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(VERSIONS_TABLE_POSTGRES)
                done = {
                    int(r[0]) for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                if max(done, default=0) > LATEST:
                    raise SchemaTooNew(too_new_message(max(done)))
                applied = []
                for migration in pending(done):
                    for statement in migration.postgres:
                        await conn.execute(statement, timeout=None)
                    await conn.execute(
                        "INSERT INTO schema_migrations(version, name, applied_at) "
                        "VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        time.time(),
                    )
                    applied.append((migration.version, migration.name))
                return applied

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        values = [usage_row(u) for u in rows]
        columns = [list(c) for c in zip(*values, strict=True)] if values else []
        keys = list(spend_by_key(rows))
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetch(_INSERT_REQUESTS, *columns) if values else []
            spend: dict[str, float] = {}
            for r in inserted:
                if r["cost_usd"]:
                    spend[r["key_id"]] = spend.get(r["key_id"], 0.0) + r["cost_usd"]
            if spend:
                await conn.executemany(
                    "UPDATE keys SET spend_usd = spend_usd + $1 WHERE id = $2",
                    [(cost, key_id) for key_id, cost in spend.items()],
                )
            if not keys:
                return {}
            records = await conn.fetch(
                "SELECT id, spend_usd FROM keys WHERE id = ANY($1::text[])", keys
            )
        return {r["id"]: float(r["spend_usd"]) for r in records}

    async def usage(self, since: float, by: GroupBy) -> list[UsageGroup]:
        sql = (
            f"SELECT {_GROUP_EXPR[by]} AS g, COUNT(*), "
            "COUNT(*) FILTER (WHERE r.error_type IS NOT NULL), "
            "SUM(r.input_tokens), SUM(r.output_tokens), SUM(r.cost_usd) "
            "FROM requests r LEFT JOIN keys k ON k.id = r.key_id "
            "WHERE r.ts >= $1 GROUP BY g ORDER BY g"
        )
        rows = await self.pool.fetch(sql, since)
        return [
            UsageGroup(
                str(r[0]),
                int(r[1]),
                int(r[2] or 0),
                int(r[3] or 0),
                int(r[4] or 0),
                float(r[5] or 0),
            )
            for r in rows
        ]

    async def day_stats(self, day_start: float) -> DayStats:
        async with self.pool.acquire() as conn:
            active = await conn.fetchval("SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL")
            row = await conn.fetchrow(
                "SELECT COUNT(*), COALESCE(SUM(cost_usd), 0) FROM requests WHERE ts >= $1",
                day_start,
            )
        assert row is not None
        return DayStats(int(active), int(row[0]), float(row[1]))

    async def insert_key(self, record: KeyRecord) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(_INSERT_KEY, *key_row(record))
                await _bump_generation(conn)
        except asyncpg.UniqueViolationError as exc:
            if "name" in str(exc):
                raise DuplicateKeyName(record.name) from None
            raise

    async def revoke_key(self, id_or_name: str, now: float) -> KeyRecord | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"{_SELECT_KEY} WHERE revoked_at IS NULL AND (id = $1 OR name = $1) FOR UPDATE",
                id_or_name,
            )
            if row is None:
                return None
            await conn.execute("UPDATE keys SET revoked_at = $1 WHERE id = $2", now, row["id"])
            await _bump_generation(conn)
        return dataclasses.replace(key_from_row(tuple(row)), revoked_at=now)

    async def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self.pool.fetch(f"{_SELECT_KEY}{where} ORDER BY created_at")
        return [key_from_row(tuple(r)) for r in rows]

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        row = await self.pool.fetchrow(f"{_SELECT_KEY} WHERE key_hash = $1", key_hash)
        return key_from_row(tuple(row)) if row else None

    async def keys_generation(self) -> int:
        value = await self.pool.fetchval("SELECT value FROM meta WHERE name = 'keys_generation'")
        return int(value or 0)

    async def key_spend(self) -> dict[str, float]:
        rows = await self.pool.fetch(
            "SELECT id, spend_usd FROM keys WHERE revoked_at IS NULL AND spend_usd > 0"
        )
        return {r["id"]: float(r["spend_usd"]) for r in rows}

    def is_permanent(self, error: BaseException) -> bool:
        return _permanent(error)

    async def check(self) -> StoreCheck:
        """O(1) in the ledger's size: the planner's row estimate (pg_class.reltuples,
        kept by autovacuum) instead of COUNT(*), and one ``meta`` row written."""
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT c.reltuples::bigint, pg_total_relation_size(c.oid), "
                    "(SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL) "
                    "FROM pg_class c WHERE c.oid = 'requests'::regclass"
                )
                assert row is not None
                writable, error = True, None
                try:
                    await conn.execute(
                        "INSERT INTO meta(name, value) VALUES ('health_probe', $1) "
                        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                        int(time.time()),
                    )
                except asyncpg.PostgresError as exc:
                    writable, error = False, redact_text(str(exc), self.url)
        except (OSError, asyncpg.PostgresError, ConnectionError) as exc:
            return StoreCheck(
                ok=False, writable=False, latency_s=0.0, error=redact_text(str(exc), self.url)
            )
        return StoreCheck(
            ok=True,
            writable=writable,
            latency_s=time.perf_counter() - started,
            request_rows=max(int(row[0]), 0),  # -1: never analysed yet
            active_keys=int(row[2]),
            size_bytes=int(row[1]),
            error=error,
        )


async def _status(conn: asyncpg.Connection) -> SchemaStatus:
    tables = {
        r[0]
        for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name IN "
            "('requests', 'schema_migrations')"
        )
    }
    applied: tuple[tuple[int, str, float | None], ...] = ()
    if "schema_migrations" in tables:
        applied = tuple(
            (int(r[0]), str(r[1]), float(r[2]))
            for r in await conn.fetch(
                "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
            )
        )
    return schema_status(tables, applied)


def _permanent(error: BaseException) -> bool:
    return isinstance(
        error,
        asyncpg.DataError
        | asyncpg.IntegrityConstraintViolationError
        | OverflowError
        | ValueError
        | TypeError,
    )


async def _bump_generation(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'")
