"""Per-key request and token rate limits.

The maths is GCRA (the generic cell rate algorithm, a token bucket kept as one
number): each key and limit has a "theoretical arrival time" ``tat``, the moment its
bucket would be full again. A limit of N per minute refills one unit every 60/N
seconds and lets a burst of N through. The state is one float, the arithmetic is
exact (``Retry-After`` is never longer than it must be), and the same functions serve
the in-process store (``daemon/quota.py``) and, as a Lua script, the shared Redis store
(``daemon/quota_redis.py``). The functions are pure. Time is a monotonic clock in one
process and Redis' own clock when shared, never a local wall clock: a backward NTP
step must not lock keys out.

Tokens are known only after the upstream answers, so a token limit admits a request
while the bucket has room and charges the actual tokens afterwards (a large answer can
overdraw it, and the key then waits in proportion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MINUTE = 60.0
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Check:
    allowed: bool
    tat: float  # the new state (unchanged when refused)
    remaining: float  # units still available right now
    reset_s: float  # seconds until the bucket is full again
    retry_after_s: float = 0.0  # when refused: seconds until the request would fit


def take(
    tat: float, now: float, limit: float, amount: float = 1.0, period: float = MINUTE
) -> Check:
    """Admit ``amount`` units if the bucket holds them."""
    interval = period / limit
    base = max(tat, now)
    new_tat = base + amount * interval
    if new_tat - now <= period + _EPSILON:
        remaining = (period - (new_tat - now)) / interval
        return Check(True, new_tat, remaining, new_tat - now)
    remaining = max((period - (base - now)) / interval, 0.0)
    return Check(False, tat, remaining, base - now, new_tat - now - period)


def admit_while_under(tat: float, now: float, limit: float, period: float = MINUTE) -> Check:
    """Admit while at least one unit is left; charges nothing (see ``charge``)."""
    interval = period / limit
    base = max(tat, now)
    used = base - now
    if used + interval <= period + _EPSILON:
        return Check(True, tat, (period - used) / interval, used)
    return Check(False, tat, 0.0, used, used + interval - period)


def charge(tat: float, now: float, amount: float, limit: float, period: float = MINUTE) -> float:
    return max(tat, now) + amount * period / limit


@dataclass(frozen=True, slots=True)
class KeyLimits:
    key_id: str
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of admitting one request, with OpenAI's ``x-ratelimit-*`` headers."""

    allowed: bool
    limit_type: str | None = None  # "requests" | "tokens" when refused
    retry_after_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


ALLOW = Decision(True)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(kind: str, limit: int, check: Check) -> list[tuple[str, str]]:
    return [
        (f"x-ratelimit-limit-{kind}", str(limit)),
        (f"x-ratelimit-remaining-{kind}", str(math.floor(check.remaining))),
        (f"x-ratelimit-reset-{kind}", format_duration(check.reset_s)),
    ]


def decide(
    limits: KeyLimits, requests_tat: float, tokens_tat: float, now: float
) -> tuple[Decision, float]:
    """Admit one request against both limits; returns the decision and the new
    request-bucket state (the token bucket changes only when tokens are charged)."""
    headers: list[tuple[str, str]] = []
    refused: tuple[str, float] | None = None
    new_requests_tat = requests_tat
    if limits.rpm is not None:
        check = take(requests_tat, now, limits.rpm)
        headers += rate_headers("requests", limits.rpm, check)
        if check.allowed:
            new_requests_tat = check.tat
        else:
            refused = ("requests", check.retry_after_s)
    if limits.tpm is not None:
        check = admit_while_under(tokens_tat, now, limits.tpm)
        headers += rate_headers("tokens", limits.tpm, check)
        if not check.allowed and refused is None:
            refused = ("tokens", check.retry_after_s)
    if refused is not None:
        # A refused request uses nothing.
        return Decision(False, refused[0], refused[1], tuple(headers)), requests_tat
    return Decision(True, None, 0.0, tuple(headers)), new_requests_tat
