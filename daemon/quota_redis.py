"""Rate limits and budgets in Redis, shared by every worker and replica.

Admission is one Lua script call (one round trip, atomic): the GCRA request and token
buckets of ``daemon/limits.py``, then the budget reservation of the request's worst
case; a refused request changes nothing. Time is Redis' own clock (``TIME``), the one
source every replica agrees on. Settlements (the real tokens and cost) are queued and
sent in one pipeline by a background task, so the request path never waits for them.

Money is counted in integer nano-dollars, exact in Redis and in Lua's doubles. A
key's spend only ever grows, and never counts less than the ledger has committed
(``set_committed`` raises it; that is how the counters are rebuilt after Redis lost
them). Reservations expire (``reservation_ttl_s``), so a replica that dies mid-request
cannot hold a budget hostage.

Keys, per API key id ``K`` (the braces keep one key's state in one cluster slot):
``{prefix}:{K}:rpm``, ``{prefix}:{K}:tpm`` (bucket states), ``{prefix}:{K}:spend``
(hash: spent, reserved), ``{prefix}:{K}:resv`` (zset of reservation ids by expiry) and
``{prefix}:{K}:resv_amounts`` (hash: reservation id to amount).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from daemon.budget import Verdict
from daemon.errors import ServiceUnavailable
from daemon.limits import ALLOW, Decision, format_duration
from daemon.quota import Admitted, Ask, QuotaStatus, Ticket
from daemon.usage import Usage

log = logging.getLogger("chatvault.quota")

NANO = 1_000_000_000

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local period = 60
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local refused, retry = '', 0
local new_rtat = nil
local r_rem, r_reset, t_rem, t_reset = -1, 0, -1, 0
if rpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local interval = period / rpm
  local base = math.max(tat, now)
  local nt = base + interval
  if nt - now <= period + 1e-9 then
    new_rtat = nt
    r_rem = (period - (nt - now)) / interval
    r_reset = nt - now
  else
    r_rem = math.max((period - (base - now)) / interval, 0)
    r_reset = base - now
    refused, retry = 'requests', nt - now - period
  end
end
if tpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  local interval = period / tpm
  local used = math.max(tat, now) - now
  t_reset = used
  if used + interval <= period + 1e-9 then
    t_rem = (period - used) / interval
  else
    t_rem = 0
    if refused == '' then refused, retry = 'tokens', used + interval - period end
  end
end
local head = {tostring(retry), tostring(r_rem), tostring(r_reset), tostring(t_rem), tostring(t_reset)}
if refused ~= '' then
  return {0, refused, head[1], head[2], head[3], head[4], head[5], '0', '0'}
end
local budget = tonumber(ARGV[3])
local spent, reserved = 0, 0
if budget >= 0 then
  local now_ms = math.floor(now * 1000)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms)
  for _, id in ipairs(expired) do
    local amount = tonumber(redis.call('HGET', KEYS[5], id) or '0')
    redis.call('HINCRBY', KEYS[3], 'reserved', -amount)
    redis.call('HDEL', KEYS[5], id)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now_ms) end
  spent = tonumber(redis.call('HGET', KEYS[3], 'spent') or '0')
  reserved = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
  local amount = tonumber(ARGV[4])
  if spent >= budget or spent + reserved + amount > budget then
    return {0, 'budget', head[1], head[2], head[3], head[4], head[5], tostring(spent), tostring(reserved)}
  end
  redis.call('HINCRBY', KEYS[3], 'reserved', amount)
  redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[6]), ARGV[5])
  redis.call('HSET', KEYS[5], ARGV[5], amount)
end
if new_rtat then
  redis.call('SET', KEYS[1], tostring(new_rtat), 'PX', math.ceil((new_rtat - now) * 1000) + 1000)
end
return {1, '', head[1], head[2], head[3], head[4], head[5], tostring(spent), tostring(reserved)}
"""

