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
    operation: str  # "chat" | "embeddings" | "responses" | "text_completion"
    body: dict[str, Any]  # chat completions' shape for every operation but embeddings
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # e.g. traceparent
    timeout_s: float | None = None
    # The request's deadline (attempts.py) is armed on this attempt and runs out before
    # the model's whole-call timeout: a call read whole within the attempt needs no total
    # timer of its own (one timer and timer context less per request, docs/benchmarks.md).
    within_deadline: bool = False
    # Another API surface (Responses, legacy completions) served over chat completions:
    # it calls the provider and translates the answer back (``daemon/surfaces``).
    adapter: Adapter | None = None


class Adapter(Protocol):
    async def complete(self, provider: Provider, call: UpstreamCall) -> Reply: ...

    async def open_stream(
        self, provider: Provider, call: UpstreamCall
    ) -> AsyncIterator[list[bytes]]: ...


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

    @classmethod
    def from_responses_json(cls, body: bytes, parsed: Any) -> Reply:
        """A Responses API object (``{"object": "response", "usage": {"input_tokens"...``)."""
        if not isinstance(parsed, dict):
            return cls(body, TokenCounts())
        status = str(parsed.get("status") or "")
        details = parsed.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return cls(
            body=body,
            tokens=responses_tokens(parsed.get("usage")),
            response_model=str(parsed.get("model") or ""),
            response_id=str(parsed.get("id") or ""),
            finish_reasons=(str(reason or status),) if status else (),
        )


def responses_tokens(usage: Any) -> TokenCounts:
    """Token counts from the Responses API's ``usage`` (input/output naming)."""
    if not isinstance(usage, dict):
        return TokenCounts()
    return TokenCounts.from_openai(  # which tolerates details that are not objects
        {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "prompt_tokens_details": usage.get("input_tokens_details"),
            "completion_tokens_details": usage.get("output_tokens_details"),
        }
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
