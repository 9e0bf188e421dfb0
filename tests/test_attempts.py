"""The routing retry rules (daemon/attempts.py, docs/routing.md) in process: a real
Router, Availability and Metrics around ``UpstreamCaller``; only the upstream is
scripted, and the waits go to an injected sleep instead of the clock."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from daemon.attempts import RetryPolicy, UpstreamCaller, retry_after_s
from daemon.availability import Availability
from daemon.config import ModelConfig, TracingConfig
from daemon.deployment import Deployment
from daemon.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.metrics import MetricsCollector
from daemon.pricing import Price
from daemon.providers.base import ProbeResult, Provider, Reply, UpstreamCall
from daemon.router import Router
from daemon.tracing import AnyTracing, NullTracing, Tracing
from daemon.usage import TokenCounts, Usage

HANG = "hang"  # a scripted outcome: the upstream never answers
Outcome = GatewayError | Reply | BaseException | str


def reply(text: str = "hi", tokens: TokenCounts | None = None) -> Reply:
    return Reply(
        body=f'{{"text": "{text}"}}'.encode(),
        tokens=tokens or TokenCounts(input=3, output=5, cached=1, reasoning=2),
        response_model=f"resp-{text}",
        response_id=f"id-{text}",
        finish_reasons=("stop",),
    )


def status_error(status: int, headers: dict[str, str] | None = None) -> UpstreamError:
    error = UpstreamError(f"upstream said {status}", headers=headers)
    error.upstream_status = status
    return error


@dataclass
class Seen:
    """What the upstream saw of one attempt, and the gateway's state while it ran."""

    index: int
    method: str
    model: str
    timeout_s: float | None
    within_deadline: bool
    headers: dict[str, str]
    in_flight: int
    admits_another: bool


@dataclass
class Rig:
    deployments: list[Deployment]
    availability: Availability
    router: Router
    registry: CollectorRegistry
    caller: UpstreamCaller
    now: list[float]
    seen: list[Seen] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    rands: list[float] = field(default_factory=list)
    called: asyncio.Event | None = None

    @property
    def called_indexes(self) -> list[int]:
        return [s.index for s in self.seen]

    def in_flight(self, i: int) -> int:
        d = self.deployments[i]
        balancer = self.router.balancers[d.name]
        return balancer.in_flight[balancer.position[d.index]]

    def attempts(self, model: str, i: int, outcome: str) -> float:
        labels = {"model": model, "deployment": f"models[{i}]", "outcome": outcome}
        return self.registry.get_sample_value("chatvault_routing_attempts_total", labels) or 0.0

    def fallbacks(self) -> dict[tuple[str, str, str], float]:
        return {
            (s.labels["from_model"], s.labels["to_model"], s.labels["reason"]): s.value
            for m in self.registry.collect()
            if m.name == "chatvault_fallbacks"
            for s in m.samples
            if s.name == "chatvault_fallbacks_total"
        }

    def open_circuit(self, i: int) -> None:
        """Fail a deployment until its circuit opens, at the rig's current time."""
        d = self.deployments[i]
        while self.availability.admits(d) and self.availability.circuits[d.index].state == "closed":
            self.availability.report_failure(d, "upstream_unreachable")


class ScriptedUpstream:
    """One deployment's upstream: each call gets the next scripted outcome."""

    name = "scripted"
    server_address: str | None = None
    server_port: int | None = None

    def __init__(self, rig: Callable[[], Rig], index: int, outcomes: list[Outcome]) -> None:
        self.rig = rig
        self.index = index
        self.outcomes = list(outcomes)

    async def _answer(self, method: str, call: UpstreamCall) -> Reply:
        rig = self.rig()
        d = rig.deployments[self.index]
        rig.seen.append(
            Seen(
                self.index,
                method,
                call.body["model"],
                call.timeout_s,
                call.within_deadline,
                dict(call.headers),
                rig.in_flight(self.index),
                rig.availability.admits(d),
            )
        )
        if rig.called is not None:
            rig.called.set()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Reply):
            return outcome
        if isinstance(outcome, BaseException):
            raise outcome
        await asyncio.Event().wait()  # HANG: until cancelled
        raise AssertionError("unreachable")

    async def complete(self, call: UpstreamCall) -> Reply:
        return await self._answer("complete", call)

    async def embed(self, call: UpstreamCall) -> Reply:
        return await self._answer("embed", call)

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        answer = await self._answer("open_stream", call)

        async def events() -> AsyncIterator[list[bytes]]:
            yield [answer.body]

        return events()

    async def probe(self, timeout_s: float) -> ProbeResult:
        return ProbeResult(ok=True, latency_s=0.0)


