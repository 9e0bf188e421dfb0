"""The usage ledger: stores and the batching writer."""

from __future__ import annotations

from pathlib import Path

from daemon.ledger.base import Store, redact_url
from daemon.ledger.sqlite import SQLiteStore, parse_sqlite_url


def open_store(url: str, *, migrate: str = "apply", journal_dir: Path | None = None) -> Store:
    """A store for a ledger URL (not yet opened).

    ``migrate``: "apply" pending schema migrations at open (the default), "check"
    (refuse to open while some are pending), or "none". ``journal_dir``: where the
    writer journals rows during outages (SQLite default: beside the database file).
    """
    if url.startswith("sqlite:"):
        path, read_only = parse_sqlite_url(url)
        store = SQLiteStore(path, read_only=read_only, migrate=migrate)
        if journal_dir is not None and not read_only:
            store.journal_dir = journal_dir
        return store
    if url.startswith(("postgresql:", "postgres:")):
        from daemon.ledger.postgres import PostgresStore  # asyncpg only when used

        return PostgresStore(url, migrate=migrate, journal_dir=journal_dir)
    raise ValueError(f"unsupported ledger URL scheme: {url.split(':', 1)[0]}")


__all__ = ["Store", "open_store", "redact_url"]
