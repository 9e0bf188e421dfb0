"""The provider protocol: one small surface that every upstream implements.

A provider turns an ``UpstreamCall`` (the client's OpenAI-shaped body, with the
upstream model id already in it) into a ``Reply`` or a stream of SSE events in
OpenAI's chunk format. Errors are raised as the gateway's ``Upstream*`` errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from daemon.usage import TokenCounts


@dataclass(slots=True)
class UpstreamCall:
    operation: str  # "chat" | "embeddings"
    body: dict[str, Any]
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # e.g. traceparent
    timeout_s: float | None = None


@dataclass(slots=True)
class Reply:
    """A non-streamed answer: the bytes to send back, and what was read from them."""

    body: bytes
    tokens: TokenCounts
    response_model: str = ""
    response_id: str = ""
    finish_reasons: tuple[str, ...] = ()

    def output_text(self) -> str | None:
        """The first choice's text (only read when content capture is on)."""
        try:
            parsed = orjson.loads(self.body)
            content = parsed["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None

    @classmethod
    def from_json(cls, body: bytes, parsed: Any) -> Reply:
        if not isinstance(parsed, dict):
            return cls(body, TokenCounts())
        choices = parsed.get("choices")
        reasons: tuple[str, ...] = ()
        if isinstance(choices, list):
            reasons = tuple(
                str(c["finish_reason"])
                for c in choices
                if isinstance(c, dict) and c.get("finish_reason")
            )
        return cls(
            body=body,
            tokens=TokenCounts.from_openai(parsed.get("usage")),
            response_model=str(parsed.get("model") or ""),
            response_id=str(parsed.get("id") or ""),
            finish_reasons=reasons,
        )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency_s: float
    error: str | None = None


class Provider(Protocol):
    name: str  # the provider label: mock, openai, ollama, anthropic, ...
    server_address: str | None
    server_port: int | None

    async def complete(self, call: UpstreamCall) -> Reply: ...

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        """Start the upstream call; raise before returning if it failed to start.

        The iterator yields lists of complete SSE events (``data: ...\\n\\n``) in
        OpenAI's chunk format: the events that arrived together, so that they can be
        forwarded together.
        """
        ...

    async def embed(self, call: UpstreamCall) -> Reply: ...

    async def probe(self, timeout_s: float) -> ProbeResult: ...


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