def make_rig(
    models: list[tuple[str, list[Outcome]]],
    *,
    fallbacks: dict[str, list[str]] | None = None,
    retries: int = 1,
    backoff_s: float = 0.1,
    deadline_s: float = 120.0,
    default_timeout_s: float = 120.0,
    timeout_s: float | None = None,
    rands: tuple[float, ...] = (),
    threshold: int = 5,
    cooldown_s: float = 30.0,
    tracing: AnyTracing | None = None,
) -> Rig:
    """Deployments ``models[i]`` named by ``models``; provider ``mock`` for even indexes,
    ``anthropic`` for odd ones; upstream model ``{name}-up{i}``."""
    holder: list[Rig] = []
    deployments = [
        Deployment(
            i,
            ModelConfig(
                name=name,
                provider="mock" if i % 2 == 0 else "anthropic",
                model=f"{name}-up{i}",
                timeout_s=timeout_s,
            ),
            ScriptedUpstream(lambda: holder[0], i, outcomes),
            Price(),
        )
        for i, (name, outcomes) in enumerate(models)
    ]
    now = [1000.0]
    availability = Availability(
        deployments, failure_threshold=threshold, cooldown_s=cooldown_s, clock=lambda: now[0]
    )
    router = Router(deployments, availability.is_up, fallbacks=fallbacks)
    registry = CollectorRegistry()
    sleeps: list[float] = []
    rand_values = list(rands)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    caller = UpstreamCaller(
        availability,
        router,
        tracing or NullTracing(),
        MetricsCollector(registry),
        policy=RetryPolicy(
            retries=retries,
            backoff_s=backoff_s,
            deadline_s=deadline_s,
            default_timeout_s=default_timeout_s,
        ),
        rand=lambda: rand_values.pop(0),
        sleep=sleep,
    )
    rig = Rig(deployments, availability, router, registry, caller, now, sleeps=sleeps)
    rig.rands = rand_values
    holder.append(rig)
    return rig


def new_usage(model: str, operation: str = "chat", *, perf_start: float | None = None) -> Usage:
    return Usage(
        request_id="r1",
        started_at=0.0,
        key_id="k1",
        user_type="user",
        operation=operation,
        model=model,
        perf_start=time.perf_counter() if perf_start is None else perf_start,
    )


def new_call(model: str, operation: str = "chat") -> UpstreamCall:
    return UpstreamCall(operation, {"model": model, "messages": [{"role": "user", "content": "x"}]})


def complete(
    rig: Rig, model: str, *, usage: Usage | None = None, call: UpstreamCall | None = None
) -> tuple[Reply, Usage, UpstreamCall]:
    usage = usage or new_usage(model)
    call = call or new_call(model)
    result = asyncio.run(rig.caller.complete(rig.router.plan(model), call, usage))
    return result, usage, call


def failing(
    rig: Rig, model: str, *, usage: Usage | None = None
) -> tuple[BaseException, Usage, UpstreamCall]:
    usage = usage or new_usage(model)
    call = new_call(model)
    with pytest.raises(BaseException) as caught:
        asyncio.run(rig.caller.complete(rig.router.plan(model), call, usage))
    return caught.value, usage, call


def wait(n: int, base_s: float, r: float) -> float:
    """The documented backoff before the n-th retry of one deployment."""
    return base_s * 2.0 ** (n - 1) * (0.5 + r / 2)


# -- an answer ---------------------------------------------------------------------------


def test_an_answer_fills_usage_from_the_deployment_that_gave_it() -> None:
    answer = reply("a", TokenCounts(input=7, output=11, cached=2, reasoning=4))
    rig = make_rig([("m", [answer]), ("m", [])], timeout_s=33.0)
    started = time.perf_counter()
    got, usage, call = complete(rig, "m")
    took = time.perf_counter() - started
    assert got is answer
    assert rig.called_indexes == [0] and rig.seen[0].method == "complete"
    assert usage.attempts == 1
    assert (usage.served_model, usage.deployment) == ("m", "models[0]")
    assert (usage.provider, usage.upstream_model, usage.deployment_index) == ("mock", "m-up0", 0)
    assert usage.tokens == TokenCounts(input=7, output=11, cached=2, reasoning=4)
    assert (usage.response_model, usage.response_id) == ("resp-a", "id-a")
    assert usage.finish_reasons == ("stop",)
    assert usage.output_body is None  # content capture is off
    assert call.body["model"] == "m-up0" and call.timeout_s == 33.0
    assert rig.seen[0].model == "m-up0" and rig.seen[0].timeout_s == 33.0
    assert usage.upstream_latency_s is not None and 0 <= usage.upstream_latency_s <= took
    assert usage.perf_start <= usage.attempt_started <= time.perf_counter()
    # Still in flight while the request is answered: the routing sink releases it.
    assert usage.in_flight is rig.deployments[0]
    assert rig.seen[0].in_flight == 1 and rig.in_flight(0) == 1 and rig.in_flight(1) == 0
    assert rig.attempts("m", 0, "success") == 1 and rig.fallbacks() == {}
    assert rig.sleeps == []


