"""The money and admission arithmetic pinned value by value: rate-limit buckets, key
records, price lookup, token bounds, admission tickets. Written against the mutants
that survived the suite (docs/testing.md): each assertion is one that a plausible
one-token bug would break. No I/O, no clock: these run in milliseconds, which is what
lets ``make mutate`` run them for every mutant."""

from __future__ import annotations

import asyncio
import hashlib
import re

import pytest

from daemon.auth import Principal
from daemon.budget import SpendBook, judge, usd, worst_case_cost, worst_case_tokens
from daemon.config import ModelConfig
from daemon.keys import (
    KEY_PREFIX,
    create_key,
    display_prefix,
    hash_key,
    new_key,
    new_key_id,
    validate_new_key,
)
from daemon.limits import (
    MINUTE,
    KeyLimits,
    admit_while_under,
    decide,
    format_duration,
    take,
)
from daemon.pricing import Price, needs_cost_map, price_for
from daemon.quota import Ask, MemoryQuota, Ticket
from daemon.usage import TokenCounts

# -- rate limits ----------------------------------------------------------------------------


def test_take_reports_the_bucket_exactly_when_admitting_and_refusing() -> None:
    # 6 per minute: one unit per 10 s; now = 100 (a clock far from zero catches now's sign).
    first = take(0.0, 100.0, 6)
    assert first.allowed and first.tat == 110.0
    assert first.remaining == pytest.approx(5.0) and first.reset_s == pytest.approx(10.0)
    tat = first.tat
    for _ in range(5):
        tat = take(tat, 100.0, 6).tat
    assert tat == pytest.approx(160.0)  # exactly full: the sixth fitted (<= the period)
    refused = take(tat, 100.0, 6)
    assert not refused.allowed and refused.tat == tat
    assert refused.remaining == 0.0 and refused.reset_s == pytest.approx(60.0)
    assert refused.retry_after_s == pytest.approx(10.0)
    # Half a minute later three units are back.
    later = take(tat, 130.0, 6, amount=4)
    assert not later.allowed and later.remaining == pytest.approx(3.0)
    assert later.reset_s == pytest.approx(30.0) and later.retry_after_s == pytest.approx(10.0)


def test_admit_while_under_charges_nothing_and_refuses_only_when_no_unit_is_left() -> None:
    check = admit_while_under(130.0, 100.0, 6)  # 30 s of 60 used: 3 units left
    assert check.allowed and check.tat == 130.0
    assert check.remaining == pytest.approx(3.0) and check.reset_s == pytest.approx(30.0)
    exactly = admit_while_under(150.0, 100.0, 6)  # one unit (10 s) left: still admitted
    assert exactly.allowed and exactly.remaining == pytest.approx(1.0)
    full = admit_while_under(160.0, 100.0, 6)
    assert full.allowed is False and full.tat == 160.0 and full.remaining == 0.0
    assert full.reset_s == pytest.approx(60.0) and full.retry_after_s == pytest.approx(10.0)


def test_decide_reports_both_limits_headers_and_keeps_state_when_refusing() -> None:
    limits = KeyLimits("k", rpm=2, tpm=100)
    decision, tat = decide(limits, 0.0, 0.0, 1000.0)
    assert decision.allowed and decision.retry_after_s == 0.0 and decision.limit_type is None
    assert tat == pytest.approx(1030.0)
    headers = dict(decision.headers)
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "0ms",
    }
    decision, tat2 = decide(limits, 1060.0, 0.0, 1000.0)
    assert not decision.allowed and decision.limit_type == "requests" and tat2 == 1060.0
    # Only a token limit: the request bucket is left as it was.
    decision, tat3 = decide(KeyLimits("k", tpm=100), 5.0, 0.0, 1000.0)
    assert decision.allowed and tat3 == 5.0
    assert [h for h, _ in decision.headers] == [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ]


