"""Limits and budgets: the budget maths as plain functions, then both quota stores,
the in-process one and the Redis one against the machine's real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from daemon.budget import judge, usd, worst_case_cost, worst_case_tokens
from daemon.errors import ServiceUnavailable
from daemon.limits import KeyLimits
from daemon.pricing import Price
from daemon.quota import Ask, MemoryQuota, Quota
from daemon.quota_redis import RedisQuota
from tests.helpers import REDIS_URL, free_port, nothing_listens

PRICE = Price(input=0.15e-6, output=0.60e-6)  # USD per token


# -- the maths --------------------------------------------------------------------


def test_a_budget_spent_to_the_cent_admits_nothing_more() -> None:
    verdict = judge(budget=1.0, spent=1.0, reserved=0.0, amount=0.0)
    assert not verdict.allowed and verdict.exhausted and verdict.remaining_usd == 0.0


def test_a_zero_budget_admits_nothing() -> None:
    assert not judge(budget=0.0, spent=0.0, reserved=0.0, amount=0.0).allowed


def test_a_request_that_fits_exactly_is_admitted_and_one_that_does_not_is_refused() -> None:
    assert judge(budget=1.0, spent=0.25, reserved=0.25, amount=0.5).allowed
    verdict = judge(budget=1.0, spent=0.25, reserved=0.25, amount=0.5000001)
    assert not verdict.allowed and not verdict.exhausted
    assert verdict.remaining_usd == pytest.approx(0.5)


def test_worst_case_counts_the_prompt_and_max_tokens_for_every_choice() -> None:
    body = {"max_tokens": 100, "n": 3}
    tokens = worst_case_tokens(body, body_bytes=400, operation="chat", default_max_tokens=4096)
    assert (tokens.input, tokens.output) == (100, 300)
    # No max_tokens: the configured cap stands in for it.
    tokens = worst_case_tokens({}, body_bytes=8, operation="chat", default_max_tokens=50)
    assert (tokens.input, tokens.output) == (2, 50)
    # Embeddings have no output.
    tokens = worst_case_tokens({}, body_bytes=8, operation="embeddings", default_max_tokens=50)
    assert (tokens.input, tokens.output) == (2, 0)


def test_worst_case_cost_uses_the_dearest_deployment() -> None:
    tokens = worst_case_tokens({"max_tokens": 1000}, 4000, "chat", 4096)
    dear = Price(input=1e-6, output=2e-6)
    # 1000 input tokens at $1/M plus 1000 output tokens at $2/M, computed here by hand.
    assert worst_case_cost(tokens, [PRICE, dear]) == pytest.approx(0.001 + 0.002)


def test_money_in_messages_keeps_small_amounts_true() -> None:
    assert usd(0.000015) == "$0.000015"
    assert usd(0) == "$0"
    assert usd(12.5) == "$12.50"


# -- both stores behave the same ----------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"cvtest-{uuid.uuid4().hex[:12]}"


def _redis_available() -> bool:
    return not nothing_listens(REDIS_URL, 6379)


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest, prefix: str) -> Iterator[str]:
    if request.param == "redis" and not _redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")
    yield request.param


def _make(kind: object, prefix: str) -> Quota:
    if kind == "memory":
        return MemoryQuota()
    # These tests are about the arithmetic, not latency: a loaded CI machine must not
    # turn a slow answer into a (fail-closed) refusal.
    return RedisQuota(REDIS_URL, key_prefix=prefix, timeout_s=5.0)


def test_concurrent_requests_cannot_overshoot_a_budget(store_factory: object, prefix: str) -> None:
    async def scenario() -> tuple[int, int]:
        quota = _make(store_factory, prefix)
        await quota.start()
        ask = Ask(KeyLimits("k"), budget_usd=1.0, worst_case_usd=0.3)
        results = await asyncio.gather(*(quota.admit(ask) for _ in range(64)))
        admitted = [r for r in results if r.allowed]
        # Settle one for less than it reserved: room for exactly one more.
        quota.settle(admitted[0].ticket, cost_usd=0.1, tokens=10)
        if isinstance(quota, RedisQuota):
            await quota.flush()
        again = await quota.admit(ask)
        await quota.aclose()
        return len(admitted), int(again.allowed)

    admitted, again = asyncio.run(scenario())
    assert admitted == 3  # 3 x $0.30 fits in $1, a fourth does not
    assert again == 1  # $0.10 spent + $0.60 reserved + $0.30 = $1.00


def test_a_refused_request_uses_nothing(store_factory: object, prefix: str) -> None:
    async def scenario() -> list[bool]:
        quota = _make(store_factory, prefix)
        await quota.start()
        limits = KeyLimits("k", rpm=2)
        out = [(await quota.admit(Ask(limits, budget_usd=0.0))).allowed]  # budget refuses
        out += [(await quota.admit(Ask(limits, None))).allowed for _ in range(3)]
        await quota.aclose()
        return out

    # The budget refusal did not use one of the two requests per minute.
    assert asyncio.run(scenario()) == [False, True, True, False]


def test_spend_never_counts_less_than_the_ledger_committed(
    store_factory: object, prefix: str
) -> None:
    async def scenario() -> tuple[bool, bool]:
        quota = _make(store_factory, prefix)
        await quota.start()
        quota.set_committed({"k": 0.9})
        if isinstance(quota, RedisQuota):
            await quota.flush()
        ask = Ask(KeyLimits("k"), budget_usd=1.0, worst_case_usd=0.2)
        first = (await quota.admit(ask)).allowed
        small = (await quota.admit(Ask(KeyLimits("k"), 1.0, 0.05))).allowed
        await quota.aclose()
        return first, small

    assert asyncio.run(scenario()) == (False, True)


# -- Redis: shared, and honest about outages --------------------------------------------


def test_two_replicas_share_one_request_limit(prefix: str) -> None:
    if not _redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")

    async def scenario() -> int:
        a, b = RedisQuota(REDIS_URL, key_prefix=prefix), RedisQuota(REDIS_URL, key_prefix=prefix)
        await a.start()
        await b.start()
        limits = KeyLimits("k", rpm=10)
        results = [await (a if i % 2 else b).admit(Ask(limits, None)) for i in range(30)]
        await a.aclose()
        await b.aclose()
        return sum(r.allowed for r in results)

    assert asyncio.run(scenario()) == 10


def test_settles_survive_a_redis_that_lost_its_scripts_and_apply_once(prefix: str) -> None:
    if not _redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")

    async def scenario() -> int:
        quota = RedisQuota(REDIS_URL, key_prefix=prefix)
        await quota.start()
        ask = Ask(KeyLimits("k"), budget_usd=1.0, worst_case_usd=0.3)
        admitted = await quota.admit(ask)
        await quota.redis.script_flush()  # as after a Redis restart
        quota.settle(admitted.ticket, cost_usd=0.1, tokens=10)
        quota.set_committed({"other": 0.5})  # a second script in the same pipeline
        await quota.flush()
        results = [await quota.admit(ask) for _ in range(4)]
        await quota.aclose()
        return sum(r.allowed for r in results)

    # $0.10 spent once and the $0.30 reservation released: three more $0.30 fit in $1.
    # Applied twice ($0.20), only two would.
    assert asyncio.run(scenario()) == 3


def test_reservations_of_a_dead_replica_expire(prefix: str) -> None:
    if not _redis_available():
        pytest.skip(f"no Redis server at {REDIS_URL}")

    async def scenario() -> tuple[bool, bool]:
        dead = RedisQuota(REDIS_URL, key_prefix=prefix, reservation_ttl_s=0.3)
        await dead.start()
        ask = Ask(KeyLimits("k"), budget_usd=1.0, worst_case_usd=1.0)
        assert (await dead.admit(ask)).allowed  # ...and never settles
        alive = RedisQuota(REDIS_URL, key_prefix=prefix)
        await alive.start()
        blocked = (await alive.admit(ask)).allowed
        # Admitted again once the reservation's TTL has passed in Redis' own clock.
        deadline = time.monotonic() + 10
        while not (later := (await alive.admit(ask)).allowed) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await dead.aclose()
        await alive.aclose()
        return blocked, later

    assert asyncio.run(scenario()) == (False, True)


def test_an_unreachable_redis_denies_or_admits_as_configured() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario(fail_open: bool) -> object:
        quota = RedisQuota(url, timeout_s=0.2, fail_open=fail_open)
        await quota.start()
        try:
            admitted = await quota.admit(Ask(KeyLimits("k", rpm=1), budget_usd=1.0))
            return admitted.fail_open, quota.status.fail_open_admissions
        except ServiceUnavailable as exc:
            return exc
        finally:
            assert not quota.status.reachable and quota.status.last_error
            await quota.aclose()

    refused = asyncio.run(scenario(False))
    assert isinstance(refused, ServiceUnavailable) and refused.status_code == 503
    assert asyncio.run(scenario(True)) == (True, 1)
