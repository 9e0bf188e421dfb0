"""Schema versions: a database made by the release before them migrates and keeps its
rows; migrations run once under a lock; the CLI shows and applies them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import asyncpg
import pytest

from daemon.ledger import open_store
from daemon.ledger.base import SchemaOutdated, SchemaTooNew
from daemon.ledger.migrations import LATEST
from tests.helpers import base_config, cli, write_config
from tests.test_ledger import postgres_schema, usage

# The CREATE statements of the release before schema versions, copied verbatim: the
# fixture must not follow the code if the code's migration 1 changes by mistake.
RELEASE_0_SQLITE = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL, user_type TEXT NOT NULL, rpm INTEGER, tpm INTEGER,
    budget_usd REAL, models TEXT, created_at REAL NOT NULL, revoked_at REAL,
    spend_usd REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(name, value) VALUES ('keys_generation', 0);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT NOT NULL, ts REAL NOT NULL, key_id TEXT NOT NULL,
    user_type TEXT NOT NULL, operation TEXT NOT NULL, model TEXT NOT NULL,
    provider TEXT NOT NULL, upstream_model TEXT NOT NULL, stream INTEGER NOT NULL,
    status_code INTEGER NOT NULL, error_type TEXT, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, latency_s REAL NOT NULL,
    upstream_latency_s REAL, ttft_s REAL, trace_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id);
"""

RELEASE_0_POSTGRES = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL, user_type TEXT NOT NULL, rpm INTEGER, tpm INTEGER,
    budget_usd DOUBLE PRECISION, models TEXT, created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION, spend_usd DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta(name, value) VALUES ('keys_generation', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, key_id TEXT NOT NULL,
    user_type TEXT NOT NULL, operation TEXT NOT NULL, model TEXT NOT NULL,
    provider TEXT NOT NULL, upstream_model TEXT NOT NULL, stream BOOLEAN NOT NULL,
    status_code INTEGER NOT NULL, error_type TEXT, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
    latency_s DOUBLE PRECISION NOT NULL, upstream_latency_s DOUBLE PRECISION,
    ttft_s DOUBLE PRECISION, trace_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts);
CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id);
"""

OLD_ROW = (
    "INSERT INTO requests VALUES ('{rid}', {ts}, 'k1', 'standard', 'chat', 'mock', 'mock', "
    "'mock', {false}, 200, NULL, 10, 5, 0, 0, 0.5, 0.01, NULL, NULL, '')"
)


def _legacy_sqlite(path: Path, rows: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(RELEASE_0_SQLITE)
        conn.execute(
            "INSERT INTO keys VALUES ('k1', 'app', 'h', 'cv-', 'standard', NULL, NULL, NULL,"
            " NULL, 1.0, NULL, 1.5)"
        )
        for i in range(rows):
            # Clients may send their own request ids: two rows share one here.
            conn.execute(OLD_ROW.format(rid=f"r{i // 2}", ts=time.time(), false=0))
        conn.commit()


def test_a_sqlite_ledger_from_the_previous_release_migrates_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    _legacy_sqlite(path, 6)

    async def scenario() -> None:
        store = open_store(f"sqlite:///{path}", migrate="none")
        await store.open()
        before = await store.schema_status()
        assert before.legacy and before.version == 0 and len(before.pending) == LATEST
        await store.close()
        store = open_store(f"sqlite:///{path}")  # the daemon's way: migrate at open
        await store.open()
        status = await store.schema_status()
        assert status.version == LATEST and not status.pending and not status.legacy
        # New rows go in beside the old ones, estimated flag and all.
        row = usage("k1", cost=0.25)
        row.estimated_reason = "stream_cut_before_usage"
        assert (await store.write_requests([row]))["k1"] == pytest.approx(1.75)
        assert await store.key_spend() == {"k1": pytest.approx(1.75)}
        await store.close()

    asyncio.run(scenario())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT request_id, row_id, estimated, estimated_reason, input_tokens FROM requests"
        ).fetchall()
    assert len(rows) == 7
    assert len({r[1] for r in rows}) == 7 and all(r[1] for r in rows)  # unique ids for all
    assert [r[2:] for r in rows[:6]] == [(0, None, 10)] * 6
    assert rows[6][2:4] == (1, "stream_cut_before_usage")


def test_a_postgresql_ledger_from_the_previous_release_migrates_and_keeps_its_rows() -> None:
    with postgres_schema() as url:

        async def scenario() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(RELEASE_0_POSTGRES)
                await conn.execute(
                    "INSERT INTO keys VALUES ('k1', 'app', 'h', 'cv-', 'standard', NULL, NULL,"
                    " NULL, NULL, 1.0, NULL, 1.5)"
                )
                for i in range(6):
                    await conn.execute(
                        OLD_ROW.format(rid=f"r{i // 2}", ts=time.time(), false="false")
                    )
            finally:
                await conn.close()
            # Two replicas starting together: one migrates, the other waits and finds
            # nothing left to do.
            stores = [open_store(url), open_store(url)]
            await asyncio.gather(*(s.open() for s in stores))
            applied = [s.applied_at_open for s in stores]  # type: ignore[attr-defined]
            assert sorted(len(a) for a in applied) == [0, LATEST]
            store = stores[0]
            row = usage("k1", cost=0.25)
            row.tokens.input = 3 * 10**9  # past 32 bits
            assert (await store.write_requests([row]))["k1"] == pytest.approx(1.75)
            for s in stores:
                await s.close()
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch("SELECT row_id, input_tokens, estimated FROM requests")
                versions = await conn.fetch("SELECT version FROM schema_migrations")
            finally:
                await conn.close()
            assert len(rows) == 7 and len({r["row_id"] for r in rows}) == 7
            assert max(r["input_tokens"] for r in rows) == 3 * 10**9
            assert not any(r["estimated"] for r in rows)
            assert sorted(r["version"] for r in versions) == list(range(1, LATEST + 1))

        asyncio.run(scenario())


def test_migrations_race_and_versions_never_go_backwards_in_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    _legacy_sqlite(path, 2)

    async def scenario() -> None:
        # Separate stores are separate connections (and threads), as separate workers.
        stores = [open_store(f"sqlite:///{path}") for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        applied = sorted(len(s.applied_at_open) for s in stores)  # type: ignore[attr-defined]
        assert applied == [0, 0, LATEST]
        for s in stores:
            await s.close()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
            conn.commit()
        with pytest.raises(SchemaTooNew, match="upgrade ChatVault"):
            await open_store(f"sqlite:///{path}").open()

    asyncio.run(scenario())


def test_check_mode_refuses_a_database_with_pending_migrations(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _legacy_sqlite(path, 1)

    async def scenario() -> None:
        with pytest.raises(SchemaOutdated, match="chatvault db migrate"):
            await open_store(f"sqlite:///{path}", migrate="check").open()

    asyncio.run(scenario())


def test_db_status_and_migrate_commands(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, base_config())
    db = tmp_path / "data" / "ledger.db"
    db.parent.mkdir(parents=True)
    _legacy_sqlite(db, 3)
    status = cli("db", "status", "--json", "--config", str(config_path))
    assert status.returncode == 0, status.stderr
    before = json.loads(status.stdout)
    assert before["legacy"] and [p["version"] for p in before["pending"]] == list(
        range(1, LATEST + 1)
    )
    text = cli("db", "status", "--config", str(config_path))
    assert "before versions existed" in text.stdout and "chatvault db migrate" in text.stdout
    migrated = cli("db", "migrate", "--config", str(config_path))
    assert migrated.returncode == 0, migrated.stderr
    assert "applied migration 2" in migrated.stdout and "up to date" in migrated.stdout
    after = json.loads(cli("db", "status", "--json", "--config", str(config_path)).stdout)
    assert after["version"] == LATEST and after["pending"] == []
    again = json.loads(cli("db", "migrate", "--json", "--config", str(config_path)).stdout)
    assert again["applied_now"] == []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 3


def test_db_commands_never_print_a_password(tmp_path: Path) -> None:
    # Nothing listens on port 9: the error names the host, never the password.
    url = "postgresql://app:hunter2@127.0.0.1:9/ledger?password=s3cr3t-q&sslmode=disable"
    config_path = write_config(tmp_path, base_config(ledger={"url": url}))
    result = cli("db", "status", "--config", str(config_path))
    assert result.returncode == 1
    assert "127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "s3cr3t-q" not in result.stderr + result.stdout