_SETTLE = """
local tokens, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens > 0 and tpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local nt = math.max(tat, now) + tokens * 60 / tpm
  redis.call('SET', KEYS[1], tostring(nt), 'PX', math.ceil((nt - now) * 1000) + 1000)
end
if ARGV[4] ~= '' then
  local amount = redis.call('HGET', KEYS[4], ARGV[4])
  if amount then
    redis.call('HINCRBY', KEYS[2], 'reserved', -tonumber(amount))
    redis.call('HDEL', KEYS[4], ARGV[4])
    redis.call('ZREM', KEYS[3], ARGV[4])
  end
end
if cost > 0 then redis.call('HINCRBY', KEYS[2], 'spent', cost) end
return 1
"""

# Spend never counts less than the ledger has committed.
_FLOOR = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
if spent < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'spent', ARGV[1]) end
return 1
"""

_RELEASE = """
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'reserved', 0)
return 1
"""


def nano(usd: float) -> int:
    return round(usd * NANO)


def _headers(kind: str, limit: int, remaining: float, reset_s: float) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(max(int(remaining), 0))),
        (f"x-ratelimit-reset-{kind}", format_duration(reset_s)),
    ]


class RedisQuota:
    """``RedisQuota("redis://127.0.0.1:6379/0", key_prefix="chatvault", timeout_s=0.25)``"""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "chatvault",
        timeout_s: float = 0.25,
        fail_open: bool = False,
        reservation_ttl_s: float = 900.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        self.redis = client or aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self.status = QuotaStatus("redis")
        self._admit = self.redis.register_script(_ADMIT)
        self._settle = self.redis.register_script(_SETTLE)
        self._floor = self.redis.register_script(_FLOOR)
        self._release = self.redis.register_script(_RELEASE)
        self._scripts = {"settle": self._settle, "floor": self._floor, "release": self._release}
        self._queue: deque[tuple[str, list[str], list[Any]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._floors: dict[str, int] = {}  # last committed totals sent, per key

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self.prefix}:{{{key_id}}}"
        return [
            f"{base}:rpm",
            f"{base}:tpm",
            f"{base}:spend",
            f"{base}:resv",
            f"{base}:resv_amounts",
        ]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="chatvault-quota-settle")
        try:
            await asyncio.wait_for(self.redis.ping(), self.timeout_s * 4)
            self.status.reachable, self.status.last_error = True, None
        except (RedisError, OSError, TimeoutError) as exc:  # serve anyway; admission decides
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.status.reachable = False
        self.status.last_error = f"{type(exc).__name__}: {exc}"[:300]

    async def admit(self, ask: Ask) -> Admitted:
        limits = ask.limits
        ticket_id = f"{random.getrandbits(64):016x}"
        budget = -1 if ask.budget_usd is None else nano(ask.budget_usd)
        if limits.rpm is None and limits.tpm is None and ask.budget_usd is None:
            return Admitted(ALLOW, None, Ticket(limits.key_id, None))
        try:
            reply = await asyncio.wait_for(
                self._admit(
                    keys=self._keys(limits.key_id),
                    args=[
                        limits.rpm or 0,
                        limits.tpm or 0,
                        budget,
                        nano(ask.worst_case_usd),
                        ticket_id,
                        self.reservation_ttl_ms,
                    ],
                ),
                self.timeout_s,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            if not self.fail_open:
                raise ServiceUnavailable(
                    "The limit store cannot be reached, so this request cannot be checked "
                    "against its limits; try again shortly.",
                    headers={"Retry-After": "1"},
                ) from None
            self.status.fail_open_admissions += 1
            return Admitted(ALLOW, None, Ticket(limits.key_id, limits.tpm), fail_open=True)
        self.status.reachable, self.status.last_error = True, None
        return self._read(ask, reply, ticket_id)

    def _read(self, ask: Ask, reply: list[Any], ticket_id: str) -> Admitted:
        limits = ask.limits
        refused = _text(reply[1])  # reply[0] is 1 when admitted; refused says why not
        retry, r_rem, r_reset, t_rem, t_reset = (float(_text(v)) for v in reply[2:7])
        spent, reserved = int(_text(reply[7])) / NANO, int(_text(reply[8])) / NANO
        headers: list[tuple[str, str]] = []
        if limits.rpm is not None:
            headers += _headers("requests", limits.rpm, r_rem, r_reset)
        if limits.tpm is not None:
            headers += _headers("tokens", limits.tpm, t_rem, t_reset)
        ticket = Ticket(limits.key_id, limits.tpm)
        if refused in ("requests", "tokens"):
            return Admitted(Decision(False, refused, retry, tuple(headers)), None, ticket)
        decision = Decision(True, None, 0.0, tuple(headers))
        if ask.budget_usd is None:
            return Admitted(decision, None, ticket)
        remaining = max(ask.budget_usd - spent - reserved, 0.0)
        if refused == "budget":
            exhausted = spent >= ask.budget_usd
            return Admitted(
                decision, Verdict(False, exhausted, 0.0 if exhausted else remaining), ticket
            )
        verdict = Verdict(True, False, remaining)
        return Admitted(decision, verdict, Ticket(limits.key_id, limits.tpm, ticket_id))

    def settle(self, ticket: Ticket, cost_usd: float, tokens: int) -> None:
        reservation = ticket.reservation if isinstance(ticket.reservation, str) else ""
        if not reservation and not cost_usd and not (tokens and ticket.tpm):
            return
        keys = self._keys(ticket.key_id)
        self._enqueue(
            "settle",
            [keys[1], keys[2], keys[3], keys[4]],
            [tokens, ticket.tpm or 0, nano(cost_usd), reservation],
        )

    def set_committed(self, totals: dict[str, float]) -> None:
        for key_id, total in totals.items():
            amount = nano(total)
            if amount > self._floors.get(key_id, 0):
                self._floors[key_id] = amount
                self._enqueue("floor", [self._keys(key_id)[2]], [amount])

    def release_key(self, key_id: str) -> None:
        keys = self._keys(key_id)
        self._enqueue("release", [keys[2], keys[3], keys[4]], [])

    def _enqueue(self, script: str, keys: list[str], args: list[Any]) -> None:
        if len(self._queue) >= 100_000:  # Redis has been away long: the ledger floor repairs
            self._queue.popleft()
            self.status.settle_failures += 1
        self._queue.append((script, keys, args))
        self._wakeup.set()

    async def _flush_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
                try:
                    await self._send(batch)
                    backoff = 0.05
                except (RedisError, OSError, TimeoutError) as exc:
                    self._failed(exc)
                    self._queue.extendleft(reversed(batch))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)

    async def _send(self, batch: list[tuple[str, list[str], list[Any]]]) -> None:
        """One pipeline of EVALSHA. redis-py's Script objects would send SCRIPT EXISTS
        before every pipeline that holds them (a second round trip per batch); instead
        a command that finds its script missing (Redis restarted, SCRIPT FLUSH) is
        loaded and resent alone, so no settle that did run is applied twice."""
        pending = batch
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, keys, args in pending:
                    pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                results = await asyncio.wait_for(
                    pipe.execute(raise_on_error=False), self.timeout_s * 4
                )
            self.status.reachable, self.status.last_error = True, None
            missing = []
            for op, result in zip(pending, results, strict=True):
                if isinstance(result, NoScriptError):
                    missing.append(op)
                elif isinstance(result, Exception):
                    # A script error would fail again: count it, never retry it.
                    self.status.settle_failures += 1
                    log.error("limits: redis %s failed: %s", op[0], result)
            if not missing:
                return
            for name in {op[0] for op in missing}:
                await self.redis.script_load(self._scripts[name].script)
            pending = missing
        # Lost again at once: drop these (never resend what may have run); the
        # ledger's committed floor repairs the spend on its next batch.
        self.status.settle_failures += len(pending)
        log.error("limits: redis lost chatvault's scripts twice; %d updates dropped", len(pending))

    async def flush(self) -> None:
        """Send what is queued now (tests, shutdown)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
            await self._send(batch)

    def batch_written(
        self, rows: Sequence[Usage], seconds: float, totals: dict[str, float]
    ) -> None:
        self.set_committed(totals)

    def batch_failed(self, rows: Sequence[Usage], seconds: float, error: BaseException) -> None:
        return None

    async def aclose(self) -> None:
        if self._task is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self.flush(), 2.0)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
