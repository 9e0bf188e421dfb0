"""API surfaces served over chat completions: the Responses API and legacy completions.

A surface reads a client's body in its own API's shape, gives the pipeline a chat
completions body to authenticate, limit, price and trace exactly like a chat request,
and translates the upstream's answer (or its stream) back. It is the ``adapter`` of
the ``UpstreamCall``, so the translation happens per attempt: a deployment that speaks
the Responses API natively gets the client's own body instead.

    surface = open_surface("responses", body)        # 400 for what cannot be served
    call = UpstreamCall("responses", surface.chat_body, surface.stream, adapter=surface)
    relay(events, tally, usage, finish, surface.observe)
"""

from __future__ import annotations

from typing import Any

from daemon.surfaces.completions import CompletionsSurface
from daemon.surfaces.responses import ResponsesSurface

Surface = ResponsesSurface | CompletionsSurface

OPERATIONS = ("responses", "text_completion")


def open_surface(operation: str, body: dict[str, Any]) -> Surface:
    """Validate and translate a request of ``operation``; raises ``InvalidRequest``."""
    if operation == "responses":
        return ResponsesSurface(body)
    if operation == "text_completion":
        return CompletionsSurface(body)
    raise ValueError(f"no API surface for operation {operation!r}")


__all__ = ["OPERATIONS", "CompletionsSurface", "ResponsesSurface", "Surface", "open_surface"]