def test_durations_in_openais_format() -> None:
    assert format_duration(0.0) == "0ms"
    assert format_duration(-0.5) == "0ms"
    assert format_duration(0.02) == "20ms"
    assert format_duration(1.0) == "1s"
    assert format_duration(59.2) == "1m0s"
    assert format_duration(360.0) == "6m0s"
    assert MINUTE == 60.0


# -- keys -------------------------------------------------------------------------------------


def test_keys_have_their_documented_shape_and_hash() -> None:
    key = new_key()
    assert key.startswith(KEY_PREFIX) and re.fullmatch(r"cv-[A-Za-z0-9_-]{43}", key)
    assert re.fullmatch(r"key_[0-9a-f]{16}", new_key_id())
    assert hash_key("cv-abc") == hashlib.sha256(b"cv-abc").hexdigest()
    assert hash_key("cv-\udcff") == hashlib.sha256(b"cv-\xff").hexdigest()  # surrogateescape
    assert display_prefix("cv-abcdefghij") == "cv-abcd…"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "  "}, "--name must not be empty"),
        ({"user_type": "root"}, "--user-type must be one of "),
        ({"rpm": 0}, "--rpm must be a positive number"),
        ({"tpm": 0}, "--tpm must be a positive number"),
        ({"tpm": -1}, "--tpm must be a positive number"),
        ({"budget_usd": -0.01}, "--budget-usd must not be negative"),
    ],
)
def test_new_keys_are_validated_with_the_flag_named(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "name": "app",
        "user_type": "standard",
        "rpm": None,
        "tpm": None,
        "budget_usd": None,
    } | kwargs
    with pytest.raises(ValueError) as raised:
        validate_new_key(**args)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)
    with pytest.raises(ValueError, match=re.escape(message)):
        create_key(now=1.0, **args)  # type: ignore[arg-type]
    if "user_type" in kwargs:
        assert str(raised.value).endswith("standard, service, admin")


def test_a_created_key_records_everything_it_was_given() -> None:
    made = create_key(
        name=" app ",
        user_type="service",
        rpm=1,
        tpm=2,
        budget_usd=0.0,
        models=("m",),
        now=42.0,
    )
    r = made.record
    assert (r.name, r.user_type, r.rpm, r.tpm, r.budget_usd, r.models, r.created_at) == (
        "app",
        "service",
        1,
        2,
        0.0,
        ("m",),
        42.0,
    )
    assert r.key_hash == hash_key(made.secret) and r.prefix == display_prefix(made.secret)
    assert r.active and r.revoked_at is None and r.id.startswith("key_")
    principal = Principal.from_record(r)
    assert (principal.key_id, principal.name, principal.user_type) == (r.id, "app", "service")
    assert principal.limits == KeyLimits(r.id, 1, 2)  # buckets are per key id
    assert principal.budget_usd == 0.0 and principal.models == frozenset({"m"})
    assert made.secret not in repr(made)


# -- prices -------------------------------------------------------------------------------------


def hosted(model: str, provider: str = "openai") -> ModelConfig:
    return ModelConfig(name="h", provider=provider, model=model, api_base="http://x")


def test_the_cost_map_is_searched_by_name_provider_and_name_after_a_routing_prefix() -> None:
    entry = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    assert price_for(hosted("gpt-x"), {"openai/gpt-x": entry}).input == 1e-6
    # "proxy/vendor/gpt-x": only the first segment is a routing prefix.
    found = price_for(hosted("proxy/vendor/gpt-x"), {"vendor/gpt-x": entry})
    assert (found.input, found.output, found.source) == (1e-6, 2e-6, "litellm")
    assert price_for(hosted("proxy/gpt-x"), {"gpt-x": entry}).source == "litellm"
    assert price_for(hosted("proxy/vendor/gpt-x"), {"gpt-x": entry}).source == "unknown"