def test_a_second_deployment_answers_after_a_retryable_failure() -> None:
    rig = make_rig([("m", [UpstreamUnavailable("refused")]), ("m", [reply("b")])])
    got, usage, call = complete(rig, "m")
    assert got.response_id == "id-b"
    assert rig.called_indexes == [0, 1] and rig.sleeps == []  # another deployment: no wait
    assert [s.model for s in rig.seen] == ["m-up0", "m-up1"]
    assert usage.attempts == 2
    assert (usage.served_model, usage.deployment, usage.deployment_index) == ("m", "models[1]", 1)
    assert (usage.provider, usage.upstream_model) == ("anthropic", "m-up1")
    assert call.body["model"] == "m-up1" and usage.in_flight is rig.deployments[1]
    assert rig.in_flight(0) == 0 and rig.in_flight(1) == 1
    assert rig.attempts("m", 0, "upstream_unreachable") == 1
    assert rig.attempts("m", 1, "success") == 1
    assert rig.attempts("m", 0, "success") == 0


# -- each failure kind's rule ------------------------------------------------------------

RETRYABLE: list[tuple[Callable[[], GatewayError], str]] = [
    (lambda: UpstreamUnavailable("refused"), "upstream_unreachable"),
    (lambda: UpstreamConnectTimeout("no connection"), "upstream_connect_timeout"),
    (lambda: UpstreamFirstByteTimeout("no headers"), "upstream_first_byte_timeout"),
    (lambda: RateLimited("slow down", code="upstream_rate_limited"), "rate_limited"),
    (lambda: status_error(500), "http_500"),
    (lambda: status_error(502), "http_502"),
    (lambda: status_error(503), "http_503"),
    (lambda: status_error(504), "http_504"),
]


@pytest.mark.parametrize(("make_error", "reason"), RETRYABLE)
def test_a_retryable_failure_moves_on_without_waiting(
    make_error: Callable[[], GatewayError], reason: str
) -> None:
    error = make_error()
    rig = make_rig(
        [("m", [error]), ("m", [reply()]), ("b", [])],
        fallbacks={"m": ["b"]},
        threshold=1,
    )
    _, usage, _ = complete(rig, "m")
    assert rig.called_indexes == [0, 1] and rig.sleeps == [] and usage.attempts == 2
    assert rig.attempts("m", 0, error.kind) == 1 and rig.in_flight(0) == 0
    # The circuit hears of upstream failures only: an upstream 429 says nothing of its health.
    assert rig.availability.admits(rig.deployments[0]) is not isinstance(error, UpstreamError)


@pytest.mark.parametrize(("make_error", "reason"), RETRYABLE)
def test_a_retryable_failure_of_the_last_deployment_falls_back_with_its_reason(
    make_error: Callable[[], GatewayError], reason: str
) -> None:
    rig = make_rig([("m", [make_error()]), ("b", [reply()])], fallbacks={"m": ["b"]}, retries=0)
    _, usage, _ = complete(rig, "m")
    assert rig.called_indexes == [0, 1]
    assert rig.fallbacks() == {("m", "b", reason): 1.0}
    assert (usage.served_model, usage.deployment, usage.attempts) == ("b", "models[1]", 2)


NOT_RETRYABLE: list[Callable[[], GatewayError]] = [
    lambda: UpstreamTimeout("started, then too slow"),  # may still be generating, and billing
    lambda: UpstreamError("not JSON"),
    lambda: status_error(400),
    lambda: status_error(401),
    lambda: status_error(404),
    lambda: status_error(429),  # a 429 is retried only as the provider's RateLimited
    lambda: status_error(501),
    lambda: RateLimited("the gateway's own limit"),
    lambda: InvalidRequest("bad field"),
]


