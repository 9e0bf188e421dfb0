"""Offline admin: keys, usage and config checks against the configured database.

These commands read the same config and ledger as the daemon, so they import
``daemon`` (lazily, from the command functions); the HTTP-only commands never do.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import Settings, load_config
from daemon.keys import KeyRecord, create_key
from daemon.ledger import Store, open_store
from daemon.ledger.base import DuplicateKeyName, GroupBy
from daemon.pricing import litellm_cost_map, needs_cost_map, price_for

T = TypeVar("T")

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: float) -> float:
    """``24h``, ``7d``, ``30m`` ago, or an ISO date/time; raises ValueError."""
    match = _SINCE.match(value.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    import datetime as dt

    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since {value!r}: use a duration like 24h, 7d, 30m or a date like 2026-01-31"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


class LedgerUnavailable(Exception):
    """The configured ledger database cannot be used; the message says why."""


def with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    async def run() -> T:
        store = open_store(settings.ledger.url)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (DuplicateKeyName, ValueError):
        raise
    except Exception as exc:  # the database's own errors: one line for the operator
        where = settings.ledger.url.split("@")[-1]
        raise LedgerUnavailable(f"ledger {where}: {type(exc).__name__}: {exc}") from None


def key_json(record: KeyRecord, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "user_type": record.user_type,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "budget_usd": record.budget_usd,
        "models": list(record.models) if record.models is not None else None,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "spend_usd": round(record.spend_usd, 10),
    }
    if secret is not None:
        out["key"] = secret
    return out


def keys_create(
    settings: Settings,
    *,
    name: str,
    user_type: str,
    rpm: int | None,
    tpm: int | None,
    budget_usd: float | None,
    models: tuple[str, ...] | None,
) -> dict[str, Any]:
    """Raises ValueError for bad input, DuplicateKeyName for a taken name."""
    known = {m.name for m in settings.models}
    unknown = [m for m in models or () if m not in known]
    if unknown:
        raise ValueError(
            f"--models: {', '.join(unknown)} not in the config (known: {', '.join(sorted(known))})"
        )
    new = create_key(
        name=name,
        user_type=user_type,
        rpm=rpm,
        tpm=tpm,
        budget_usd=budget_usd,
        models=models,
        now=time.time(),
    )
    with_store(settings, lambda store: store.insert_key(new.record))
    return key_json(new.record, new.secret)


def keys_list(settings: Settings, include_revoked: bool) -> list[dict[str, Any]]:
    records = with_store(settings, lambda store: store.list_keys(include_revoked))
    return [key_json(r) for r in records]


def keys_revoke(settings: Settings, id_or_name: str) -> dict[str, Any] | None:
    record = with_store(settings, lambda store: store.revoke_key(id_or_name, time.time()))
    return key_json(record) if record is not None else None


def usage(settings: Settings, since: float, by: GroupBy) -> list[dict[str, Any]]:
    groups = with_store(settings, lambda store: store.usage(since, by))
    return [
        {
            by: g.group,
            "requests": g.requests,
            "errors": g.errors,
            "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens,
            "cost_usd": round(g.cost_usd, 10),
        }
        for g in groups
    ]


def config_summary(
    settings: Settings, environ: dict[str, str]
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Each model with its price, and warnings that do not make the config invalid."""
    cost_map = litellm_cost_map() if any(needs_cost_map(m) for m in settings.models) else {}
    models, warnings = [], []
    for i, m in enumerate(settings.models):
        price = price_for(m, cost_map)
        if price.source == "unknown":
            label = "unknown"
            warnings.append(
                f"models[{i}] ({m.name}): no pricing and not in litellm's cost map; costs will be 0"
            )
        elif price.source == "free":
            label = "free (local)"
        else:
            label = f"${price.input * 1e6:g} / ${price.output * 1e6:g} per M tokens"
        models.append((m.name, m.provider, label))
        if m.api_key_env and not environ.get(m.api_key_env):
            warnings.append(
                f"models[{i}].api_key_env: {m.api_key_env} is not set in this environment"
            )
    return models, warnings


def load(path: Path) -> Settings:
    return load_config(path)
