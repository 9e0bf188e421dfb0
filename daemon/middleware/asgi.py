"""Small ASGI helpers shared by the middleware: the route template and the response status."""

from __future__ import annotations

from starlette.types import Message, Scope, Send


def route_template(scope: Scope) -> str:
    """The matched route's path template, never the raw path (bounded label values)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class StatusRecorder:
    """Wraps an ASGI ``send`` and remembers the response status (500 until one is sent)."""

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)
