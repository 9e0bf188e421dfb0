"""Where cached answers live: ``MemoryCache`` (an LRU in this process, bounded by
bytes) and ``RedisCache`` (shared by replicas; a Redis that stops answering makes
misses, never errors), and the ``Entry`` they hold."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from daemon.ledger.base import redact_text, redact_url

log = logging.getLogger("chatvault.cache")

# After a Redis failure, requests do not wait on it again for this long.
_REDIS_PAUSE_S = 1.0


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


class CacheUnavailable(Exception):
    """The cache's backend cannot be reached (the message says which, without secrets)."""


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