def test_cost_map_prices_tolerate_missing_and_malformed_values() -> None:
    entry = {
        "input_cost_per_token": None,
        "output_cost_per_token": 3e-6,
        "cache_read_input_token_cost": 1,  # an int is a price too
    }
    price = price_for(hosted("m"), {"m": entry})
    assert (price.input, price.output, price.cached_input) == (0.0, 3e-6, 1.0)
    assert isinstance(price.cached_input, float)
    odd = price_for(hosted("m"), {"m": {"cache_read_input_token_cost": "0.1"}})
    assert odd.cached_input is None
    assert price_for(hosted("m"), {"m": "not an entry"}).source == "unknown"
    input_only = price_for(hosted("m"), {"m": {"input_cost_per_token": 1e-6}})
    assert (input_only.input, input_only.output, input_only.cached_input) == (1e-6, 0.0, None)


def test_only_hosted_models_without_a_configured_price_need_the_cost_map() -> None:
    priced = {"input_per_million": 1.0, "output_per_million": 1.0}
    assert needs_cost_map(hosted("m"))
    assert not needs_cost_map(hosted("m").model_copy(update={"pricing": priced}))
    assert not needs_cost_map(ModelConfig(name="mock", provider="mock"))
    assert not needs_cost_map(hosted("llama3", provider="ollama"))


def test_configured_prices_are_per_million() -> None:
    model = ModelConfig(
        name="m",
        provider="openai",
        model="m",
        api_base="http://x",
        pricing={"input_per_million": 2.0, "output_per_million": 8.0},
    )
    assert price_for(model, {}) == Price(input=2e-6, output=8e-6, cached_input=None)


# -- token counts ---------------------------------------------------------------------------------


