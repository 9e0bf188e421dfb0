"""Calling the upstream: the deployments of a plan in order, until one answers.

Each attempt gets its own GenAI CLIENT span (``chat {model}``) whose traceparent is
sent upstream, and tells ``Availability`` how it went. A failed attempt falls through
to the next deployment only when the failed one surely did no work (it refused the
connection, answered 5xx or 429); a timeout does not fall through, since the upstream
may still be generating, and billing.

    caller = UpstreamCaller(availability, tracing, max_attempts=2)
    reply = await caller.complete(plan, call, usage)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from opentelemetry.trace import Span

from daemon.availability import Availability
from daemon.deployment import Deployment
from daemon.errors import GatewayError, RateLimited, UpstreamError, UpstreamTimeout
from daemon.providers.base import Provider, Reply, UpstreamCall
from daemon.tracing import AnyTracing, end_chat_completion, instrument_chat_completion
from daemon.usage import Usage

log = logging.getLogger("chatvault.upstream")

T = TypeVar("T")


def retryable(exc: GatewayError) -> bool:
    """May the next deployment be tried? Only when this one surely did no work."""
    if isinstance(exc, UpstreamTimeout):
        return False  # it may still be generating, and billing
    if isinstance(exc, UpstreamError):
        return True
    return isinstance(exc, RateLimited) and exc.code == "upstream_rate_limited"


class UpstreamCaller:
    def __init__(
        self, availability: Availability, tracing: AnyTracing, *, max_attempts: int
    ) -> None:
        self.availability = availability
        self.tracing = tracing
        self.max_attempts = max_attempts

    async def complete(self, plan: list[Deployment], call: UpstreamCall, usage: Usage) -> Reply:
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
        self, plan: list[Deployment], call: UpstreamCall, usage: Usage
    ) -> AsyncIterator[list[bytes]]:
        async def attempt(provider: Provider) -> AsyncIterator[list[bytes]]:
            if call.adapter is not None:
                return await call.adapter.open_stream(provider, call)
            return await provider.open_stream(call)

        return await self._attempts(plan, call, usage, attempt)

    async def _attempts(
        self,
        plan: list[Deployment],
        call: UpstreamCall,
        usage: Usage,
        attempt: Callable[[Provider], Awaitable[T]],
    ) -> T:
        last: GatewayError | None = None
        for deployment in plan[: self.max_attempts]:
            call.body["model"] = deployment.upstream_model
            call.timeout_s = deployment.config.timeout_s
            usage.provider = deployment.provider_name
            usage.upstream_model = deployment.upstream_model
            usage.deployment_index = deployment.index
            span = self._start_span(deployment, call, usage)
            started = usage.attempt_started = time.perf_counter()
            try:
                result = await attempt(deployment.provider)
            except GatewayError as exc:
                usage.upstream_latency_s = time.perf_counter() - started
                end_chat_completion(span, usage, error=exc.kind)
                if isinstance(exc, UpstreamError):
                    self.availability.report_failure(deployment, exc.kind)
                last = exc
                if retryable(exc):
                    log.warning(
                        "upstream attempt failed: model=%s provider=%s error=%s",
                        deployment.name,
                        deployment.provider_name,
                        exc.kind,
                    )
                    continue
                raise
            except BaseException as exc:  # a bug, or cancellation: still end the span
                usage.upstream_latency_s = time.perf_counter() - started
                kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal"
                end_chat_completion(span, usage, error=kind)
                raise
            usage.upstream_latency_s = time.perf_counter() - started
            self.availability.report_success(deployment)
            usage.upstream_span = span  # ended by the span sink, with the outcome
            return result
        assert last is not None
        raise last

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
