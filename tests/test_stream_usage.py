"""Usage extraction from streams (``daemon/relay.py``), driven with OpenAI-format events:
what a stream is billed for however it ends, which events reach the client, and that
the request is accounted for exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from daemon.errors import UpstreamTimeout
from daemon.relay import StreamTally, _plain_delta, ask_for_usage, observe, relay
from daemon.usage import TokenCounts, Usage

USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 7,
    "prompt_tokens_details": {"cached_tokens": 32},
}


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    return event(
        {
            "id": "chatcmpl-9",
            "object": "chat.completion.chunk",
            "model": "up-model-2024",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
    )


USAGE_CHUNK = event({"id": "chatcmpl-9", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


def new_usage() -> Usage:
    return Usage("r1", 0.0, "k", "standard", "chat", "m", upstream_latency_s=0.25)


async def source(
    batches: list[list[bytes]], fail: Exception | None = None
) -> AsyncIterator[list[bytes]]:
    for batch in batches:
        yield batch
    if fail is not None:
        raise fail


def run(
    batches: list[list[bytes]],
    tally: StreamTally,
    fail: Exception | None = None,
    take: int | None = None,
) -> tuple[list[bytes], list[Usage], Usage]:
    """Relay the stream to the end (or hang up after ``take`` forwarded pieces)."""
    usage, finished, out = new_usage(), [], []

    async def go() -> None:
        stream = relay(source(batches, fail), tally, usage, finished.append)
        async for piece in stream:
            out.append(piece)
            if take is not None and len(out) >= take:
                await stream.aclose()  # the client hung up
                return

    asyncio.run(go())
    return out, finished, usage


def test_a_finished_stream_is_billed_from_its_usage_chunk_and_the_extra_chunk_is_dropped() -> None:
    tally = StreamTally.for_request(
        {"messages": [{"role": "user", "content": "x" * 80}]}, False, capture=False
    )
    batches = [
        [chunk("", role="assistant")],
        [chunk("Hel"), chunk("lo")],
        [chunk(None, "stop")],
        [USAGE_CHUNK, DONE],
    ]
    out, finished, usage = run(batches, tally)
    assert finished == [usage]  # accounted once
    assert usage.tokens == TokenCounts(input=40, output=7, cached=32)
    assert usage.estimated_reason is None and usage.ok and usage.status_code == 200
    assert (usage.response_id, usage.response_model) == ("chatcmpl-9", "up-model-2024")
    assert usage.finish_reasons == ("stop",)
    assert usage.ttft_s is not None and usage.upstream_latency_s is not None
    assert usage.upstream_latency_s >= 0.25  # counted from the upstream call's start
    # The client did not ask for usage: the usage-only chunk is not forwarded; events
    # that arrived together leave together.
    assert b"".join(out) == b"".join(b"".join(b) for b in batches[:3]) + DONE
    assert out[1] == chunk("Hel") + chunk("lo")
    assert usage.output_text is None


def test_a_client_that_asked_for_usage_gets_the_usage_chunk() -> None:
    tally = StreamTally.for_request({}, True, capture=True)
    batches = [[chunk("Hi")], [chunk(" there")], [chunk(None, "length")], [USAGE_CHUNK], [DONE]]
    out, _, usage = run(batches, tally)
    assert USAGE_CHUNK in out
    assert usage.tokens.output == 7 and usage.finish_reasons == ("length",)
    assert usage.output_text == "Hi there" and tally.content_chunks == 2  # all parsed


def test_timings_first_token_and_upstream_duration() -> None:
    """Time to first token is taken at the first forwarded batch, not a later one; the
    upstream duration counts from the upstream call's start."""
    marks: dict[str, float] = {}

    async def timed() -> AsyncIterator[list[bytes]]:
        marks["first"] = time.perf_counter()
        yield [chunk("a")]
        await asyncio.sleep(0.05)
        marks["second"] = time.perf_counter()
        yield [chunk("b")]

    usage = new_usage()
    usage.upstream_latency_s = None
    usage.perf_start = time.perf_counter()

    async def go() -> None:
        async for _ in relay(
            timed(), StreamTally.for_request({}, False, False), usage, lambda u: None
        ):
            pass

    asyncio.run(go())
    assert usage.ttft_s is not None and usage.upstream_latency_s is not None
    assert marks["first"] - usage.perf_start <= usage.ttft_s < marks["second"] - usage.perf_start
    assert 0.05 <= usage.upstream_latency_s < 1.0


