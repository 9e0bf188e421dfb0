"""The request id and the access log line, as pure ASGI middleware.

Every response carries ``x-request-id`` (the client's own, when it sent a sane one).
The id lives in ``scope["state"]``, where handlers, metrics and tracing find it.
"""

from __future__ import annotations

import logging
import random
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.logs import now_ms
from daemon.middleware.asgi import route_template

access_log = logging.getLogger("chatvault.access")

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _incoming_id(value: bytes) -> str | None:
    if 0 < len(value) <= 128 and all(c in _SAFE for c in value):
        return value.decode("ascii")
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, header: str = "x-request-id", access_log: bool = True) -> None:
        self.app = app
        self.header = header.lower().encode("latin-1")
        self.log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == self.header:
                rid = _incoming_id(value)
                break
        if rid is None:
            # Unique, not secret: no need for the OS's entropy on every request.
            rid = f"{random.getrandbits(128):032x}"
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        rid_header = (self.header, rid.encode("ascii"))
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log:
                self._log(scope, state, status, started)

    def _log(self, scope: Scope, state: dict[str, object], status: int, started: float) -> None:
        fields: dict[str, object] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": route_template(scope),
            "status": status,
            "duration_ms": now_ms(started),
            "trace_id": state.get("trace_id", ""),
        }
        usage = state.get("usage")
        if usage is not None:
            fields["key_id"] = getattr(usage, "key_id", "")
            fields["model"] = getattr(usage, "model", "")
            fields["error_type"] = getattr(usage, "error_type", None)
        access_log.info("request", extra={"fields": fields})
