"""The response cache: exact-match answers to chat requests (docs/routing.md).

The key is a hash of the operation, the model and every request field that changes
the answer (messages, tools, temperature, ...; not ``stream``, ``stream_options`` or
``user``), under a scope: the API key's id (``scope: key``, the default: one key never
sees another's answers) or nothing (``scope: global``). The value is the answer as a
``chat.completion`` JSON object, exactly as the client first received it: a later
non-stream hit gets the same bytes, a streaming hit gets it replayed as SSE chunks.

Requests whose answer is not reproducible (``n > 1``, a non-zero or unset
temperature) are cached only with ``cache_nondeterministic: true``. ``Cache-Control:
no-cache`` skips the lookup (the fresh answer is stored), ``no-store`` skips both.

Two backends: ``MemoryCache`` (an LRU bounded by ``max_bytes``, per process) and
``RedisCache`` (shared by replicas). A Redis that stops answering at run time makes
requests misses (counted as ``error``, shown in /health), never errors.

    cache = open_cache(settings)
    entry = await cache.lookup(key_id, body, cache_control, usage)

This module holds the key and the pipeline's view (``ResponseCache``); ``backends``
where entries live, ``streams`` copying a miss's stream and replaying a hit.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
from opentelemetry import trace

from daemon.cache.backends import (
    Backend,
    CacheStatus,
    CacheUnavailable,
    Entry,
    MemoryCache,
    RedisCache,
)
from daemon.cache.streams import Pending, collect, completion_from_chunks, replay, replay_stream
from daemon.config import Settings
from daemon.usage import Usage

__all__ = [
    "AnyCache",
    "CacheStatus",
    "CacheUnavailable",
    "DisabledCache",
    "Entry",
    "MemoryCache",
    "Pending",
    "RedisCache",
    "ResponseCache",
    "cache_key",
    "cacheable",
    "check_backend",
    "collect",
    "completion_from_chunks",
    "open_cache",
    "replay",
    "replay_stream",
]

# Fields that do not change the answer: left out of the key.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata", "store"})


def cacheable(body: dict[str, Any], nondeterministic: bool) -> bool:
    """Is this request's answer reproducible, or may it be cached anyway?"""
    if nondeterministic:
        return True
    n = body.get("n")
    if n is not None and n != 1:
        return False
    # An unset temperature is the provider's default (OpenAI's: 1), not 0.
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and temperature == 0


def cache_key(operation: str, body: dict[str, Any], scope: str) -> str:
    fields = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    material = orjson.dumps([operation, scope, fields], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(material).hexdigest()


class ResponseCache:
    """The pipeline's view: look a request up, and store complete answers."""

    enabled = True

    def __init__(
        self, backend: Backend, *, scope: str, nondeterministic: bool, max_entry_bytes: int
    ) -> None:
        self.backend = backend
        self.status = backend.status
        self.global_scope = scope == "global"
        self.nondeterministic = nondeterministic
        self.max_entry_bytes = max_entry_bytes

    async def lookup(
        self,
        key_id: str,
        body: dict[str, Any],
        cache_control: str | None,
        usage: Usage,
        models: frozenset[str] | None = None,
    ) -> Entry | None:
        """The cached answer, or None. Sets ``usage.cache_result`` (hit | miss | bypass |
        error) and, when the answer should be stored, ``usage.cache_write``. An answer a
        fallback outside ``models`` (the key's allowed models) gave is a miss: with
        ``scope: global`` another key's request may have stored it."""
        directives = cache_control.lower() if cache_control else ""
        if "no-store" in directives or not cacheable(body, self.nondeterministic):
            usage.cache_result = "bypass"
            return None
        key = cache_key(usage.operation, body, "" if self.global_scope else key_id)
        usage.cache_write = Pending(key)
        if "no-cache" in directives:  # a fresh answer, stored for the next ones
            usage.cache_result = "bypass"
            return None
        try:
            entry = await self.backend.get(key)
        except CacheUnavailable:
            usage.cache_result, usage.cache_write = "error", None
            return None
        if entry is not None and models is not None and entry.model not in models:
            entry = None
        usage.cache_result = "miss" if entry is None else "hit"
        trace.get_current_span().set_attribute("chatvault.cache.result", usage.cache_result)
        return entry

    def store(self, usage: Usage) -> None:
        """Keep a complete answer (called when the request is accounted for; no waiting)."""
        pending: Pending | None = usage.cache_write
        usage.cache_write = None
        if pending is None or not usage.ok or usage.estimated_reason or not usage.finish_reasons:
            return  # only complete answers
        body = pending.body if pending.body is not None else completion_from_chunks(pending.events)
        if body is None or len(body) > self.max_entry_bytes:
            return
        entry = Entry(
            body, usage.cost_usd, usage.served_model, usage.provider, usage.upstream_model
        )
        self.backend.put(pending.key, entry)


class DisabledCache:
    """``cache.enabled: false``: the pipeline reads ``enabled`` and goes on."""

    enabled = False
    status = None
    max_entry_bytes = 0

    async def lookup(
        self,
        key_id: str,
        body: dict[str, Any],
        cache_control: str | None,
        usage: Usage,
        models: frozenset[str] | None = None,
    ) -> Entry | None:
        return None

    def store(self, usage: Usage) -> None:
        return None


AnyCache = ResponseCache | DisabledCache


def open_cache(settings: Settings) -> AnyCache:
    c = settings.cache
    if not c.enabled:
        return DisabledCache()
    backend: Backend
    if c.backend == "redis":
        backend = RedisCache(
            settings.cache_redis_url,
            key_prefix=settings.limits.key_prefix,
            ttl_s=c.ttl_s,
            timeout_s=settings.limits.backend_timeout_s,
        )
    else:
        backend = MemoryCache(c.max_bytes, c.ttl_s)
    return ResponseCache(
        backend,
        scope=c.scope,
        nondeterministic=c.cache_nondeterministic,
        max_entry_bytes=max(c.max_bytes // 4, 1),
    )


def check_backend(settings: Settings) -> str | None:
    """For ``config check`` and ``serve``: why the configured cache cannot work, or None."""
    cache = open_cache(settings)
    if not isinstance(cache, ResponseCache) or not isinstance(cache.backend, RedisCache):
        return None
    backend = cache.backend

    async def ping() -> str | None:
        try:
            await backend.start()
            return None
        except CacheUnavailable as exc:
            return str(exc)
        finally:
            await backend.aclose()

    return asyncio.run(ping())