def test_token_counts_are_bounded_and_only_positive_integers_count() -> None:
    assert TokenCounts.from_openai({"prompt_tokens": 10**12}).input == 10**12
    assert TokenCounts.from_openai({"prompt_tokens": 10**12 + 1}).input == 10**12
    assert TokenCounts.from_openai({"prompt_tokens": 1, "completion_tokens": 0}) == TokenCounts(1)
    assert TokenCounts.from_openai({"prompt_tokens": 2.5}).input == 0
    details = {
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert TokenCounts.from_openai(details) == TokenCounts(cached=3, reasoning=4)
    odd = {"prompt_tokens_details": [3], "completion_tokens_details": {"reasoning_tokens": 0}}
    assert TokenCounts.from_openai(odd) == TokenCounts()


# -- admission ----------------------------------------------------------------------------------


def test_tickets_name_the_key_and_its_token_limit_whatever_the_verdict() -> None:
    async def scenario() -> None:
        quota = MemoryQuota(clock=lambda: 1000.0)
        limits = KeyLimits("k", rpm=1, tpm=50)
        ok = await quota.admit(Ask(limits, budget_usd=1.0, worst_case_usd=0.5))
        assert ok.allowed and ok.budget is not None and ok.budget.remaining_usd == 1.0
        assert (ok.ticket.key_id, ok.ticket.tpm) == ("k", 50)
        rate_refused = await quota.admit(Ask(limits, budget_usd=1.0, worst_case_usd=0.5))
        assert not rate_refused.allowed and rate_refused.budget is None
        assert rate_refused.ticket == Ticket("k", 50)
        poor = await quota.admit(Ask(KeyLimits("p", tpm=50), budget_usd=0.1, worst_case_usd=0.5))
        assert not poor.allowed and poor.ticket == Ticket("p", 50)
        assert quota.book.reserved("p") == 0.0
        # Tokens are charged after the fact: 50 of 50 leaves nothing for a while.
        quota.settle(ok.ticket, cost_usd=0.2, tokens=50)
        assert quota.book.spent("k") == pytest.approx(0.2) and quota.book.reserved("k") == 0.0
        after = await quota.admit(Ask(KeyLimits("k", tpm=50), budget_usd=None))
        assert not after.allowed and after.decision.limit_type == "tokens"
        # A fresh key's token bucket starts empty (not one unit in).
        fresh = await quota.admit(Ask(KeyLimits("f", tpm=1), budget_usd=None))
        assert fresh.allowed
        quota.settle(Ticket("f", 1), cost_usd=0.0, tokens=1)
        assert not (await quota.admit(Ask(KeyLimits("f", tpm=1), budget_usd=None))).allowed
        quota.settle(Ticket("z", 1), cost_usd=0.0, tokens=0)  # nothing to charge
        assert (await quota.admit(Ask(KeyLimits("z", tpm=1), budget_usd=None))).allowed
        # A store-specific handle that is not this store's: settled as no reservation.
        quota.settle(Ticket("k", None, reservation="elsewhere"), cost_usd=0.1, tokens=0)
        assert quota.book.spent("k") == pytest.approx(0.3)

    asyncio.run(scenario())


def test_token_buckets_start_empty_and_fill_by_exactly_the_tokens_used() -> None:
    """From a monotonic clock's zero: an untouched bucket holds nothing."""

    async def scenario() -> None:
        now = [0.0]
        quota = MemoryQuota(clock=lambda: now[0])
        assert (await quota.admit(Ask(KeyLimits("k", tpm=1), budget_usd=None))).allowed
        quota.settle(Ticket("t", 60), cost_usd=0.0, tokens=60)  # a minute's worth
        now[0] = 1.0  # one token has flowed back: just enough for the next request
        assert (await quota.admit(Ask(KeyLimits("t", tpm=60), budget_usd=None))).allowed

    asyncio.run(scenario())


def test_the_memory_store_names_itself_for_health() -> None:
    status = MemoryQuota().status
    assert (status.backend, status.reachable, status.fail_open_admissions) == ("memory", True, 0)


def test_a_revoked_keys_reservations_go_and_no_one_elses() -> None:
    async def scenario() -> None:
        quota = MemoryQuota()
        for key in ("gone", "kept"):
            await quota.admit(Ask(KeyLimits(key), budget_usd=1.0, worst_case_usd=0.4))
        quota.release_key("gone")
        assert quota.book.reserved("gone") == 0.0
        assert quota.book.reserved("kept") == pytest.approx(0.4)

    asyncio.run(scenario())


def test_reservation_handles_are_distinct_and_settle_only_their_own_amount() -> None:
    book = SpendBook()
    handles = [book.reserve("k", 10.0, amount)[1] for amount in (1.0, 2.0, 3.0)]
    assert len(set(handles)) == 3 and None not in handles
    book.settle("k", handles[1], 0.0)
    assert book.reserved("k") == pytest.approx(4.0)
    book.release_key("other")
    assert book.reserved("k") == pytest.approx(4.0)
    book.settle("k", handles[0], 0.0)  # another key's release left this handle alone
    assert book.reserved("k") == pytest.approx(3.0)
    book.release_key("k")
    book.settle("k", handles[2], 0.5)
    assert book.reserved("k") == 0.0 and book.spent("k") == pytest.approx(0.5)


def test_settling_reservations_of_a_free_model_leaves_nothing_reserved() -> None:
    """A model without a price reserves 0. Two such requests of one key in flight, both
    settled: nothing stays reserved or spent, and the whole budget is still there (the
    first settle already removed the key's entry; the second must not bring one back)."""
    book = SpendBook()
    handles = [book.reserve("k", 1.0, 0.0)[1] for _ in range(2)]
    for handle in handles:
        book.settle("k", handle, 0.0)
    assert book.reserved("k") == 0.0 and book.spent("k") == 0.0
    verdict, _ = book.reserve("k", 1.0, 1.0)
    assert verdict.allowed


def test_budget_arithmetic_at_its_edges() -> None:
    assert judge(1.0, 0.5, 0.0, 0.6).exhausted is False
    assert (
        worst_case_tokens({"max_completion_tokens": 3, "max_tokens": 9}, 0, "chat", 99).output == 3
    )
    assert worst_case_cost(TokenCounts(input=1), []) == 0.0
    assert usd(1) == "$1.00" and usd(0.999) == "$0.999" and usd(2) == "$2.00"
    assert usd(0.5) == "$0.5" and usd(0.1) == "$0.1" and usd(1e-10) == "$0.0000000001"
    assert usd(1e-12) == "$0"  # below the digits shown: no dangling point