@pytest.mark.parametrize("make_error", NOT_RETRYABLE)
def test_a_failure_that_may_have_done_work_is_raised_at_once(
    make_error: Callable[[], GatewayError],
) -> None:
    error = make_error()
    rig = make_rig(
        [("m", [error]), ("m", [reply()]), ("b", [reply()])],
        fallbacks={"m": ["b"]},
        retries=3,
        threshold=1,
    )
    raised, usage, _ = failing(rig, "m")
    assert raised is error
    assert rig.called_indexes == [0] and rig.sleeps == [] and usage.attempts == 1
    assert rig.attempts("m", 0, error.kind) == 1 and rig.fallbacks() == {}
    assert [rig.in_flight(i) for i in range(3)] == [0, 0, 0]
    assert rig.availability.admits(rig.deployments[0]) is not isinstance(error, UpstreamError)
    assert usage.served_model == ""
    assert usage.upstream_latency_s is not None and 0 <= usage.upstream_latency_s < 5.0


# -- retrying one deployment -----------------------------------------------------------


def test_retrying_the_same_deployment_waits_an_exponential_jittered_backoff() -> None:
    rands = (0.1, 0.6, 0.95)
    rig = make_rig(
        [
            (
                "m",
                [UpstreamUnavailable("x"), status_error(503), UpstreamConnectTimeout("x"), reply()],
            )
        ],
        retries=3,
        backoff_s=0.2,
        rands=rands,
    )
    _, usage, _ = complete(rig, "m")
    assert rig.called_indexes == [0, 0, 0, 0] and usage.attempts == 4
    assert rig.sleeps == pytest.approx([wait(n, 0.2, r) for n, r in enumerate(rands, 1)])
    assert rig.rands == []  # one random draw per wait
    assert rig.attempts("m", 0, "success") == 1
    assert rig.attempts("m", 0, "upstream_error") == 1  # the 503 is an UpstreamError


def test_an_upstream_retry_after_wins_when_longer() -> None:
    rands = (0.5, 0.5, 0.5)
    rig = make_rig(
        [
            (
                "m",
                [
                    RateLimited("x", code="upstream_rate_limited", headers={"Retry-After": "3"}),
                    status_error(503, {"retry-after": "2.5"}),  # the header's case varies
                    status_error(503, {"Retry-After": "0.01"}),  # shorter: the backoff wins
                    reply(),
                ],
            )
        ],
        retries=3,
        backoff_s=0.1,
        rands=rands,
    )
    complete(rig, "m")
    assert rig.sleeps == pytest.approx([3.0, 2.5, wait(3, 0.1, 0.5)])


def test_a_retry_after_that_is_not_a_delay_is_ignored() -> None:
    assert retry_after_s(UpstreamError("x", headers={"Retry-After": "-2"})) == 0.0
    assert retry_after_s(UpstreamError("x", headers={"retry-after": "4"})) == 4.0
    assert retry_after_s(UpstreamError("x", headers={"Retry-After": "", "retry-after": "4"})) == 4.0
    assert retry_after_s(UpstreamError("x")) is None


def test_retries_bound_the_attempts_of_each_model() -> None:
    errors = [UpstreamUnavailable(f"refused {n}") for n in range(5)]
    rig = make_rig([("m", list(errors))], retries=2, backoff_s=0.01, rands=(0.0, 0.0))
    raised, usage, _ = failing(rig, "m")
    assert raised is errors[2]  # the last one
    assert rig.called_indexes == [0, 0, 0] and usage.attempts == 3
    assert rig.sleeps == pytest.approx([wait(1, 0.01, 0.0), wait(2, 0.01, 0.0)])
    assert rig.attempts("m", 0, "upstream_unreachable") == 3 and rig.in_flight(0) == 0


def test_retries_go_round_the_deployments_and_wait_only_on_a_repeat() -> None:
    e = [UpstreamUnavailable(str(n)) for n in range(3)]
    rig = make_rig([("m", [e[0], e[2]]), ("m", [e[1]]), ("m", [reply()])], retries=1)
    raised, usage, _ = failing(rig, "m")
    assert raised is e[1] and rig.called_indexes == [0, 1] and usage.attempts == 2
    assert rig.sleeps == []

    rig = make_rig([("m", [e[0], e[2]]), ("m", [e[1]])], retries=2, rands=(0.5,))
    raised, usage, _ = failing(rig, "m")
    # After the second deployment the first comes round again: not a repeat, no wait.
    assert raised is e[2] and rig.called_indexes == [0, 1, 0] and rig.sleeps == []


