"""The usage ledger: stores and the batching writer."""

from __future__ import annotations

from daemon.ledger.base import Store
from daemon.ledger.sqlite import SQLiteStore, parse_sqlite_url


def open_store(url: str) -> Store:
    """A store for a ledger URL (not yet opened)."""
    if url.startswith("sqlite:"):
        path, read_only = parse_sqlite_url(url)
        return SQLiteStore(path, read_only=read_only)
    if url.startswith(("postgresql:", "postgres:")):
        from daemon.ledger.postgres import PostgresStore  # asyncpg only when used

        return PostgresStore(url)
    raise ValueError(f"unsupported ledger URL scheme: {url.split(':', 1)[0]}")


__all__ = ["Store", "open_store"]