def test_a_client_hanging_up_closes_the_upstream_stream_at_once() -> None:
    closed: list[bool] = []

    async def upstream() -> AsyncIterator[list[bytes]]:
        try:
            for word in ("a", "b", "c"):
                yield [chunk(word)]
        finally:
            closed.append(True)  # the connection goes back to the pool

    async def go() -> None:
        stream = relay(
            upstream(), StreamTally.for_request({}, False, False), new_usage(), lambda u: None
        )
        await stream.__anext__()
        await stream.aclose()
        assert closed == [True]  # before anything else runs, not at garbage collection

    asyncio.run(go())


def test_a_stream_cut_before_its_usage_is_estimated_and_marked() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "s" * 41},
            {"role": "user", "content": [1]},
            "junk",
        ]
    }
    tally = StreamTally.for_request(body, False, capture=False)
    assert tally.prompt_chars == 41
    batches = [[chunk("a")], [chunk("b")], [chunk("c")], [chunk("d")]]
    out, finished, usage = run(batches, tally, take=3)
    assert len(out) == 3 and finished == [usage]
    assert (usage.status_code, usage.error_type) == (499, "cancelled")
    assert usage.tokens == TokenCounts(input=10, output=3)  # 41 // 4 prompt, a token a chunk
    assert usage.estimated_reason == "stream_cut_before_usage"