def test_no_retries_means_one_attempt_per_model() -> None:
    rig = make_rig(
        [("m", [status_error(502)]), ("m", [reply()]), ("b", [reply("b")])],
        fallbacks={"m": ["b"]},
        retries=0,
    )
    got, usage, _ = complete(rig, "m")
    assert got.response_id == "id-b" and rig.called_indexes == [0, 2] and usage.attempts == 2
    assert rig.fallbacks() == {("m", "b", "http_502"): 1.0}


# -- fallbacks and circuits --------------------------------------------------------------


def test_fallbacks_follow_once_the_model_is_exhausted() -> None:
    rig = make_rig(
        [
            ("m", [UpstreamUnavailable("x")]),
            ("m", [status_error(500)]),
            ("b", [UpstreamFirstByteTimeout("y"), UpstreamFirstByteTimeout("z")]),
            ("c", [reply("c")]),
        ],
        fallbacks={"m": ["b", "c"]},
        retries=1,
        rands=(0.3,),
    )
    got, usage, _ = complete(rig, "m")
    # m: its two deployments once each; b: its one deployment twice, after a wait.
    assert got.response_id == "id-c" and rig.called_indexes == [0, 1, 2, 2, 3]
    assert rig.sleeps == pytest.approx([wait(1, 0.1, 0.3)])
    assert rig.fallbacks() == {
        ("m", "b", "http_500"): 1.0,
        ("b", "c", "upstream_first_byte_timeout"): 1.0,
    }
    assert (usage.served_model, usage.deployment, usage.attempts) == ("c", "models[3]", 5)
    assert (usage.provider, usage.upstream_model) == ("anthropic", "c-up3")
    assert [rig.in_flight(i) for i in range(4)] == [0, 0, 0, 1]
    assert rig.attempts("c", 3, "success") == 1 and rig.attempts("b", 2, "success") == 0


def test_an_open_circuit_is_skipped_and_its_reason_given_per_model() -> None:
    rig = make_rig(
        [("m", [UpstreamUnavailable("x")]), ("b", []), ("c", [reply("c")])],
        fallbacks={"m": ["b", "c"]},
        retries=0,
        threshold=1,
    )
    rig.open_circuit(1)
    got, usage, _ = complete(rig, "m")
    assert got.response_id == "id-c" and rig.called_indexes == [0, 2]
    assert rig.fallbacks() == {
        ("m", "b", "upstream_unreachable"): 1.0,
        ("b", "c", "circuit_open"): 1.0,
    }
    assert usage.attempts == 2


def test_a_skipped_deployment_does_not_break_a_retry_of_the_other() -> None:
    rig = make_rig(
        [("m", []), ("m", [UpstreamUnavailable("x"), reply()])],
        retries=1,
        backoff_s=0.3,
        rands=(0.2,),
    )
    rig.open_circuit(0)
    _, usage, _ = complete(rig, "m")
    # The plan puts the open one last; either way the other is retried, after a wait.
    assert rig.called_indexes == [1, 1] and usage.attempts == 2
    assert rig.sleeps == pytest.approx([wait(1, 0.3, 0.2)])


def test_every_circuit_open_is_a_503_with_the_time_to_the_next_trial() -> None:
    cooldown = 30.0
    rig = make_rig([("m", []), ("m", []), ("b", [])], fallbacks={"m": ["b"]}, threshold=1)
    opened = {0: 1000.0, 1: 1004.0, 2: 1012.5}
    for i, at in opened.items():
        rig.now[0] = at
        rig.open_circuit(i)
    rig.now[0] = 1020.4
    raised, usage, _ = failing(rig, "m")
    assert isinstance(raised, ServiceUnavailable) and raised.code == "circuit_open"
    soonest = min(cooldown - (rig.now[0] - at) for at in opened.values())  # models[0]: 9.6
    assert raised.headers == {"Retry-After": str(math.ceil(soonest))}
    assert raised.message == (
        "Every deployment of m, b is failing (its circuit is open); "
        f"the next trial is in {round(soonest)}s."
    )
    assert rig.seen == [] and usage.attempts == 0
    assert rig.fallbacks() == {("m", "b", "circuit_open"): 1.0}


