"""Calling the upstream: a routing plan's deployments, retried and fallen back on, until
one answers (docs/routing.md).

For each model of the plan (the one asked for, then its ``fallbacks``), up to
``1 + retries`` attempts over its deployments whose circuit admits them, best first.
Another attempt follows only a failure that surely did no billable work and reached
the client with nothing (``retry_reason``); a timeout after the upstream started
answering is never retried, since it may still be generating, and billing. Retrying the
same deployment waits an exponential backoff with jitter (an upstream's Retry-After
wins when longer); moving to another deployment does not wait. Everything happens
within ``request_deadline_s`` of the request's arrival.

Each attempt gets its own GenAI CLIENT span (``chat {model}``) whose traceparent is
sent upstream; a failed one is also an event on the request's span, and every attempt
is counted in ``chatvault_routing_attempts_total``.

    caller = UpstreamCaller(availability, router, tracing, metrics, policy=RetryPolicy())
    reply = await caller.complete(plan, call, usage)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span

from daemon.availability import Availability, deployment_label
from daemon.deployment import Deployment
from daemon.errors import (
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from daemon.metrics import AnyMetrics
from daemon.providers.base import Provider, Reply, UpstreamCall
from daemon.router import Plan, Router
from daemon.tracing import AnyTracing, end_chat_completion, instrument_chat_completion
from daemon.usage import Usage

log = logging.getLogger("chatvault.upstream")

T = TypeVar("T")

RETRY_STATUSES = frozenset({500, 502, 503, 504})
_NO_WAIT_KINDS = (UpstreamUnavailable, UpstreamConnectTimeout, UpstreamFirstByteTimeout)


def retry_reason(exc: GatewayError) -> str | None:
    """Why another attempt may follow this failure (a bounded label), or None.

    Retryable: refused or reset connections, connect and first-byte timeouts, an
    upstream 429, and upstream 500/502/503/504. Never a plain timeout (the upstream
    started and may still be generating, and billing), the client's own mistakes, or
    the upstream refusing the gateway's credentials.
    """
    if isinstance(exc, RateLimited):
        return exc.kind if exc.code == "upstream_rate_limited" else None
    status = exc.upstream_status
    if status is not None:
        return f"http_{status}" if status in RETRY_STATUSES else None
    if isinstance(exc, _NO_WAIT_KINDS):
        return exc.kind
    return None


def retry_after_s(exc: GatewayError) -> float | None:
    """The upstream's Retry-After in seconds (the delta form), if it sent one."""
    value = exc.headers.get("Retry-After") or exc.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def backoff_s(retry: int, base_s: float, retry_after: float | None, rand: float) -> float:
    """The wait before the ``retry``-th retry (1-based) of the same deployment:
    ``base_s * 2**(retry-1)``, jittered to between half and all of it (so clients that
    failed together do not retry together); an upstream's Retry-After wins when longer.
    ``rand`` is uniform in [0, 1)."""
    delay = base_s * 2 ** (retry - 1) * (0.5 + rand / 2)
    return float(max(delay, retry_after or 0.0))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 1
    backoff_s: float = 0.1
    deadline_s: float = 120.0
    default_timeout_s: float = 120.0  # an attempt's own bound, when its model sets none