def test_a_stream_with_no_content_before_it_broke_estimates_nothing() -> None:
    tally = StreamTally.for_request({"messages": [{"content": "x" * 400}]}, False, capture=False)
    out, finished, usage = run([[chunk("", role="assistant")]], tally, fail=UpstreamTimeout("slow"))
    assert usage.tokens == TokenCounts() and usage.estimated_reason == "stream_cut_before_usage"
    assert (usage.status_code, usage.error_type) == (504, UpstreamTimeout("x").kind)
    error = json.loads(out[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout" and len(finished) == 1


def test_an_unexpected_failure_mid_stream_is_a_500_event_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tally = StreamTally.for_request({}, False, capture=False)
    out, finished, usage = run([[chunk("a")]], tally, fail=RuntimeError("bug at /secret/path"))
    assert usage.status_code == 500 and len(finished) == 1
    assert b"/secret/path" not in out[-1] and b'"error"' in out[-1]
    assert [r.message for r in caplog.records] == ["stream relay failed (request_id=r1)"]
    caplog.clear()
    run([[chunk("a")]], StreamTally.for_request({}, False, False), fail=UpstreamTimeout("x"))
    assert not caplog.records  # an upstream's failure is not the gateway's bug


def test_an_error_event_from_the_upstream_makes_the_request_failed() -> None:
    tally = StreamTally.for_request({}, False, capture=False)
    error = event({"error": {"message": "overloaded", "type": "server_error"}})
    out, _, usage = run([[chunk("a")], [error], [DONE]], tally)
    assert error in out and tally.error == {"message": "overloaded", "type": "server_error"}
    assert (usage.status_code, usage.error_type) == (502, "upstream_error")
    tally = StreamTally.for_request({}, False, capture=False)
    observe(event({"error": "plain text"}), tally)
    assert tally.error == {"message": "plain text"}


def test_observe_counts_content_after_the_first_chunk_without_parsing_it() -> None:
    tally = StreamTally.for_request({}, False, capture=False)
    assert observe(chunk("first"), tally) == chunk("first")
    assert tally.response_id == "chatcmpl-9" and tally.content_chunks == 1
    for _ in range(3):
        observe(chunk("more"), tally)
    assert tally.content_chunks == 4
    observe(chunk(None, "stop"), tally)  # parsed: it carries a finish reason
    assert tally.finish_reasons == ["stop"] and tally.content_chunks == 4
    # Odd events pass through untouched and teach nothing.
    fresh = StreamTally.for_request({}, False, capture=False)
    for odd in (b": keep-alive\n\n", DONE, b"data: not json\n\n", b"data: [1]\n\n"):
        assert observe(odd, fresh) == odd and observe(odd, tally) == odd
    assert fresh == StreamTally.for_request({}, False, capture=False)
    # Later ids and models do not overwrite the first (a parsed chunk: it has a reason).
    observe(event({"id": "other", "model": "other", "choices": [{"finish_reason": "x"}]}), tally)
    assert (tally.response_id, tally.response_model) == ("chatcmpl-9", "up-model-2024")
    assert tally.content_chunks == 6  # the fast path counts any plain data line
    assert tally.text == []  # nothing kept without capture


def test_a_usage_chunk_with_choices_is_forwarded_and_counted() -> None:
    tally = StreamTally.for_request({}, False, capture=False)
    both = chunk("end", "stop", usage=USAGE)
    assert observe(both, tally) == both
    assert tally.saw_usage and tally.tokens.input == 40 and tally.content_chunks == 1


@pytest.mark.parametrize(
    ("data", "plain"),
    [
        (b'{"choices":[{"delta":{"content":"x"},"finish_reason":null}]}', True),
        (b'{"choices":[{"delta":{"content":"x"},"finish_reason": null}],"usage": null}', True),
        (b'{"choices":[],"usage":null}', True),
        (b'{"choices":[{"finish_reason":"stop"}]}', False),
        (b'{"choices":[{"finish_reason":null}],"usage":{"prompt_tokens":1}}', False),
        (b'{"error":{"message":"x"}}', False),
        (b'{"choices":[{"finish_reason":null},{"finish_reason":"stop"}]}', False),
    ],
)
def test_plain_deltas_are_recognised_conservatively(data: bytes, plain: bool) -> None:
    assert _plain_delta(data) is plain


def test_the_upstream_is_asked_for_usage_keeping_the_clients_stream_options() -> None:
    body: dict[str, Any] = {"stream_options": {"other": 1}}
    ask_for_usage(body)
    assert body["stream_options"] == {"other": 1, "include_usage": True}
    empty: dict[str, Any] = {"stream_options": None}
    ask_for_usage(empty)
    assert empty["stream_options"] == {"include_usage": True}


# -- a stream that ends early, cleanly ----------------------------------------------------

INCOMPLETE = (
    "The upstream ended the stream before the answer was complete (no finish_reason, no [DONE])."
)


def error_of(piece: bytes) -> dict[str, Any]:
    assert piece.startswith(b"data: ")
    error: dict[str, Any] = json.loads(piece[len(b"data: ") :])["error"]
    return error


@pytest.mark.parametrize(
    "batches",
    [
        [],  # nothing at all
        [[chunk("", role="assistant")], [chunk("Hel"), chunk("lo")]],  # words, then a close
        [[chunk("Hel")], []],  # an empty batch last: the last event seen still counts
    ],
)
def test_a_stream_closed_without_finish_reason_or_done_ends_with_an_error_event(
    batches: list[list[bytes]],
) -> None:
    out, finished, usage = run(batches, StreamTally())
    assert finished == [usage]
    error = error_of(out[-1])
    assert error["message"] == INCOMPLETE and error["code"] == "upstream_incomplete"
    assert (usage.status_code, usage.error_type) == (502, "upstream_incomplete")
    assert usage.estimated_reason == "stream_incomplete"


@pytest.mark.parametrize(
    "batches",
    [
        [[chunk("Hel"), chunk("lo")], [DONE]],  # [DONE] without a finish_reason
        [[chunk("Hel")], [chunk("lo"), b"data: [DONE]\r\n\r\n"]],  # other line ends
        [[chunk("Hello", "stop")]],  # a finish_reason without [DONE]
    ],
)
def test_a_stream_with_finish_reason_or_done_is_complete(batches: list[list[bytes]]) -> None:
    out, finished, usage = run(batches, StreamTally())
    assert finished == [usage] and usage.ok and usage.status_code == 200
    assert all(b'"error"' not in piece for piece in out)
    assert usage.estimated_reason == "stream_cut_before_usage"  # no usage chunk came


def test_an_upstream_that_fails_to_close_does_not_change_the_outcome() -> None:
    class Unclosable:
        def __init__(self) -> None:
            self.items = [[chunk("Hi", "stop")], [USAGE_CHUNK, DONE]]

        def __aiter__(self) -> Unclosable:
            return self

        async def __anext__(self) -> list[bytes]:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

        async def aclose(self) -> None:
            raise ConnectionResetError("the upstream connection is already gone")

    usage, finished = new_usage(), []

    async def go() -> list[bytes]:
        return [p async for p in relay(Unclosable(), StreamTally(), usage, finished.append)]

    out = asyncio.run(go())
    assert finished == [usage] and usage.ok
    assert usage.tokens == TokenCounts(input=40, output=7, cached=32)
    assert b"".join(out).endswith(DONE)
