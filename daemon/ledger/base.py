"""The ledger store protocol, and what its implementations share.

A store keeps two tables: ``keys`` (hashed API keys, their limits and running spend)
and ``requests`` (one row per authenticated model request). SQLite and PostgreSQL
implement the same protocol; ``open_store`` picks one from the ledger URL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from daemon.keys import KeyRecord
from daemon.usage import TokenCounts, Usage

GroupBy = Literal["model", "key", "day", "hour"]

REQUEST_COLUMNS = (
    "request_id",
    "ts",
    "key_id",
    "user_type",
    "operation",
    "model",
    "provider",
    "upstream_model",
    "stream",
    "status_code",
    "error_type",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "latency_s",
    "upstream_latency_s",
    "ttft_s",
    "trace_id",
    "row_id",
    "estimated",
    "estimated_reason",
    "served_model",
    "deployment",
    "attempts",
    "cache_result",
    "saved_usd",
)

KEY_COLUMNS = (
    "id",
    "name",
    "key_hash",
    "prefix",
    "user_type",
    "rpm",
    "tpm",
    "budget_usd",
    "models",
    "created_at",
    "revoked_at",
    "spend_usd",
)

_ROUTING_FROM = REQUEST_COLUMNS.index("served_model")  # columns before migration 3


def usage_row(u: Usage) -> tuple[Any, ...]:
    t = u.tokens
    return (
        u.request_id,
        u.started_at,
        u.key_id,
        u.user_type,
        u.operation,
        u.model,
        u.provider,
        u.upstream_model,
        u.stream,
        u.status_code,
        u.error_type,
        t.input,
        t.output,
        t.cached,
        t.reasoning,
        u.cost_usd,
        u.latency_s,
        u.upstream_latency_s,
        u.ttft_s,
        u.trace_id,
        u.row_id,
        u.estimated_reason is not None,
        u.estimated_reason,
        u.served_model or None,
        u.deployment or None,
        u.attempts,
        u.cache_result,
        u.saved_usd,
    )


def usage_from_row(row: Sequence[Any], *, recovered: bool = False) -> Usage:
    """The ``Usage`` a stored row (``usage_row``'s tuple, e.g. from the journal) describes.

    A journal written by the release before routing has rows without the last five
    columns: they read as a single attempt, no cache."""
    if len(row) == _ROUTING_FROM:
        row = (*row, None, None, 1, None, 0.0)
    (
        request_id,
        ts,
        key_id,
        user_type,
        operation,
        model,
        provider,
        upstream_model,
        stream,
        status_code,
        error_type,
        input_tokens,
        output_tokens,
        cached_tokens,
        reasoning_tokens,
        cost,
        latency_s,
        upstream_latency_s,
        ttft_s,
        trace_id,
        row_id,
        _estimated,
        estimated_reason,
        served_model,
        deployment,
        attempts,
        cache_result,
        saved_usd,
    ) = row
    return Usage(
        request_id=request_id,
        started_at=ts,
        key_id=key_id,
        user_type=user_type,
        operation=operation,
        model=model,
        provider=provider,
        upstream_model=upstream_model,
        stream=bool(stream),
        status_code=status_code,
        error_type=error_type,
        tokens=TokenCounts(input_tokens, output_tokens, cached_tokens, reasoning_tokens),
        cost_usd=cost,
        latency_s=latency_s,
        upstream_latency_s=upstream_latency_s,
        ttft_s=ttft_s,
        trace_id=trace_id,
        row_id=row_id,
        estimated_reason=estimated_reason,
        served_model=served_model or "",
        deployment=deployment or "",
        attempts=attempts,
        cache_result=cache_result,
        saved_usd=saved_usd,
        recovered=recovered,
        finished=True,
    )


def is_rejected(u: Usage) -> bool:
    """A refused request that costs nothing (401, 403, 429, ...): recorded when there is
    room, but never allowed to displace a billed row (see docs/ledger.md)."""
    return u.status_code >= 400 and not u.cost_usd


def key_row(k: KeyRecord) -> tuple[Any, ...]:
    models = orjson.dumps(list(k.models)).decode() if k.models is not None else None
    return (
        k.id,
        k.name,
        k.key_hash,
        k.prefix,
        k.user_type,
        k.rpm,
        k.tpm,
        k.budget_usd,
        models,
        k.created_at,
        k.revoked_at,
        k.spend_usd,
    )


def key_from_row(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(KEY_COLUMNS, row, strict=True))
    models = values["models"]
    return KeyRecord(
        id=values["id"],
        name=values["name"],
        key_hash=values["key_hash"],
        prefix=values["prefix"],
        user_type=values["user_type"],
        rpm=values["rpm"],
        tpm=values["tpm"],
        budget_usd=values["budget_usd"],
        models=tuple(orjson.loads(models)) if models else None,
        created_at=values["created_at"],
        revoked_at=values["revoked_at"],
        spend_usd=float(values["spend_usd"] or 0.0),
    )


def spend_by_key(rows: Sequence[Usage]) -> dict[str, float]:
    out: dict[str, float] = {}
    for u in rows:
        if u.cost_usd:
            out[u.key_id] = out.get(u.key_id, 0.0) + u.cost_usd
    return out


@dataclass(frozen=True, slots=True)
class UsageGroup:
    group: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """What /health shows about the database."""

    ok: bool
    writable: bool
    latency_s: float
    request_rows: int = 0
    active_keys: int = 0
    size_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """The database's schema version and what this release would still apply."""

    version: int  # 0: no ChatVault tables yet
    latest: int  # the newest version this release knows
    applied: tuple[tuple[int, str, float | None], ...]  # (version, name, applied_at)
    pending: tuple[tuple[int, str], ...]  # (version, name)
    legacy: bool = False  # tables from a release before schema versions


class SchemaTooNew(Exception):
    """The database was migrated by a newer release: this one must not write to it."""


class SchemaOutdated(Exception):
    """Migrations are pending and this store was asked not to apply them."""


def redact_url(url: str) -> str:
    """A database URL without its password, for /health, logs and errors.

    Both places a password can hide are covered: ``user:password@host`` and the query
    parameter ``?password=...`` (libpq and asyncpg accept both).
    """
    url = re.sub(r"//([^:/@?#]*):[^@/?#]*@", r"//\1:***@", url)
    return re.sub(r"(?i)([?&](?:password|passwd|sslpassword)=)[^&#]*", r"\1***", url)


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message) with any secret from ``url`` replaced."""
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return text


def _url_secrets(url: str) -> list[str]:
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        for name, values in parse_qs(parts.query).items():
            if name.lower() in ("password", "passwd", "sslpassword"):
                found.extend(values)
    except ValueError:
        return []
    out = [s for s in found if s]
    return out + [unquote(s) for s in out if unquote(s) != s]


@dataclass(frozen=True, slots=True)
class DayStats:
    active_keys: int
    requests_today: int
    spend_today_usd: float


class Store(Protocol):
    """Where keys and request rows live.

    ``write_requests`` stores a batch atomically and idempotently: a row whose
    ``row_id`` is already stored is skipped, and only rows actually inserted add to
    their key's spend, in the same transaction. It returns, for each key with spend in
    the batch, the key's committed total afterwards (budgets read it).

    ``open`` applies pending schema migrations (``migrate="apply"``, the default),
    or refuses to start while some are pending (``"check"``), or neither (``"none"``,
    for ``chatvault db status``).
    """

    kind: str
    description: str  # for /health, without credentials

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write_requests(self, rows: Sequence[Usage]) -> dict[str, float]: ...

    async def insert_key(self, record: KeyRecord) -> None: ...

    async def revoke_key(self, id_or_name: str, now: float) -> KeyRecord | None: ...

    async def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]: ...

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def keys_generation(self) -> int: ...

    async def key_spend(self) -> dict[str, float]: ...

    async def usage(self, since: float, by: GroupBy) -> list[UsageGroup]: ...

    async def day_stats(self, day_start: float) -> DayStats: ...

    async def check(self) -> StoreCheck:
        """O(1) whatever the ledger's size: /health and /readyz call it every round."""
        ...

    async def schema_status(self) -> SchemaStatus: ...

    async def migrate(self) -> list[tuple[int, str]]:
        """Apply pending migrations under a lock; return those this call applied."""
        ...

    def is_permanent(self, error: BaseException) -> bool:
        """Did the database refuse the data itself (retrying cannot help)?"""
        ...


class DuplicateKeyName(Exception):
    """An active key already has this name."""


def day_start(now: float) -> float:
    """Midnight UTC of the day containing ``now``."""
    return now - (now % 86400)