def test_an_open_circuit_due_a_trial_any_moment_asks_for_one_second() -> None:
    rig = make_rig([("m", [])], threshold=1, cooldown_s=30.0)
    rig.open_circuit(0)
    rig.now[0] += 29.9999  # 0.0001 s to go
    raised, _, _ = failing(rig, "m")
    assert isinstance(raised, ServiceUnavailable) and raised.headers == {"Retry-After": "1"}


def test_a_real_failure_is_told_rather_than_the_open_circuits_after_it() -> None:
    error = UpstreamUnavailable("x")
    rig = make_rig([("m", [error]), ("b", [])], fallbacks={"m": ["b"]}, retries=0, threshold=1)
    rig.open_circuit(1)
    raised, usage, _ = failing(rig, "m")
    assert raised is error and usage.attempts == 1


def test_a_half_open_trial_is_the_only_one_and_closes_the_circuit() -> None:
    rig = make_rig([("m", [reply()])], threshold=1, cooldown_s=30.0)
    rig.open_circuit(0)
    rig.now[0] += 30.0
    complete(rig, "m")
    assert rig.seen[0].admits_another is False  # the trial was in flight
    assert rig.availability.circuits[0].state == "closed"


def test_the_circuit_is_told_the_kind_of_failure() -> None:
    rig = make_rig([("m", [UpstreamConnectTimeout("x")])], threshold=1, cooldown_s=30.0)
    failing(rig, "m")
    problem = rig.availability.problem(rig.deployments[0])
    assert problem == (
        "circuit open: 1 consecutive upstream failures (upstream_connect_timeout); trial in 30s"
    )


def test_a_failed_half_open_trial_opens_the_circuit_again() -> None:
    rig = make_rig([("m", [status_error(503)])], threshold=1, cooldown_s=30.0)
    rig.open_circuit(0)
    rig.now[0] += 30.0
    failing(rig, "m")
    assert not rig.availability.admits(rig.deployments[0])


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    rig = make_rig(
        [("m", [UpstreamUnavailable("x"), reply(), UpstreamUnavailable("y")])],
        threshold=2,
        retries=1,
        rands=(0.0,),
    )
    complete(rig, "m")  # a failure, then a success
    rig.caller.policy = RetryPolicy(retries=0)
    failing(rig, "m")
    # One failure since the success: below the threshold of 2.
    assert rig.availability.admits(rig.deployments[0])


# -- the request's deadline --------------------------------------------------------------


def test_a_backoff_that_would_end_past_the_deadline_is_not_waited() -> None:
    error = status_error(503)
    rig = make_rig([("m", [error, reply()])], backoff_s=10.0, deadline_s=4.0, rands=(0.0,))
    raised, usage, _ = failing(rig, "m")  # the wait, 5 s, would end past the deadline
    assert raised is error and rig.sleeps == [] and usage.attempts == 1


def test_a_retry_after_past_the_deadline_is_not_waited() -> None:
    error = status_error(503, {"Retry-After": "60"})
    rig = make_rig([("m", [error, reply()])], backoff_s=0.01, deadline_s=30.0, rands=(0.0,))
    raised, _, _ = failing(rig, "m")
    assert raised is error and rig.sleeps == []


def test_no_attempt_starts_after_the_deadline() -> None:
    error = UpstreamUnavailable("x")
    rig = make_rig([("m", [error]), ("m", [reply()])], deadline_s=5.0)
    usage = new_usage("m", perf_start=time.perf_counter() - 6.0)  # arrived 6 s ago
    raised, usage, _ = failing(rig, "m", usage=usage)
    # The first attempt is always made; the next would start past the deadline.
    assert raised is error and rig.called_indexes == [0] and usage.attempts == 1


def test_an_upstream_slower_than_the_deadline_is_cut_at_it() -> None:
    deadline_s = 0.05
    rig = make_rig([("m", [HANG]), ("m", [reply()])], deadline_s=deadline_s, threshold=1)
    started = time.perf_counter()
    raised, _, _ = failing(rig, "m")
    took = time.perf_counter() - started
    assert isinstance(raised, UpstreamTimeout) and type(raised) is UpstreamTimeout
    assert raised.message == (
        "The request's deadline (routing.request_deadline_s) passed before an upstream answered."
    )
    assert raised.__suppress_context__  # the TimeoutError is not the story
    # Cut at the deadline, well before a second more (a generous bound for a loaded machine).
    assert deadline_s <= took < 0.9
    assert rig.called_indexes == [0] and rig.seen[0].within_deadline
    assert rig.attempts("m", 0, "upstream_timeout") == 1 and rig.in_flight(0) == 0
    assert not rig.availability.admits(rig.deployments[0])  # told as an upstream failure


