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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from opentelemetry import trace
from redis.exceptions import RedisError

from daemon.config import Settings
from daemon.ledger.base import redact_text, redact_url
from daemon.providers.base import SSE_DONE, sse_event
from daemon.providers.sse import event_data
from daemon.usage import Usage

log = logging.getLogger("chatvault.cache")

# Fields that do not change the answer: left out of the key.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata", "store"})
# After a Redis failure, requests do not wait on it again for this long.
_REDIS_PAUSE_S = 1.0


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


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached answer: the ``chat.completion`` bytes and who first answered them."""

    body: bytes
    cost_usd: float  # what it cost then: a hit's saving
    model: str  # the public model that answered (a fallback, perhaps)
    provider: str
    upstream_model: str

    def encode(self) -> bytes:
        meta = [self.cost_usd, self.model, self.provider, self.upstream_model]
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        head, sep, body = raw.partition(b"\n")
        try:
            cost, model, provider, upstream_model = orjson.loads(head)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        if not sep:
            return None
        return cls(body, float(cost), str(model), str(provider), str(upstream_model))

    @property
    def size(self) -> int:
        return len(self.body) + 200  # the body and, about, the rest


@dataclass
class CacheStatus:
    """What /health shows about the cache."""

    backend: str
    reachable: bool = True
    last_error: str | None = None
    errors: int = 0
    entries: int = 0
    bytes: int = 0


class Backend(Protocol):
    status: CacheStatus

    async def get(self, key: str) -> Entry | None: ...

    def put(self, key: str, entry: Entry) -> None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class MemoryCache:
    """An LRU in this process, bounded by the bytes of its entries."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.status = CacheStatus("memory")
        self._items: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, entry = item
        if self.clock() >= expires:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (self.clock() + self.ttl_s, entry)
        self._bytes += entry.size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        self.status.entries, self.status.bytes = len(self._items), self._bytes

    def _drop(self, key: str) -> None:
        _, entry = self._items.pop(key)
        self._bytes -= entry.size
        self.status.entries, self.status.bytes = len(self._items), self._bytes

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisCache:
    """Entries in Redis, shared by every replica; expiry is Redis's."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        ttl_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.prefix = f"{key_prefix}:cache:"
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s = timeout_s
        self.clock = clock
        self.status = CacheStatus("redis")
        self._paused_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Raises CacheUnavailable: a cache configured on an unreachable Redis is a
        configuration mistake, said at start (at run time it only degrades)."""
        try:
            await asyncio.wait_for(self.redis.ping(), self.timeout_s * 4)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheUnavailable(self._unreachable(exc)) from None

    def _unreachable(self, exc: BaseException) -> str:
        text = redact_text(f"{type(exc).__name__}: {exc}", self.url)[:300]
        return f"cache.backend: redis at {redact_url(self.url)} cannot be reached ({text})"

    async def get(self, key: str) -> Entry | None:
        if self.clock() < self._paused_until:
            raise CacheUnavailable(self.status.last_error or "paused")
        try:
            raw = await asyncio.wait_for(self.redis.get(self.prefix + key), self.timeout_s * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise CacheUnavailable(str(self.status.last_error)) from None
        self.status.reachable, self.status.last_error = True, None
        return Entry.decode(raw) if isinstance(raw, bytes) else None

    def put(self, key: str, entry: Entry) -> None:
        """Queued: the request that produced the answer does not wait for Redis."""
        if self.clock() < self._paused_until:
            return
        task = asyncio.create_task(self._write(key, entry.encode()))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes) -> None:
        try:
            await asyncio.wait_for(
                self.redis.set(self.prefix + key, value, px=self.ttl_ms), self.timeout_s * 4
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.status.reachable = False
        self.status.errors += 1
        self.status.last_error = self._unreachable(exc)
        self._paused_until = self.clock() + _REDIS_PAUSE_S
        log.warning("response cache degraded: %s", self.status.last_error)

    async def aclose(self) -> None:
        if self._writes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*self._writes), 2.0)
        await self.redis.aclose()


class CacheUnavailable(Exception):
    """The cache's backend cannot be reached (the message says which, without secrets)."""


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


@dataclass(slots=True)
class Pending:
    """A miss's key, and the answer once known: the reply's bytes or a stream's events."""

    key: str
    body: bytes | None = None
    events: list[bytes] | None = None
    size: int = 0


async def collect(
    events: AsyncIterator[list[bytes]], pending: Pending, limit: int
) -> AsyncIterator[list[bytes]]:
    """Pass a stream's event batches on, keeping a copy for the cache (up to ``limit``
    bytes; a longer answer is not stored)."""
    kept: list[bytes] = []
    pending.events = kept
    async for batch in events:
        if pending.size <= limit:
            kept.extend(batch)
            pending.size += sum(len(e) for e in batch)
        yield batch
    if pending.size > limit:
        pending.events = None


def completion_from_chunks(events: list[bytes] | None) -> bytes | None:
    """The ``chat.completion`` a complete stream of chunks adds up to, or None."""
    if not events:
        return None
    head: dict[str, Any] | None = None
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event_data(event)
        if data is None or data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or chunk.get("error"):
            return None
        head = head or chunk
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or ():
            _fold(choices.setdefault(int(c.get("index", 0)), _new_choice()), c)
    if head is None or not choices or any(c["finish_reason"] is None for c in choices.values()):
        return None
    out: dict[str, Any] = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [_message(i, choices[i]) for i in sorted(choices)],
        "usage": usage,
    }
    if head.get("system_fingerprint") is not None:
        out["system_fingerprint"] = head["system_fingerprint"]
    return orjson.dumps(out)


def _new_choice() -> dict[str, Any]:
    return {"role": "assistant", "content": [], "refusal": [], "tools": {}, "finish_reason": None}


def _fold(state: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta") or {}
    if delta.get("role"):
        state["role"] = delta["role"]
    for field in ("content", "refusal"):
        if isinstance(delta.get(field), str):
            state[field].append(delta[field])
    for call in delta.get("tool_calls") or ():
        tool = state["tools"].setdefault(
            int(call.get("index", 0)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            tool["id"] = call["id"]
        function = call.get("function") or {}
        for part in ("name", "arguments"):
            if isinstance(function.get(part), str):
                tool["function"][part] += function[part]
    if choice.get("finish_reason"):
        state["finish_reason"] = choice["finish_reason"]


def _message(index: int, state: dict[str, Any]) -> dict[str, Any]:
    tools = [state["tools"][i] for i in sorted(state["tools"])]
    message: dict[str, Any] = {
        "role": state["role"],
        "content": "".join(state["content"]) if state["content"] or not tools else None,
        "refusal": "".join(state["refusal"]) if state["refusal"] else None,
    }
    if tools:
        message["tool_calls"] = tools
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": state["finish_reason"],
    }


def replay(body: bytes, include_usage: bool) -> list[bytes]:
    """A cached ``chat.completion`` as the SSE events of a stream: per choice, its
    message in one delta, then its finish reason; the usage chunk if the client asked."""
    completion = orjson.loads(body)
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    out = []
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant")}
        delta["content"] = message.get("content")
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        for d, reason in ((delta, None), ({}, choice.get("finish_reason"))):
            part = {"index": index, "delta": d, "logprobs": None, "finish_reason": reason}
            out.append(sse_event({**base, "choices": [part]}))
    if include_usage:
        out.append(sse_event({**base, "choices": [], "usage": completion.get("usage")}))
    out.append(SSE_DONE)
    return out


async def replay_stream(events: list[bytes]) -> AsyncIterator[bytes]:
    yield b"".join(events)


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
