"""The model-request pipeline: one request, top to bottom, in the order it happens.

    authenticate          the key                                   → 401 (503 key store down)
    parse and validate    the body, within request limits            → 400, 408, 413
    resolve the model     router: its deployments, best first       → 404
    admit                 key's models (404 as unknown, or 403), fields each deployment
                          forwards (``forwarding.py``), rate limits, budget → 400, 429
    call the upstream     deployments in order (``attempts.py``)     → 502, 504
    account               one Usage record → the sinks (``sinks.py``)

Every authenticated request is accounted for exactly once, whether it succeeded,
was refused or failed, and for a stream whenever the stream ends (``relay.py``). The
HTTP handlers only translate HTTP in (``Incoming``) and out (``Answer``/``Stream``).

    pipeline = Pipeline(auth=..., router=..., lifecycle=..., admission=..., caller=...,
                        accounting=..., tracing=..., clock=time.time, max_body_bytes=4 << 20)
    result = await pipeline.run("chat", incoming)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from daemon.admission import Admission
from daemon.attempts import UpstreamCaller
from daemon.auth import Authenticator, Principal
from daemon.cache import AnyCache, DisabledCache, Entry, collect, replay, replay_stream
from daemon.config import RequestLimits
from daemon.lifecycle import Lifecycle
from daemon.providers.base import UpstreamCall
from daemon.relay import StreamTally, ask_for_usage, observe, relay
from daemon.requests import DEFAULT_LIMITS, parse_chat, parse_embeddings, parse_json_object
from daemon.router import Router
from daemon.sinks import Accounting
from daemon.surfaces import Surface, open_surface
from daemon.tracing import AnyTracing, instrument_authentication
from daemon.usage import Usage


@dataclass(slots=True)
class Incoming:
    """What the pipeline needs of an HTTP request."""

    authorization: str | None
    request_id: str
    trace_id: str
    read_body: Callable[[int], Awaitable[bytes]]  # raises 413 past the limit
    state: MutableMapping[str, Any]  # the request's scope state; the access log reads "usage"
    cache_control: str | None = None  # the client's Cache-Control (read only with a cache)


@dataclass(slots=True)
class Answer:
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class Stream:
    events: AsyncIterator[bytes]
    headers: dict[str, str]


class Pipeline:
    def __init__(
        self,
        *,
        auth: Authenticator,
        router: Router,
        lifecycle: Lifecycle,
        admission: Admission,
        caller: UpstreamCaller,
        accounting: Accounting,
        tracing: AnyTracing,
        clock: Callable[[], float],
        max_body_bytes: int,
        cache: AnyCache | None = None,
        limits: RequestLimits = DEFAULT_LIMITS,
        hide_forbidden_models: bool = True,
    ) -> None:
        self.auth = auth
        self.router = router
        self.lifecycle = lifecycle
        self.admission = admission
        self.caller = caller
        self.accounting = accounting
        self.tracing = tracing
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.cache: AnyCache = cache or DisabledCache()
        self.limits = limits
        # A model the key may not use answers as an unknown one (auth.forbidden_model_status).
        self.hide_forbidden_models = hide_forbidden_models

    async def run(self, operation: str, incoming: Incoming) -> Answer | Stream:
        principal = await self.auth.authenticate(incoming.authorization)
        usage = self._new_usage(operation, principal, incoming)
        incoming.state["usage"] = usage
        try:
            # Parse and validate.
            raw = await incoming.read_body(self.max_body_bytes)
            body = sent = parse_json_object(raw, self.limits.max_json_values)
            client_wants_usage = False
            surface: Surface | None = None
            if operation == "chat":
                params = parse_chat(body, self.limits)
                model, stream = params.model, params.stream
                client_wants_usage = params.include_usage
            elif operation == "embeddings":
                model, stream = parse_embeddings(body, self.limits), False
            else:  # Responses API, legacy completions: a chat body from here on
                surface = open_surface(operation, body)
                body, model, stream = surface.chat_body, surface.model, surface.stream
                client_wants_usage = surface.include_usage
            usage.model, usage.stream = model, stream
            # Resolve the model.
            usage.known_model = self.router.knows(model)
            self.lifecycle.check_accepting()
            plan = self.router.plan(model)
            principal.require_model(model, as_unknown=self.hide_forbidden_models)
            if principal.models is not None:
                plan = plan.within(principal.models)
            deployments = plan.deployments()  # the model's, then its fallbacks'
            if surface is not None:
                surface.check_servable(d.provider for d in deployments)
            for deployment in deployments:
                deployment.fields.check(sent, model)
            # The response cache: a hit neither reserves budget nor reaches an upstream.
            if self.cache.enabled and operation == "chat":
                entry = await self.cache.lookup(
                    principal.key_id, body, incoming.cache_control, usage, principal.models
                )
                if entry is not None:
                    return self._hit(entry, usage, stream, client_wants_usage)
            # Admit.
            prices = [d.price for d in deployments]
            decision = await self.admission.admit(principal, usage, body, len(raw), prices)
            headers = dict(decision.headers)
            # Call the upstream, and account.
            call = UpstreamCall(operation=operation, body=body, stream=stream, adapter=surface)
            if not stream:
                reply = await self.caller.complete(plan, call, usage)
                if usage.cache_write is not None:
                    usage.cache_write.body = reply.body
                self.accounting.finish(usage)
                return Answer(reply.body, headers)
            tally = StreamTally.for_request(
                body, client_wants_usage, capture=self.tracing.capture_content
            )
            ask_for_usage(body)
            events = await self.caller.open_stream(plan, call, usage)
            if usage.cache_write is not None:
                events = collect(events, usage.cache_write, self.cache.max_entry_bytes)
        except BaseException as exc:  # every authenticated request leaves a ledger row
            self.accounting.fail(usage, exc)
            raise
        # The relay accounts for the stream when it ends, however it ends.
        observer = observe if surface is None else surface.observe
        return Stream(relay(events, tally, usage, self.accounting.finish, observer), headers)

    def _hit(
        self, entry: Entry, usage: Usage, stream: bool, client_wants_usage: bool
    ) -> Answer | Stream:
        """Answer from the cache: no cost, and the saving on record."""
        usage.served_model = entry.model
        usage.provider, usage.upstream_model = entry.provider, entry.upstream_model
        usage.saved_usd = entry.cost_usd
        self.accounting.finish(usage)
        if stream:
            return Stream(replay_stream(replay(entry.body, client_wants_usage)), {})
        return Answer(entry.body, {})

    def _new_usage(self, operation: str, principal: Principal, incoming: Incoming) -> Usage:
        instrument_authentication("success", principal.key_id, principal.user_type)
        return Usage(
            trace_id=incoming.trace_id,
            request_id=incoming.request_id,
            started_at=self.clock(),
            key_id=principal.key_id,
            user_type=principal.user_type,
            operation=operation,
            model="",
            known_model=False,  # until the body names one the router knows
            perf_start=time.perf_counter(),
        )