@pytest.mark.parametrize(
    ("model_timeout_s", "default_timeout_s", "deadline_s", "within"),
    [
        (10.0, 120.0, 8.5, True),  # the deadline (plus a second) comes first
        (10.0, 120.0, 9.5, False),  # the model's own timeout comes first
        (None, 10.0, 8.5, True),  # no model timeout: the default one
        (None, 10.0, 9.5, False),
    ],
)
def test_the_deadline_is_armed_only_when_it_comes_before_the_timeout(
    model_timeout_s: float | None, default_timeout_s: float, deadline_s: float, within: bool
) -> None:
    rig = make_rig(
        [("m", [reply()])],
        timeout_s=model_timeout_s,
        default_timeout_s=default_timeout_s,
        deadline_s=deadline_s,
    )
    _, _, call = complete(rig, "m")
    assert rig.seen[0].within_deadline is within and call.within_deadline is within
    assert rig.seen[0].timeout_s == model_timeout_s


def test_an_attempt_past_the_deadline_still_gets_an_answer_already_there() -> None:
    # Armed with no time left, an upstream that answers without waiting is still heard.
    rig = make_rig([("m", [reply()])], deadline_s=5.0)
    usage = new_usage("m", perf_start=time.perf_counter() - 6.0)
    got, _, _ = complete(rig, "m", usage=usage)
    assert got.response_id == "id-hi" and rig.seen[0].within_deadline


# -- what is not an upstream's answer -----------------------------------------------------


def test_a_bug_in_the_call_releases_the_deployment_and_is_not_retried() -> None:
    bug = RuntimeError("bug")
    rig = make_rig([("m", [bug]), ("m", [reply()])], threshold=1)
    raised, usage, _ = failing(rig, "m")
    assert raised is bug and rig.called_indexes == [0] and rig.in_flight(0) == 0
    assert usage.upstream_latency_s is not None and 0 <= usage.upstream_latency_s < 5.0
    assert rig.availability.admits(rig.deployments[0])  # not the upstream's failure
    assert rig.attempts("m", 0, "internal") == 0


def test_a_cancelled_request_releases_its_deployment() -> None:
    rig = make_rig([("m", [HANG])])

    async def cancel() -> None:
        rig.called = asyncio.Event()
        task = asyncio.create_task(rig.caller.complete(rig.router.plan("m"), new_call("m"), usage))
        await asyncio.wait_for(rig.called.wait(), 5.0)
        assert rig.in_flight(0) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    usage = new_usage("m")
    asyncio.run(cancel())
    assert rig.in_flight(0) == 0 and usage.upstream_latency_s is not None


# -- operations ---------------------------------------------------------------------------


