"""What a request costs, checked against numbers computed here from the price table and
the token counts the upstream reported, never against another figure the gateway made.

The end-to-end tests run a real daemon in front of an OpenAI-compatible upstream on
loopback that reports ``prompt_tokens_details.cached_tokens``, and call it with the
official client; the unit tests pin the boundaries (the cached-token clamp, a budget
spent to the cent, a zero budget) that a plausible one-character bug would move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from daemon.budget import SpendBook, judge, usd, worst_case_cost, worst_case_tokens
from daemon.limits import KeyLimits
from daemon.pricing import Price, cost_usd
from daemon.quota import Ask, MemoryQuota
from daemon.usage import TokenCounts
from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    Daemon,
    ServerThread,
    base_config,
    client_for,
    expected_cost,
    ledger_rows,
    running,
    wait_for,
)

# USD per million tokens, as an operator writes them in config.yaml.
INPUT, CACHED, OUTPUT = 2.50, 1.25, 10.00
PRICED = {
    "input_per_million": INPUT,
    "cached_input_per_million": CACHED,
    "output_per_million": OUTPUT,
}
NO_CACHE_PRICE = {"input_per_million": 3.00, "output_per_million": 15.00}


# -- end to end: a real daemon, a real upstream, the official client ---------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Upstream]]:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as upstream:
        config = base_config()
        config["models"] = [
            {
                "name": name,
                "provider": "openai",
                "model": "up-model",
                "api_base": upstream.url + "/v1",
                "pricing": prices,
            }
            for name, prices in (("priced", PRICED), ("no-cache-price", NO_CACHE_PRICE))
        ]
        with running(tmp_path_factory.mktemp("money"), config) as daemon:
            yield daemon, state


def one_row(daemon: Daemon, request_id: str) -> dict[str, Any]:
    rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "request_id = ?", (request_id,)))
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize(
    ("model", "prices", "prompt", "cached", "completion"),
    [
        ("priced", PRICED, 1000, 600, 50),
        ("priced", PRICED, 1000, 0, 50),
        # An upstream claiming more cached tokens than the prompt had: billed as all cached.
        ("priced", PRICED, 1000, 5000, 50),
        # No cached price configured: cached tokens cost the input price.
        ("no-cache-price", NO_CACHE_PRICE, 1000, 600, 50),
    ],
)
def test_a_reply_with_cached_tokens_is_billed_at_the_cached_price(
    gateway: tuple[Daemon, Upstream],
    model: str,
    prices: dict[str, float],
    prompt: int,
    cached: int,
    completion: int,
) -> None:
    daemon, state = gateway
    state.usage, state.cached_tokens = (prompt, completion), cached
    raw = client_for(daemon.url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "the same long system prompt"}]
    )
    completion_obj = raw.parse()
    # The client sees the upstream's usage unchanged.
    assert completion_obj.usage is not None
    assert completion_obj.usage.prompt_tokens_details is not None
    assert completion_obj.usage.prompt_tokens_details.cached_tokens == cached
    row = one_row(daemon, raw.headers["x-request-id"])
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (
        prompt,
        cached,
        completion,
    )
    assert row["cost_usd"] == pytest.approx(
        expected_cost(prices, prompt, cached, completion), rel=1e-9
    )


def test_a_stream_with_cached_tokens_is_billed_at_the_cached_price(
    gateway: tuple[Daemon, Upstream],
) -> None:
    daemon, state = gateway
    state.usage, state.cached_tokens = (2048, 30), 1024
    stream = client_for(daemon.url).chat.completions.with_raw_response.create(
        model="priced",
        messages=[{"role": "user", "content": "stream it"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream.parse())
    final = chunks[-1].usage
    assert final is not None and final.prompt_tokens_details is not None
    assert final.prompt_tokens_details.cached_tokens == 1024
    row = one_row(daemon, stream.headers["x-request-id"])
    assert row["stream"] == 1 and row["cached_tokens"] == 1024
    assert row["cost_usd"] == pytest.approx(expected_cost(PRICED, 2048, 1024, 30), rel=1e-9)


# -- the arithmetic's edges -------------------------------------------------------------


def test_cached_tokens_are_clamped_to_the_prompt() -> None:
    price = Price(input=3e-6, output=15e-6, cached_input=0.3e-6)
    # More cached than input: an upstream's bookkeeping error must not make a bill negative
    # (uncapped, 10 input - 50 cached would credit 40 tokens at the input price).
    assert cost_usd(TokenCounts(input=10, output=2, cached=50), price) == pytest.approx(
        10 * 0.3e-6 + 2 * 15e-6, rel=1e-12
    )
    assert cost_usd(TokenCounts(input=10, output=2, cached=4), price) == pytest.approx(
        6 * 3e-6 + 4 * 0.3e-6 + 2 * 15e-6, rel=1e-12
    )
    # No cached price: cached tokens are plain input tokens.
    plain = Price(input=3e-6, output=15e-6)
    assert cost_usd(TokenCounts(input=10, output=2, cached=4), plain) == pytest.approx(
        10 * 3e-6 + 2 * 15e-6, rel=1e-12
    )


def test_usage_reads_cached_and_reasoning_tokens_and_ignores_bogus_counts() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 32},
    }
    assert TokenCounts.from_openai(usage) == TokenCounts(100, 40, 64, 32)
    assert TokenCounts.from_openai(usage).total == 140
    bogus = {
        "prompt_tokens": -5,
        "completion_tokens": True,
        "prompt_tokens_details": None,
        "completion_tokens_details": "x",
    }
    assert TokenCounts.from_openai(bogus) == TokenCounts()
    assert TokenCounts.from_openai({"prompt_tokens": 10**15}).input == 10**12
    assert TokenCounts.from_openai("not a dict") == TokenCounts()


def test_a_budget_spent_to_the_cent_refuses_the_next_request() -> None:
    verdict = judge(budget=1.0, spent=1.0, reserved=0.0, amount=0.0)
    assert (verdict.allowed, verdict.exhausted, verdict.remaining_usd) == (False, True, 0.0)
    # A hair under: not exhausted, and a request that fits exactly is admitted.
    verdict = judge(budget=1.0, spent=0.75, reserved=0.0, amount=0.25)
    assert (verdict.allowed, verdict.exhausted) == (True, False)
    assert verdict.remaining_usd == pytest.approx(0.25)
    # One that does not fit is refused, without claiming the budget is gone.
    verdict = judge(budget=1.0, spent=0.75, reserved=0.125, amount=0.25)
    assert (verdict.allowed, verdict.exhausted) == (False, False)
    assert verdict.remaining_usd == pytest.approx(0.125)
    # Reservations can never push the remainder below zero.
    assert judge(budget=1.0, spent=0.5, reserved=2.0, amount=0.0).remaining_usd == 0.0


def test_a_zero_budget_admits_nothing_not_even_a_free_request() -> None:
    verdict = judge(budget=0.0, spent=0.0, reserved=0.0, amount=0.0)
    assert (verdict.allowed, verdict.exhausted) == (False, True)


def test_the_spend_book_refuses_at_the_boundary_and_settles_to_the_real_cost() -> None:
    asyncio.run(_spend_book_boundary())


async def _spend_book_boundary() -> None:
    quota = MemoryQuota(clock=lambda: 0.0)
    limits = KeyLimits("k")
    first = await quota.admit(Ask(limits, budget_usd=0.01, worst_case_usd=0.004))
    assert first.allowed
    quota.settle(first.ticket, cost_usd=0.01, tokens=0)  # the real cost used it all
    assert quota.book.spent("k") == pytest.approx(0.01) and quota.book.reserved("k") == 0.0
    refused = await quota.admit(Ask(limits, budget_usd=0.01, worst_case_usd=0.0))
    assert not refused.allowed and refused.budget is not None and refused.budget.exhausted
    # A zero budget refuses even a request that reserves nothing.
    other = await quota.admit(Ask(KeyLimits("zero"), budget_usd=0.0, worst_case_usd=0.0))
    assert not other.allowed


def test_reservations_add_up_and_a_revoked_key_releases_them() -> None:
    book = SpendBook()
    _, a = book.reserve("k", 1.0, 0.25)
    _, b = book.reserve("k", 1.0, 0.5)
    assert book.reserved("k") == pytest.approx(0.75)
    verdict, none = book.reserve("k", 1.0, 0.5)  # 0.25 left
    assert not verdict.allowed and none is None and book.reserved("k") == pytest.approx(0.75)
    book.settle("k", a, 0.1)
    assert book.reserved("k") == pytest.approx(0.5) and book.spent("k") == pytest.approx(0.1)
    book.release_key("k")
    assert book.reserved("k") == 0.0
    book.settle("k", b, 0.2)  # an in-flight request of a revoked key still settles its cost
    assert book.spent("k") == pytest.approx(0.3) and book.reserved("k") == 0.0
    # Committed spend only grows, and counts with what is still pending.
    book.set_committed({"k": 5.0})
    book.set_committed({"k": 4.0})
    assert book.spent("k") == pytest.approx(5.3)


def test_the_worst_case_is_the_prompt_plus_every_choice_at_the_dearest_price() -> None:
    body = {"max_tokens": 100, "n": 3}
    tokens = worst_case_tokens(body, body_bytes=401, operation="chat", default_max_tokens=4096)
    assert (tokens.input, tokens.output) == (101, 300)  # ceil(401 / 4) bytes per token
    assert worst_case_tokens({}, 8, "chat", 4096).output == 4096
    assert worst_case_tokens({"max_completion_tokens": 7}, 8, "chat", 4096).output == 7
    assert worst_case_tokens({"max_tokens": 9}, 8, "embeddings", 4096).output == 0
    cheap, dear = Price(input=1e-6, output=2e-6), Price(input=3e-6, output=4e-6)
    assert worst_case_cost(tokens, [cheap, dear]) == pytest.approx(101 * 3e-6 + 300 * 4e-6)
    assert worst_case_cost(tokens, []) == 0.0


def test_money_in_messages_keeps_its_small_digits() -> None:
    assert usd(0) == "$0"
    assert usd(0.000015) == "$0.000015"
    assert usd(1234.5) == "$1,234.50"
    assert usd(1) == "$1.00"
