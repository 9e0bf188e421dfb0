"""The stream relay: forwards an upstream's SSE events and learns the request's usage.

Everything about the upstream protocol of a stream lives here: asking the upstream
for its usage chunk even when the client did not (``ask_for_usage``), dropping that
extra chunk again, reading ids, finish reasons and token counts as the events pass
(``observe``), estimating tokens when a stream is cut before its usage chunk, and
putting the outcome on the ``Usage`` record however the stream ends.

    tally = StreamTally.for_request(body, client_wants_usage, capture=False)
    ask_for_usage(body)
    events = await provider.open_stream(call)
    return EventStreamResponse(relay(events, tally, usage, accounting.finish))
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from daemon.errors import GatewayError, UpstreamIncomplete, as_gateway_error, sse_error_event
from daemon.providers.sse import event_data
from daemon.usage import TokenCounts, Usage

log = logging.getLogger("chatvault.relay")


@dataclass(slots=True)
class StreamTally:
    """What a stream told us by its end; filled in while the events pass through."""

    client_wants_usage: bool = False
    capture: bool = False  # keep the streamed text (monitoring.tracing.capture_content)
    prompt_chars: int = 0  # for an estimate when a stream ends before its usage chunk
    tokens: TokenCounts = field(default_factory=TokenCounts)
    response_model: str = ""
    response_id: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    saw_usage: bool = False
    error: dict[str, Any] | None = None
    content_chunks: int = 0
    text: list[str] = field(default_factory=list)

    @classmethod
    def for_request(
        cls, body: dict[str, Any], client_wants_usage: bool, capture: bool
    ) -> StreamTally:
        chars = sum(
            len(m["content"])
            for m in body.get("messages") or ()
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        return cls(client_wants_usage=client_wants_usage, capture=capture, prompt_chars=chars)

    def estimate_tokens(self) -> TokenCounts:
        """A stream that ended before its usage chunk (client gone, upstream failed) was
        still generated, and billed, upstream: count about a token per content chunk and
        four characters per prompt token rather than record nothing."""
        if not self.content_chunks:
            return TokenCounts()
        return TokenCounts(input=self.prompt_chars // 4, output=self.content_chunks)


def ask_for_usage(body: dict[str, Any]) -> None:
    """Ask the upstream for the usage chunk even when the client did not: it is how
    a stream's tokens are counted. ``observe`` drops that chunk again."""
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}


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


def observe(event: bytes, tally: StreamTally) -> bytes | None:
    """Learn from one event; return the bytes to forward, or None to drop it.

    The only event dropped is the usage-only chunk that the gateway asked for (to
    count tokens) when the client did not.
    """
    data = event_data(event)
    if data is None or data == b"[DONE]":
        return event
    if tally.response_id and not tally.capture and _plain_delta(data):
        tally.content_chunks += 1
        return event  # nothing more to learn from it: skip the JSON parse
    try:
        chunk: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return event
    if not isinstance(chunk, dict):
        return event
    if chunk.get("error"):
        error = chunk["error"]
        tally.error = error if isinstance(error, dict) else {"message": str(error)}
        return event
    if not tally.response_id and chunk.get("id"):
        tally.response_id = str(chunk["id"])
    if not tally.response_model and chunk.get("model"):
        tally.response_model = str(chunk["model"])
    choices = chunk.get("choices")
    if choices:
        for choice in choices:
            if isinstance(choice, dict):
                if choice.get("finish_reason"):
                    tally.finish_reasons.append(str(choice["finish_reason"]))
                delta = choice.get("delta")
                if isinstance(delta, dict) and delta.get("content"):
                    tally.content_chunks += 1
                    if tally.capture and isinstance(delta["content"], str):
                        tally.text.append(delta["content"])
    usage = chunk.get("usage")
    if usage:
        tally.tokens = TokenCounts.from_openai(usage)
        tally.saw_usage = True
        if not choices and not tally.client_wants_usage:
            return None
    return event


async def relay(
    events: AsyncIterator[list[bytes]],
    tally: StreamTally,
    usage: Usage,
    finish: Callable[[Usage], None],
    observe_event: Callable[[bytes, StreamTally], bytes | None] = observe,
) -> AsyncIterator[bytes]:
    """Forward a stream to the client; put its outcome on ``usage`` and hand it to
    ``finish`` exactly once, however the stream ends. ``observe_event`` reads events
    of another protocol (the Responses API's, ``daemon/surfaces/responses/events.py``)."""
    completed = False
    first = True
    last = b""
    upstream_started = time.perf_counter() - (usage.upstream_latency_s or 0.0)
    try:
        async for batch in events:
            last = batch[-1] if batch else last
            kept = [e for e in batch if observe_event(e, tally) is not None]
            if not kept:
                continue
            if first:
                usage.ttft_s = time.perf_counter() - usage.perf_start
                first = False
            yield kept[0] if len(kept) == 1 else b"".join(kept)
        completed = True
        if tally.error is not None:
            usage.status_code = 502
            usage.error_type = "upstream_error"
        elif not tally.finish_reasons and not last.rstrip().endswith(b"[DONE]"):
            # The upstream closed cleanly mid-answer: the client must not take a
            # truncated answer for a whole one.
            incomplete = UpstreamIncomplete(
                "The upstream ended the stream before the answer was complete "
                "(no finish_reason, no [DONE])."
            )
            usage.status_code, usage.error_type = incomplete.status_code, incomplete.kind
            yield sse_error_event(incomplete)
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
        if tally.saw_usage:
            usage.tokens = tally.tokens
        else:
            usage.tokens = tally.estimate_tokens()
            usage.estimated_reason = (
                "stream_incomplete"
                if usage.error_type == UpstreamIncomplete.kind
                else "stream_cut_before_usage"
            )
        usage.response_model = tally.response_model
        usage.response_id = tally.response_id
        usage.finish_reasons = tuple(tally.finish_reasons)
        if tally.capture:
            usage.output_text = "".join(tally.text)
        finish(usage)