class Translating:
    """An API surface served over chat completions (the Adapter protocol)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    async def complete(self, provider: Provider, call: UpstreamCall) -> Reply:
        self.used.append("complete")
        return await provider.complete(call)

    async def open_stream(
        self, provider: Provider, call: UpstreamCall
    ) -> AsyncIterator[list[bytes]]:
        self.used.append("open_stream")
        return await provider.open_stream(call)


def test_embeddings_go_to_the_embeddings_call() -> None:
    rig = make_rig([("m", [reply()])], tracing=None)
    complete(rig, "m", usage=new_usage("m", "embeddings"), call=new_call("m", "embeddings"))
    assert rig.seen[0].method == "embed"


def test_an_adapter_makes_the_call_when_there_is_one() -> None:
    rig = make_rig([("m", [reply(), reply()])])
    adapter = Translating()
    call = new_call("m", "responses")
    call.adapter = adapter
    complete(rig, "m", call=call)
    stream_call = new_call("m", "responses")
    stream_call.adapter = adapter
    asyncio.run(rig.caller.open_stream(rig.router.plan("m"), stream_call, new_usage("m")))
    assert adapter.used == ["complete", "open_stream"]
    assert [s.method for s in rig.seen] == ["complete", "open_stream"]


def test_a_stream_is_opened_with_the_same_retry_rules() -> None:
    rig = make_rig(
        [("m", [UpstreamUnavailable("x")]), ("m", [reply("s")])], fallbacks=None, retries=1
    )
    usage = new_usage("m")

    async def read() -> list[list[bytes]]:
        events = await rig.caller.open_stream(rig.router.plan("m"), new_call("m"), usage)
        return [chunk async for chunk in events]

    assert asyncio.run(read()) == [[reply("s").body]]
    assert [s.method for s in rig.seen] == ["open_stream", "open_stream"]
    assert (usage.attempts, usage.deployment, usage.served_model) == (2, "models[1]", "m")
    assert usage.tokens == TokenCounts()  # a stream's are counted from its events


# -- spans ---------------------------------------------------------------------------------


@pytest.fixture
def traced() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.create(TracingConfig(capture_content=True), {}, exporter)
    assert isinstance(tracing, Tracing)
    yield tracing, exporter
    tracing.shutdown()


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    tracing.force_flush()
    return list(exporter.get_finished_spans())


def test_each_attempt_has_its_span_and_the_request_span_tells_the_story(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = traced
    rig = make_rig(
        [("m", [UpstreamUnavailable("x")]), ("b", [reply("b")])],
        fallbacks={"m": ["b"]},
        retries=0,
        tracing=tracing,
    )
    upstream = rig.deployments[0].provider
    upstream.server_address, upstream.server_port = "upstream.test", 8443
    usage = new_usage("m")
    with tracing.tracer.start_as_current_span("POST /v1/chat/completions") as request:
        complete(rig, "m", usage=usage)
    spans = finished(tracing, exporter)
    (failed,) = [s for s in spans if s.name == "chat m-up0"]
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "upstream_unreachable"
    # The upstream's own name and address, as its deployment gives them.
    assert failed.attributes["gen_ai.provider.name"] == "mock"
    assert failed.attributes["server.address"] == "upstream.test"
    assert failed.attributes["server.port"] == 8443
    # Each attempt's traceparent names its own span.
    for seen, span_id in zip(rig.seen, [failed.context.span_id, None], strict=True):
        trace_id, parent = seen.headers["traceparent"].split("-")[1:3]
        assert int(trace_id, 16) == request.get_span_context().trace_id
        if span_id is not None:
            assert int(parent, 16) == span_id
    assert usage.upstream_span is not None and usage.upstream_span.name == "chat b-up1"
    assert usage.output_body == reply("b").body  # capture_content: kept for the span
    done = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert len(done) == 1
    (event,) = done[0].events
    assert event.name == "chatvault.routing.attempt_failed"
    assert dict(event.attributes or {}) == {
        "gen_ai.request.model": "m",
        "chatvault.deployment": "models[0]",
        "chatvault.attempt": 1,
        "error.type": "upstream_unreachable",
    }
    attributes = done[0].attributes or {}
    assert attributes["chatvault.routing.attempts"] == 2
    assert attributes["chatvault.routing.served_model"] == "b"


def test_a_first_answer_adds_nothing_to_the_request_span(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = traced
    rig = make_rig([("m", [reply()])], tracing=tracing)
    with tracing.tracer.start_as_current_span("request"):
        complete(rig, "m")
    (request,) = [s for s in finished(tracing, exporter) if s.name == "request"]
    assert not request.events and not request.attributes


def test_a_retry_of_one_model_is_told_on_the_request_span(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = traced
    rig = make_rig([("m", [status_error(502), reply()])], tracing=tracing, rands=(0.0,))
    with tracing.tracer.start_as_current_span("request"):
        complete(rig, "m")
    (request,) = [s for s in finished(tracing, exporter) if s.name == "request"]
    assert request.attributes == {
        "chatvault.routing.attempts": 2,
        "chatvault.routing.served_model": "m",
    }


def test_a_cancelled_or_broken_attempt_ends_its_span_with_the_reason(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = traced
    rig = make_rig([("m", [RuntimeError("bug")])], tracing=tracing)
    failing(rig, "m")
    (span,) = [s for s in finished(tracing, exporter) if s.name == "chat m-up0"]
    assert (span.attributes or {})["error.type"] == "internal"

    rig = make_rig([("m", [HANG])], tracing=tracing)

    async def cancel() -> None:
        rig.called = asyncio.Event()
        task = asyncio.create_task(
            rig.caller.complete(rig.router.plan("m"), new_call("m"), new_usage("m"))
        )
        await asyncio.wait_for(rig.called.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    spans = [s for s in finished(tracing, exporter) if s.name == "chat m-up0"]
    assert [(s.attributes or {})["error.type"] for s in spans] == ["internal", "cancelled"]


def test_embeddings_keep_no_output_body(traced: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, _ = traced
    rig = make_rig([("m", [reply()])], tracing=tracing)
    usage = new_usage("m", "embeddings")
    complete(rig, "m", usage=usage, call=new_call("m", "embeddings"))
    assert usage.output_body is None
