"""The gateway's resources and its request pipeline, independent of HTTP routing.

``Gateway`` owns everything with a lifetime (store, ledger writer, key cache, limiter,
upstream client, providers) and opens and closes it from the app's lifespan. The
handlers in ``api.py`` stay thin: they read the request and call ``admit``,
``complete``, ``open_stream`` and ``finish`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal, TypeVar

import aiohttp
from opentelemetry.trace import Span

from daemon.auth import Authenticator, Principal
from daemon.config import Settings
from daemon.errors import (
    BudgetExceeded,
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    as_gateway_error,
    sse_error_event,
)
from daemon.health import HealthMonitor
from daemon.keys import hash_key
from daemon.ledger import open_store
from daemon.ledger.base import Store, day_start
from daemon.ledger.writer import LedgerWriter, SpendBook
from daemon.limits import Decision, Limiter, MemoryLimiter
from daemon.metrics import MetricsCollector
from daemon.pricing import cost_usd, litellm_cost_map, needs_cost_map, price_for
from daemon.providers import build_provider, upstream_key
from daemon.providers.base import Provider, Reply, StreamInfo, UpstreamCall
from daemon.providers.litellm_provider import LiteLLMProvider
from daemon.providers.sse import observe
from daemon.router import Deployment, Router
from daemon.state import AdminKey, ensure_admin_key
from daemon.tracing import (
    Tracing,
    end_chat_completion,
    instrument_authentication,
    instrument_chat_completion,
    instrument_database_operation,
    instrument_rate_limiting,
    output_messages,
)
from daemon.usage import TokenCounts, Usage

log = logging.getLogger("chatvault.gateway")

T = TypeVar("T")
State = Literal["starting", "ready", "draining", "stopped"]


class Lifecycle:
    """Where the process is in its life; /readyz and new requests read it."""

    def __init__(self) -> None:
        self.state: State = "starting"
        self.started_at = time.time()
        self.pending_warmups = 0

    def readiness(self, database_ok: bool) -> str:
        """What /readyz says: "ready", or why not."""
        if self.state != "ready":
            return self.state
        if self.pending_warmups:
            return "starting"
        return "ready" if database_ok else "database_unreachable"

    def begin_drain(self) -> None:
        if self.state in ("starting", "ready"):
            self.state = "draining"


def estimate_tokens(info: StreamInfo) -> TokenCounts:
    """A stream that ended before its usage chunk (client gone, upstream failed) was
    still generated, and billed, upstream: count about a token per content chunk and
    four characters per prompt token rather than record nothing."""
    if not info.content_chunks:
        return TokenCounts()
    return TokenCounts(input=info.prompt_chars // 4, output=info.content_chunks)


def _retryable(exc: GatewayError) -> bool:
    """May the next deployment be tried? Only when this one surely did no work."""
    if isinstance(exc, UpstreamTimeout):
        return False  # it may still be generating, and billing
    if isinstance(exc, UpstreamError):
        return True
    return isinstance(exc, RateLimited) and exc.code == "upstream_rate_limited"


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
        limiter: Limiter | None = None,
        metrics: MetricsCollector | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.environ = environ
        self.clock = clock
        self.lifecycle = Lifecycle()
        self.store: Store = store or open_store(settings.ledger.url)
        self.spend = SpendBook()
        self.writer = LedgerWriter(
            self.store,
            batch_size=settings.ledger.batch_size,
            flush_interval_s=settings.ledger.flush_interval_s,
            max_queue=settings.ledger.max_queue,
            observers=[self.spend] if metrics is None else [self.spend, metrics],
            instrument=self._instrument_batch if tracing is not None else None,
        )
        self.limiter: Limiter = limiter or MemoryLimiter()
        self.admin_key: AdminKey | None = None
        self.auth: Authenticator | None = None
        self.http: aiohttp.ClientSession | None = None
        self.router = Router([])
        self.health = HealthMonitor(settings, store=self.store, deployments=[], clock=clock)
        self._stack = contextlib.AsyncExitStack()

    # -- lifetime --------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        try:
            if self.tracing is not None:
                tracing = self.tracing
                # Closed last, after the ledger's final batch spans; bounded in time.
                self._stack.push_async_callback(asyncio.to_thread, tracing.shutdown)
            self.admin_key = ensure_admin_key(s.state_file, s.auth.admin_key_env, self.environ)
            await self.store.open()
            self._stack.push_async_callback(self.store.close)
            await self.writer.start()
            self._stack.push_async_callback(self.writer.close)
            self.auth = Authenticator(
                self.store,
                admin_key_hash=hash_key(self.admin_key.key),
                clock=self.clock,
                spend=self.spend,
                refresh_interval_s=s.auth.refresh_interval_s,
                on_attempt=self._on_auth_attempt,
            )
            await self.auth.start()
            self._stack.push_async_callback(self.auth.aclose)
            self._stack.push_async_callback(self.limiter.aclose)
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=s.upstream.max_connections, limit_per_host=0, ttl_dns_cache=300
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=s.upstream.connect_timeout_s, sock_read=s.upstream.timeout_s
                ),
            )
            self._stack.push_async_callback(self.http.close)
            deployments = self._deployments(self.http)
            self.health = HealthMonitor(
                s,
                store=self.store,
                deployments=deployments,
                clock=self.clock,
                tracing=self.tracing,
                metrics=self.metrics,
            )
            self.health.on_round = self._health_round_done
            self.router = Router(deployments, self.health.is_up)
        except BaseException:
            await self._stack.aclose()
            raise
        self._start_warmups()
        self._background(self.health.run(), "chatvault-health")
        if self.metrics is not None:
            self._background(self._sample_loop(), "chatvault-metrics-sampler")
            self._background(self._business_loop(), "chatvault-business-metrics")
        self.lifecycle.state = "ready"

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._stack.callback(task.cancel)

    async def _sample_loop(self, interval_s: float = 1.0) -> None:
        assert self.metrics is not None
        while True:
            self.sample_metrics()
            await asyncio.sleep(interval_s)

    def sample_metrics(self) -> None:
        """Copy current state (process, ledger queue, span export) into metrics."""
        if self.metrics is not None:
            self.metrics.sample_process()
            self.metrics.sample_ledger(self.writer.depth, self.writer.rows_dropped)
            if self.tracing is not None:
                self.metrics.sample_tracing(self.tracing.status)

    def _on_auth_attempt(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.record_auth_attempt(result)
        if self.tracing is not None and result != "success":  # success: see new_usage
            instrument_authentication(result)

    def _instrument_batch(self, rows: int) -> AbstractContextManager[Any]:
        return instrument_database_operation(
            self.tracing, "INSERT", "requests", system=self.store.kind, rows=rows
        )

    async def _business_loop(self) -> None:
        metrics = self.metrics
        assert metrics is not None
        while True:
            started = time.perf_counter()
            try:
                await metrics.update_business_metrics(
                    lambda: self.store.day_stats(day_start(self.clock()))
                )
                metrics.record_db("day_stats", "requests", time.perf_counter() - started)
            except Exception as exc:  # the database may be down; health reports it
                log.warning("business metrics refresh failed: %s", exc)
            await asyncio.sleep(self.settings.monitoring.metrics.business_refresh_s)

    def _start_warmups(self) -> None:
        """Slow imports (litellm) happen after start; /readyz says "starting" until done."""
        providers = self.litellm_providers()
        if not providers:
            return
        self.lifecycle.pending_warmups += 1

        async def warm() -> None:
            try:
                await providers[0].warm()  # one import serves them all
            except Exception:
                log.exception("litellm could not be loaded; its models will fail")
            finally:
                self.lifecycle.pending_warmups -= 1

        self._background(warm(), "chatvault-warmup")

    async def stop(self) -> None:
        self.lifecycle.state = "stopped"
        await self._stack.aclose()

    def _deployments(self, session: aiohttp.ClientSession) -> list[Deployment]:
        s = self.settings
        cost_map = litellm_cost_map() if any(needs_cost_map(m) for m in s.models) else {}
        out = []
        for index, model in enumerate(s.models):
            provider = build_provider(
                model, session=session, environ=self.environ, default_timeout_s=s.upstream.timeout_s
            )
            problem = None
            if model.api_key_env and not upstream_key(model, self.environ):
                problem = f"{model.api_key_env} is not set"
                log.warning("models[%d] (%s): %s", index, model.name, problem)
            out.append(Deployment(index, model, provider, price_for(model, cost_map), problem))
        return out

    def litellm_providers(self) -> list[LiteLLMProvider]:
        return [
            d.provider for d in self.router.deployments if isinstance(d.provider, LiteLLMProvider)
        ]

    def _health_round_done(self) -> None:
        if self.metrics is not None:
            components = self.health.components(self)
            self.metrics.sample_health(
                {name: c.status for name, c in components.items()},
                {u.name: u.reachable for u in self.health.upstreams.values()},
            )

    # -- the request pipeline ---------------------------------------------------

    def new_usage(
        self, request_id: str, principal: Principal, operation: str, trace_id: str = ""
    ) -> Usage:
        if self.tracing is not None:
            instrument_authentication("success", principal.key_id, principal.user_type)
        return Usage(
            trace_id=trace_id,
            request_id=request_id,
            started_at=self.clock(),
            key_id=principal.key_id,
            user_type=principal.user_type,
            operation=operation,
            model="",
            perf_start=time.perf_counter(),
        )

    def check_accepting(self) -> None:
        if self.lifecycle.state in ("draining", "stopped"):
            raise ServiceUnavailable(
                "The gateway is shutting down; retry on another instance.",
                headers={"Retry-After": "1"},
            )

    async def admit(self, principal: Principal) -> Decision:
        """Apply the key's budget and rate limits; raise 429 when over."""
        if principal.budget_usd is not None:
            spent = self.spend.spent(principal.key_id)
            if spent >= principal.budget_usd:
                if self.metrics is not None:
                    self.metrics.record_rate_limit("budget", principal.user_type)
                raise BudgetExceeded(
                    f"This key has used its budget of ${principal.budget_usd:.2f} "
                    f"(spent ${spent:.4f}).",
                    headers={
                        "Retry-After": str(self.settings.limits.budget_retry_after_s),
                        "x-should-retry": "false",
                    },
                )
        decision = await self.limiter.acquire(principal.limits, self.clock())
        if self.tracing is not None:
            instrument_rate_limiting(decision.allowed, decision.limit_type, decision.retry_after_s)
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.record_rate_limit(
                    "rpm" if decision.limit_type == "requests" else "tpm", principal.user_type
                )
            wait = max(decision.retry_after_s, 0.001)
            headers = dict(decision.headers)
            headers["Retry-After"] = str(max(math.ceil(wait), 1))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            raise RateLimited(
                f"Rate limit reached for {decision.limit_type} per minute on this key. "
                f"Please try again in {wait:.1f}s.",
                headers=headers,
                error_type=decision.limit_type or "requests",
                limit_type="rpm" if decision.limit_type == "requests" else "tpm",
            )
        return decision

    async def complete(self, plan: list[Deployment], call: UpstreamCall, usage: Usage) -> Reply:
        """Call the deployments in order until one answers."""

        async def attempt(provider: Provider) -> Reply:
            if call.operation == "embeddings":
                return await provider.embed(call)
            return await provider.complete(call)

        reply = await self._attempts(plan, call, usage, attempt)
        self._apply_reply(usage, reply)
        return reply

    async def open_stream(
        self, plan: list[Deployment], call: UpstreamCall, usage: Usage, info: StreamInfo
    ) -> AsyncIterator[list[bytes]]:
        async def attempt(provider: Provider) -> AsyncIterator[list[bytes]]:
            return await provider.open_stream(call, info)

        return await self._attempts(plan, call, usage, attempt)

    async def _attempts(
        self,
        plan: list[Deployment],
        call: UpstreamCall,
        usage: Usage,
        attempt: Callable[[Provider], Awaitable[T]],
    ) -> T:
        last: GatewayError | None = None
        for deployment in plan[: self.settings.upstream.max_attempts]:
            call.body["model"] = deployment.upstream_model
            call.timeout_s = deployment.config.timeout_s
            usage.provider = deployment.provider_name
            usage.upstream_model = deployment.upstream_model
            usage.deployment_index = deployment.index
            span = self._start_upstream_span(deployment, call, usage)
            started = time.perf_counter()
            try:
                result = await attempt(deployment.provider)
            except GatewayError as exc:
                usage.upstream_latency_s = time.perf_counter() - started
                if span is not None:
                    end_chat_completion(span, usage, error=exc.kind)
                if isinstance(exc, UpstreamError):
                    self.health.report_failure(deployment, exc.kind)
                last = exc
                if _retryable(exc):
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
                if span is not None:
                    kind = "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal"
                    end_chat_completion(span, usage, error=kind)
                raise
            usage.upstream_latency_s = time.perf_counter() - started
            self.health.report_success(deployment)
            usage.upstream_span = span  # ended by finish(), with the outcome
            return result
        assert last is not None
        raise last

    def _start_upstream_span(
        self, deployment: Deployment, call: UpstreamCall, usage: Usage
    ) -> Span | None:
        if self.tracing is None:
            return None
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

    def _apply_reply(self, usage: Usage, reply: Reply) -> None:
        usage.tokens = reply.tokens
        usage.response_model = reply.response_model
        usage.response_id = reply.response_id
        usage.finish_reasons = reply.finish_reasons
        if self.tracing is not None and self.tracing.capture_content:
            usage.output_text = reply.output_text()

    async def relay(
        self,
        events: AsyncIterator[list[bytes]],
        info: StreamInfo,
        usage: Usage,
        client_wants_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Forward a stream to the client; account for it however it ends."""
        completed = False
        first = True
        upstream_started = time.perf_counter() - (usage.upstream_latency_s or 0.0)
        try:
            async for batch in events:
                kept = [e for e in batch if observe(e, info, client_wants_usage) is not None]
                if not kept:
                    continue
                if first:
                    usage.ttft_s = time.perf_counter() - usage.perf_start
                    first = False
                yield kept[0] if len(kept) == 1 else b"".join(kept)
            completed = True
            if info.error is not None:
                usage.status_code = 502
                usage.error_type = "upstream_error"
        except Exception as exc:
            error = as_gateway_error(exc)
            if not isinstance(exc, GatewayError):
                log.exception("stream relay failed (request_id=%s)", usage.request_id)
            usage.status_code, usage.error_type = error.status_code, error.kind
            completed = True
            yield sse_error_event(error)
        finally:
            if not completed:
                # The client hung up, or shutdown cut the stream.
                usage.status_code, usage.error_type = 499, "cancelled"
            with contextlib.suppress(Exception):
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()
            usage.upstream_latency_s = time.perf_counter() - upstream_started
            usage.tokens = info.tokens if info.saw_usage else estimate_tokens(info)
            usage.response_model = info.response_model
            usage.response_id = info.response_id
            usage.finish_reasons = tuple(info.finish_reasons)
            if info.capture:
                usage.output_text = "".join(info.text)
            self.finish(usage)

    def fail(self, usage: Usage, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            usage.status_code, usage.error_type = 499, "cancelled"
        else:
            error = as_gateway_error(exc)
            usage.status_code, usage.error_type = error.status_code, error.kind
        self.finish(usage)

    def finish(self, usage: Usage) -> None:
        """Account for a finished request, exactly once: cost, ledger, spend, tokens,
        metrics and the upstream span. The ledger row comes first: whatever fails
        after it, the request is on record."""
        if usage.finished:
            return
        usage.finished = True
        usage.latency_s = time.perf_counter() - usage.perf_start
        if usage.deployment_index >= 0 and usage.tokens.total:
            price = self.router.deployments[usage.deployment_index].price
            usage.cost_usd = cost_usd(usage.tokens, price)
        self.writer.submit(usage)
        self.spend.add(usage.key_id, usage.cost_usd)
        if usage.tokens.total:
            self.limiter.charge_tokens(usage.key_id, usage.tokens.total, self.clock())
        try:
            if self.metrics is not None:
                self.metrics.record_usage(usage)
            if usage.upstream_span is not None:
                output = None
                if usage.output_text is not None:
                    output = output_messages(usage.output_text, usage.finish_reasons)
                end_chat_completion(
                    usage.upstream_span, usage, error=usage.error_type, output=output
                )
                usage.upstream_span = None
                usage.output_text = None  # the row waits in the ledger queue: drop the text
        except Exception:  # telemetry must never fail the request it describes
            log.exception("recording telemetry failed (request_id=%s)", usage.request_id)
