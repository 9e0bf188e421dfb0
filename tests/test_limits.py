"""The rate-limit maths, as plain functions: no clock, no I/O."""

from __future__ import annotations

import pytest

from daemon.limits import (
    KeyLimits,
    admit_while_under,
    charge,
    decide,
    format_duration,
    take,
)
from daemon.quota import Ask, MemoryQuota


def run(limit: int, times: list[float]) -> list[bool]:
    tat, out = 0.0, []
    for now in times:
        check = take(tat, now, limit)
        out.append(check.allowed)
        tat = check.tat
    return out


def test_a_burst_of_the_limit_passes_and_the_next_is_refused() -> None:
    assert run(5, [100.0] * 6) == [True] * 5 + [False]


def test_refill_is_continuous_one_unit_per_interval() -> None:
    # 6 per minute: one unit every 10 s.
    assert run(6, [0.0] * 6 + [5.0, 10.0, 10.0]) == [True] * 6 + [False, True, False]


def test_retry_after_is_exactly_when_the_request_would_fit() -> None:
    tat = 0.0
    for _ in range(3):
        tat = take(tat, 0.0, 3).tat
    refused = take(tat, 0.0, 3)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(20.0)
    assert not take(tat, 19.9, 3).allowed
    assert take(tat, 20.0, 3).allowed


@pytest.mark.parametrize("limit", [1, 7, 60, 1000])
def test_retry_after_never_exceeds_one_interval_for_single_requests(limit: int) -> None:
    tat = 0.0
    for i in range(limit * 3):
        check = take(tat, i * 0.001, limit)
        tat = check.tat
        if not check.allowed:
            assert 0 < check.retry_after_s <= 60.0 / limit + 1e-9


def test_remaining_counts_down_and_reset_grows() -> None:
    tat, remaining, resets = 0.0, [], []
    for _ in range(4):
        check = take(tat, 0.0, 4)
        tat = check.tat
        remaining.append(round(check.remaining))
        resets.append(check.reset_s)
    assert remaining == [3, 2, 1, 0]
    assert resets == sorted(resets) and resets[-1] == pytest.approx(60.0)


def test_token_limit_admits_while_under_then_waits_for_the_overdraft() -> None:
    tat = 0.0
    assert admit_while_under(tat, 0.0, 100).allowed
    tat = charge(tat, 0.0, 150, 100)  # a big answer overdraws the bucket by 50 tokens
    refused = admit_while_under(tat, 0.0, 100)
    assert not refused.allowed
    # 150 tokens at 100/min is 90 s of budget; one token more fits after 90 - 60 + 0.6 s.
    assert refused.retry_after_s == pytest.approx(30.6)
    assert admit_while_under(tat, 30.6, 100).allowed


def test_decide_refuses_on_either_limit_and_uses_nothing_when_refusing() -> None:
    limits = KeyLimits("k", rpm=2, tpm=10)
    decision, requests_tat = decide(limits, 0.0, 0.0, 0.0)
    assert decision.allowed
    full_tokens = charge(0.0, 0.0, 10, 10)
    decision, after = decide(limits, requests_tat, full_tokens, 0.0)
    assert not decision.allowed and decision.limit_type == "tokens"
    assert after == requests_tat
    names = {name for name, _ in decision.headers}
    assert {
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    } <= names


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.9994, "999ms"), (1.0, "1s"), (59.2, "1m0s"), (360, "6m0s"), (61, "1m1s")],
)
def test_reset_durations_use_openai_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def _acquire_many(quota: MemoryQuota, limits: KeyLimits, n: int) -> list[bool]:
    return [(await quota.admit(Ask(limits, None))).allowed for _ in range(n)]


def test_memory_limiter_keeps_keys_apart() -> None:
    import asyncio

    quota = MemoryQuota(clock=lambda: 0.0)
    a, b = KeyLimits("a", rpm=2), KeyLimits("b", rpm=2)
    assert asyncio.run(_acquire_many(quota, a, 3)) == [True, True, False]
    assert asyncio.run(_acquire_many(quota, b, 2)) == [True, True]
    assert asyncio.run(_acquire_many(quota, KeyLimits("c"), 50)) == [True] * 50
