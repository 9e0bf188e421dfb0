"""Per-key request and token rate limits.

The maths is a sliding-window counter (the previous fixed window's count, weighted by
how much of it still overlaps the sliding window, plus the current one): O(1) state
per key and limit, accurate to within a few percent, and the same arithmetic serves
an in-process store now and a shared (Redis) store later. The functions below are
pure; ``MemoryLimiter`` only keeps their state in a dict.

Tokens are known only after the upstream answers, so a token limit admits a request
while the window is under the limit and charges the actual tokens afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class Window:
    start: float = 0.0  # start of the current fixed window
    current: float = 0.0  # used in the current fixed window
    previous: float = 0.0  # used in the fixed window before it


def roll(state: Window, now: float, period: float) -> Window:
    """Move the window forward so that it contains ``now``."""
    if now < state.start + period:
        return state
    windows = math.floor((now - state.start) / period)
    start = state.start + windows * period if state.start else now - (now % period)
    previous = state.current if windows == 1 else 0.0
    return Window(start=start, current=0.0, previous=previous)


def used(state: Window, now: float, period: float) -> float:
    """Estimated use in the sliding window that ends at ``now`` (state already rolled)."""
    overlap = 1.0 - (now - state.start) / period
    return state.previous * max(overlap, 0.0) + state.current


def retry_after(state: Window, now: float, period: float, limit: float, amount: float) -> float:
    """Seconds until ``amount`` more fits under ``limit`` if nothing else is used."""
    room = limit - amount
    if room < 0:
        return period  # can never fit in one window; say a whole window
    if state.current > room:
        # Must wait for the next window, and then for the current count to decay.
        next_start = state.start + period
        wait_into_next = period * (1.0 - room / state.current) if state.current else 0.0
        return max(next_start + wait_into_next - now, 0.0)
    if state.previous <= 0:
        return 0.0
    needed_overlap = (room - state.current) / state.previous
    return max(state.start + period * (1.0 - needed_overlap) - now, 0.0)


@dataclass(frozen=True, slots=True)
class Check:
    allowed: bool
    state: Window
    remaining: float
    reset_s: float  # seconds until the window has room again (0 when it has)


def take(state: Window, now: float, limit: float, amount: float, period: float = MINUTE) -> Check:
    """Admit ``amount`` if it fits; the returned state includes it only when admitted."""
    state = roll(state, now, period)
    in_use = used(state, now, period)
    if in_use + amount <= limit:
        new = Window(state.start, state.current + amount, state.previous)
        return Check(True, new, max(limit - in_use - amount, 0.0), 0.0)
    wait = retry_after(state, now, period, limit, amount)
    return Check(False, state, max(limit - in_use, 0.0), wait)


def admit_while_under(state: Window, now: float, limit: float, period: float = MINUTE) -> Check:
    """Admit while the window is below ``limit``; charges nothing (see ``charge``)."""
    state = roll(state, now, period)
    in_use = used(state, now, period)
    if in_use < limit:
        return Check(True, state, limit - in_use, 0.0)
    # Room for one more token is enough to admit.
    wait = retry_after(state, now, period, limit, 1.0)
    return Check(False, state, 0.0, wait)


def charge(state: Window, now: float, amount: float, period: float = MINUTE) -> Window:
    state = roll(state, now, period)
    return Window(state.start, state.current + amount, state.previous)


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
    limits: KeyLimits,
    requests: Window,
    tokens: Window,
    now: float,
) -> tuple[Decision, Window, Window]:
    """Admit one request against both limits; returns the decision and new states."""
    headers: list[tuple[str, str]] = []
    refused: tuple[str, float] | None = None
    new_requests, new_tokens = requests, tokens
    if limits.rpm is not None:
        check = take(requests, now, limits.rpm, 1.0)
        headers += rate_headers("requests", limits.rpm, check)
        if check.allowed:
            new_requests = check.state
        else:
            refused = ("requests", check.reset_s)
    if limits.tpm is not None:
        check = admit_while_under(tokens, now, limits.tpm)
        headers += rate_headers("tokens", limits.tpm, check)
        if not check.allowed and refused is None:
            refused = ("tokens", check.reset_s)
    if refused is not None:
        # A refused request uses nothing.
        return Decision(False, refused[0], refused[1], tuple(headers)), requests, tokens
    return Decision(True, None, 0.0, tuple(headers)), new_requests, new_tokens


class Limiter(Protocol):
    """Where the windows live: this process now, a shared store (Redis) for replicas."""

    async def acquire(self, limits: KeyLimits, now: float) -> Decision: ...

    def charge_tokens(self, key_id: str, tokens: int, now: float) -> None:
        """Count tokens after the fact; never waits (a shared store does it in the background)."""
        ...

    async def aclose(self) -> None: ...


class MemoryLimiter:
    """Windows in this process. With several workers each enforces its own share."""

    def __init__(self) -> None:
        self._requests: dict[str, Window] = {}
        self._tokens: dict[str, Window] = {}

    async def acquire(self, limits: KeyLimits, now: float) -> Decision:
        if limits.rpm is None and limits.tpm is None:
            return ALLOW
        key = limits.key_id
        decision, requests, tokens = decide(
            limits, self._requests.get(key, Window()), self._tokens.get(key, Window()), now
        )
        if limits.rpm is not None:
            self._requests[key] = requests
        if limits.tpm is not None:
            self._tokens[key] = tokens
        return decision

    def charge_tokens(self, key_id: str, tokens: int, now: float) -> None:
        window = self._tokens.get(key_id)
        if window is not None and tokens > 0:  # only keys with a token limit have a window
            self._tokens[key_id] = charge(window, now, tokens)

    async def aclose(self) -> None:
        return None
