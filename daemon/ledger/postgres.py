"""The PostgreSQL ledger store (asyncpg): for several replicas sharing one ledger."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence

import asyncpg

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    user_type TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    budget_usd DOUBLE PRECISION,
    models TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    spend_usd DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta(name, value) VALUES ('keys_generation', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    key_id TEXT NOT NULL,
    user_type TEXT NOT NULL,
    operation TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    stream BOOLEAN NOT NULL,
    status_code INTEGER NOT NULL,
    error_type TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL,
    upstream_latency_s DOUBLE PRECISION,
    ttft_s DOUBLE PRECISION,
    trace_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id);
"""

_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(REQUEST_COLUMNS)))})"
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
}
# Serialises schema creation when several workers start at once.
_SCHEMA_LOCK = 0x43564C44


def redact(url: str) -> str:
    """The URL without its password, for /health and logs."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


class PostgresStore:
    kind = "postgresql"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 5) -> None:
        self.url = url.replace("postgres://", "postgresql://", 1)
        self.description = redact(self.url)
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConnectionError("the ledger store is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url, min_size=self._min, max_size=self._max, command_timeout=10
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]:
        spend = spend_by_key(rows)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_INSERT_REQUEST, [usage_row(u) for u in rows])
            if not spend:
                return {}
            await conn.executemany(
                "UPDATE keys SET spend_usd = spend_usd + $1 WHERE id = $2",
                [(cost, key_id) for key_id, cost in spend.items()],
            )
            records = await conn.fetch(
                "SELECT id, spend_usd FROM keys WHERE id = ANY($1::text[])", list(spend)
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
        started = time.perf_counter()
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetchval("SELECT COUNT(*) FROM requests")
                active = await conn.fetchval("SELECT COUNT(*) FROM keys WHERE revoked_at IS NULL")
                size = await conn.fetchval("SELECT pg_total_relation_size('requests')")
                writable, error = True, None
                try:
                    await conn.execute(
                        "INSERT INTO meta(name, value) VALUES ('health_probe', $1) "
                        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                        int(time.time()),
                    )
                except asyncpg.PostgresError as exc:
                    writable, error = False, str(exc)
        except (OSError, asyncpg.PostgresError, ConnectionError) as exc:
            return StoreCheck(ok=False, writable=False, latency_s=0.0, error=str(exc))
        return StoreCheck(
            ok=True,
            writable=writable,
            latency_s=time.perf_counter() - started,
            request_rows=int(rows),
            active_keys=int(active),
            size_bytes=int(size),
            error=error,
        )


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
