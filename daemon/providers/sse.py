"""Server-sent events in OpenAI's chunk format: split, read, pass through.

Upstream bytes are forwarded as they arrive, one complete event at a time (a client
cannot use half an event, so nothing useful is held back). Each event's JSON is read
once to learn the response id, model, finish reasons and usage; the bytes forwarded
are the upstream's own.
"""

from __future__ import annotations

from typing import Any

import orjson

from daemon.providers.base import StreamInfo
from daemon.usage import TokenCounts


class EventSplitter:
    """Accumulates bytes and hands out complete SSE events."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        return [e + b"\n\n" for e in events if e]

    def rest(self) -> bytes:
        """What is left when the upstream closed mid-event."""
        rest, self._buffer = self._buffer, b""
        return rest


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's ``data:`` lines, joined as the SSE spec says."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2:
        return event[5:].strip()
    parts = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def _plain_delta(data: bytes) -> bool:
    """A content chunk with no usage, no finish reason and no error. Conservative: any
    doubt (other spacing, other fields) means the chunk is parsed."""
    if b'"error"' in data:
        return False
    if b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data:
        return False
    reasons = data.count(b'"finish_reason"')
    nulls = data.count(b'"finish_reason":null') + data.count(b'"finish_reason": null')
    return reasons == nulls


def observe(event: bytes, info: StreamInfo, client_wants_usage: bool) -> bytes | None:
    """Learn from one event; return the bytes to forward, or None to drop it.

    The only event dropped is the usage-only chunk that the gateway asked for (to
    count tokens) when the client did not.
    """
    info.events += 1
    data = event_data(event)
    if data is None or data == b"[DONE]":
        return event
    if info.response_id and not info.capture and _plain_delta(data):
        info.content_chunks += 1
        return event  # nothing more to learn from it: skip the JSON parse
    try:
        chunk: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return event
    if not isinstance(chunk, dict):
        return event
    if chunk.get("error"):
        info.error = (
            chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        )
        return event
    if not info.response_id and chunk.get("id"):
        info.response_id = str(chunk["id"])
    if not info.response_model and chunk.get("model"):
        info.response_model = str(chunk["model"])
    choices = chunk.get("choices")
    if choices:
        for choice in choices:
            if isinstance(choice, dict):
                if choice.get("finish_reason"):
                    info.finish_reasons.append(str(choice["finish_reason"]))
                delta = choice.get("delta")
                if isinstance(delta, dict) and delta.get("content"):
                    info.content_chunks += 1
                    if info.capture and isinstance(delta["content"], str):
                        info.text.append(delta["content"])
    usage = chunk.get("usage")
    if usage:
        info.tokens = TokenCounts.from_openai(usage)
        info.saw_usage = True
        if not choices and not client_wants_usage:
            return None
    return event
