"""Schema versions: forward-only migrations, the same list for SQLite and PostgreSQL.

The database records each applied migration in ``schema_migrations``. Stores apply
what is pending when they open (under a lock, so replicas starting together do not
race: ``BEGIN IMMEDIATE`` in SQLite, an advisory lock in PostgreSQL), and
``chatvault db migrate`` does the same for operators who migrate before deploying.

Migration 1 is the schema of the release before versions existed, written with
``IF NOT EXISTS``: on such a database it changes nothing and is only recorded, so
every later migration starts from a known shape. Never edit a released migration;
add the next one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from daemon.ledger.base import SchemaOutdated, SchemaStatus, SchemaTooNew


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


_V1_SQLITE = (
    """CREATE TABLE IF NOT EXISTS keys (
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
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta(name, value) VALUES ('keys_generation', 0)",
    """CREATE TABLE IF NOT EXISTS requests (
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
)""",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts)",
    "CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts)",
    "CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id)",
)

_V1_POSTGRES = (
    """CREATE TABLE IF NOT EXISTS keys (
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
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS keys_active_name ON keys(name) WHERE revoked_at IS NULL",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO meta(name, value) VALUES ('keys_generation', 0) ON CONFLICT DO NOTHING",
    """CREATE TABLE IF NOT EXISTS requests (
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
)""",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts)",
    "CREATE INDEX IF NOT EXISTS requests_key_ts ON requests(key_id, ts)",
    "CREATE INDEX IF NOT EXISTS requests_request_id ON requests(request_id)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema (the release before schema versions)", _V1_SQLITE, _V1_POSTGRES),
    Migration(
        2,
        "row ids for idempotent writes, estimated token flag and reason, 64-bit counts",
        (
            # SQLite integers are already 64-bit. Existing rows get random unique ids
            # (they were each written once; the id only has to be unique from now on).
            "ALTER TABLE requests ADD COLUMN row_id TEXT",
            "UPDATE requests SET row_id = lower(hex(randomblob(16))) WHERE row_id IS NULL",
            "CREATE UNIQUE INDEX requests_row_id ON requests(row_id)",
            "ALTER TABLE requests ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE requests ADD COLUMN estimated_reason TEXT",
        ),
        (
            "ALTER TABLE requests ADD COLUMN row_id TEXT",
            # ctid is unique within the table at this moment: unique ids without pgcrypto.
            "UPDATE requests SET row_id = md5(random()::text || ctid::text) WHERE row_id IS NULL",
            "ALTER TABLE requests ALTER COLUMN row_id SET NOT NULL",
            "CREATE UNIQUE INDEX requests_row_id ON requests(row_id)",
            "ALTER TABLE requests"
            " ALTER COLUMN input_tokens TYPE BIGINT,"
            " ALTER COLUMN output_tokens TYPE BIGINT,"
            " ALTER COLUMN cached_tokens TYPE BIGINT,"
            " ALTER COLUMN reasoning_tokens TYPE BIGINT,"
            " ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT false,"
            " ADD COLUMN estimated_reason TEXT",
            "ALTER TABLE keys ALTER COLUMN rpm TYPE BIGINT, ALTER COLUMN tpm TYPE BIGINT",
        ),
    ),
    Migration(
        3,
        "routing and the response cache: model and deployment that answered, attempts, "
        "cache result, saved cost",
        (
            "ALTER TABLE requests ADD COLUMN served_model TEXT",
            "ALTER TABLE requests ADD COLUMN deployment TEXT",
            "ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE requests ADD COLUMN cache_result TEXT",
            "ALTER TABLE requests ADD COLUMN saved_usd REAL NOT NULL DEFAULT 0",
        ),
        (
            "ALTER TABLE requests"
            " ADD COLUMN served_model TEXT,"
            " ADD COLUMN deployment TEXT,"
            " ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0,"
            " ADD COLUMN cache_result TEXT,"
            " ADD COLUMN saved_usd DOUBLE PRECISION NOT NULL DEFAULT 0",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

VERSIONS_TABLE_SQLITE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
)
VERSIONS_TABLE_POSTGRES = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


def pending(applied: set[int]) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version not in applied]


def too_new_message(version: int) -> str:
    return (
        f"the ledger's schema is version {version}, newer than this release knows "
        f"(up to {LATEST}): upgrade ChatVault; migrations never go backwards"
    )


def schema_status(
    tables: Iterable[str], applied: tuple[tuple[int, str, float | None], ...]
) -> SchemaStatus:
    """What a database's tables and its ``schema_migrations`` rows say, in either store."""
    tables = set(tables)
    done = {v for v, _, _ in applied}
    return SchemaStatus(
        version=max(done, default=0),
        latest=LATEST,
        applied=applied,
        pending=tuple((m.version, m.name) for m in pending(done)),
        legacy="requests" in tables and "schema_migrations" not in tables,
    )


def require_current(status: SchemaStatus) -> None:
    """For stores told not to migrate: refuse a schema that is newer or behind."""
    if status.version > LATEST:
        raise SchemaTooNew(too_new_message(status.version))
    if status.pending:
        raise SchemaOutdated(
            f"{len(status.pending)} schema migration(s) pending (version {status.version}, "
            f"this release needs {LATEST}): run `chatvault db migrate`"
        )