class UpstreamCaller:
    def __init__(
        self,
        availability: Availability,
        router: Router,
        tracing: AnyTracing,
        metrics: AnyMetrics,
        *,
        policy: RetryPolicy,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.availability = availability
        self.router = router
        self.tracing = tracing
        self.metrics = metrics
        self.policy = policy
        self.rand = rand
        self.sleep = sleep

    async def complete(self, plan: Plan, call: UpstreamCall, usage: Usage) -> Reply:
        async def attempt(provider: Provider) -> Reply:
            if call.adapter is not None:  # Responses API, legacy completions
                return await call.adapter.complete(provider, call)
            if call.operation == "embeddings":
                return await provider.embed(call)
            return await provider.complete(call)

        reply = await self._attempts(plan, call, usage, attempt)
        usage.tokens = reply.tokens
        usage.response_model = reply.response_model
        usage.response_id = reply.response_id
        usage.finish_reasons = reply.finish_reasons
        if self.tracing.capture_content and call.operation != "embeddings":
            usage.output_body = reply.body  # made into output messages only if the span records
        return reply

    async def open_stream(
        self, plan: Plan, call: UpstreamCall, usage: Usage
    ) -> AsyncIterator[list[bytes]]:
        async def attempt(provider: Provider) -> AsyncIterator[list[bytes]]:
            if call.adapter is not None:
                return await call.adapter.open_stream(provider, call)
            return await provider.open_stream(call)

        return await self._attempts(plan, call, usage, attempt)

    async def _attempts(
        self,
        plan: Plan,
        call: UpstreamCall,
        usage: Usage,
        attempt: Callable[[Provider], Awaitable[T]],
    ) -> T:
        deadline = usage.perf_start + self.policy.deadline_s
        per_model = 1 + self.policy.retries
        last: GatewayError | None = None
        reason = "circuit_open"
        for n, leg in enumerate(plan.legs):
            if n:
                self.metrics.record_fallback(plan.legs[n - 1].model, leg.model, reason)
                reason = "circuit_open"
            deployments = leg.deployments
            made = skipped = i = 0
            previous: Deployment | None = None
            while made < per_model and skipped < len(deployments):
                d = deployments[i % len(deployments)]
                i += 1
                if not self.availability.admits(d):
                    skipped += 1
                    continue
                skipped = 0
                if d is previous and last is not None:
                    wait = backoff_s(made, self.policy.backoff_s, retry_after_s(last), self.rand())
                    if time.perf_counter() + wait >= deadline:
                        raise last
                    await self.sleep(wait)
                elif last is not None and time.perf_counter() >= deadline:
                    raise last
                made += 1
                usage.attempts += 1
                try:
                    result = await self._one(leg.model, d, call, usage, attempt, deadline)
                except GatewayError as exc:
                    why = retry_reason(exc)
                    if why is None:
                        raise
                    last, previous, reason = exc, d, why
                    continue
                if last is not None or n:  # retried or fell back: say so on the request's span
                    trace.get_current_span().set_attributes(
                        {"chatvault.routing.attempts": usage.attempts,
                         "chatvault.routing.served_model": leg.model}
                    )  # fmt: skip
                return result
        if last is not None:
            raise last
        raise self._all_open(plan)

    async def _one(
        self,
        model: str,
        d: Deployment,
        call: UpstreamCall,
        usage: Usage,
        attempt: Callable[[Provider], Awaitable[T]],
        deadline: float,
    ) -> T:
        call.body["model"] = d.upstream_model
        call.timeout_s = d.config.timeout_s
        usage.provider = d.provider_name
        usage.upstream_model = d.upstream_model
        usage.deployment_index = d.index
        span = self._start_span(d, call, usage)
        self.availability.begin_trial(d)
        self.router.started(d)
        started = usage.attempt_started = time.perf_counter()
        try:
            remaining = deadline - started
            call.within_deadline = remaining + 1.0 < (
                d.config.timeout_s or self.policy.default_timeout_s
            )
            if call.within_deadline:
                # The request's deadline comes before the attempt's own timeout.
                try:
                    async with asyncio.timeout(max(remaining, 0.0)):
                        result = await attempt(d.provider)
                except TimeoutError:
                    raise UpstreamTimeout(
                        "The request's deadline (routing.request_deadline_s) passed "
                        "before an upstream answered."
                    ) from None
            else:
                result = await attempt(d.provider)
        except GatewayError as exc:
            self._failed(model, d, usage, span, exc, started)
            raise
        except BaseException as exc:  # a bug, or cancellation: still end the span
            usage.upstream_latency_s = time.perf_counter() - started
            self.router.ended(d, None)
            kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal"
            end_chat_completion(span, usage, error=kind)
            raise
        usage.upstream_latency_s = time.perf_counter() - started
        self.availability.report_success(d)
        self.metrics.record_attempt(model, deployment_label(d), "success")
        usage.upstream_span = span  # ended by the span sink, with the outcome
        usage.served_model = model
        usage.deployment = deployment_label(d)
        usage.in_flight = d  # released by the routing sink when the request ends
        return result

    def _failed(
        self,
        model: str,
        d: Deployment,
        usage: Usage,
        span: Span,
        exc: GatewayError,
        started: float,
    ) -> None:
        usage.upstream_latency_s = time.perf_counter() - started
        self.router.ended(d, None)
        end_chat_completion(span, usage, error=exc.kind)
        if isinstance(exc, UpstreamError):
            self.availability.report_failure(d, exc.kind)
        label = deployment_label(d)
        self.metrics.record_attempt(model, label, exc.kind)
        # The request's own span tells the story of its attempts.
        trace.get_current_span().add_event(
            "chatvault.routing.attempt_failed",
            {
                "gen_ai.request.model": model,
                "chatvault.deployment": label,
                "chatvault.attempt": usage.attempts,
                "error.type": exc.kind,
            },
        )
        log.warning(
            "upstream attempt failed: model=%s deployment=%s provider=%s error=%s",
            model,
            label,
            d.provider_name,
            exc.kind,
        )

    def _all_open(self, plan: Plan) -> ServiceUnavailable:
        deployments = plan.deployments()
        wait = min((self.availability.retry_in(d) for d in deployments), default=1.0)
        names = ", ".join(leg.model for leg in plan.legs)
        return ServiceUnavailable(
            f"Every deployment of {names} is failing (its circuit is open); "
            f"the next trial is in {wait:.0f}s.",
            code="circuit_open",
            headers={"Retry-After": str(max(int(wait + 0.999), 1))},
        )

    def _start_span(self, deployment: Deployment, call: UpstreamCall, usage: Usage) -> Span:
        provider = deployment.provider
        span = instrument_chat_completion(
            self.tracing,
            usage,
            provider=deployment.provider_name,
            upstream_model=deployment.upstream_model,
            server_address=provider.server_address,
            server_port=provider.server_port,
            body=call.body,
        )
        headers: dict[str, str] = {}
        self.tracing.inject(span, headers)  # the upstream's parent is this attempt's span
        call.headers = headers
        return span
