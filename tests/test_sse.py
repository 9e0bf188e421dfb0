"""Reading OpenAI stream chunks as they pass: what is learnt, what is dropped, what is forwarded."""

from __future__ import annotations

import json
from typing import Any

from daemon.providers.sse import EventSplitter
from daemon.relay import StreamTally, observe


def event(payload: Any, spaced: bool = False) -> bytes:
    text = json.dumps(payload) if spaced else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {
        "id": "c1",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def run(events: list[bytes], wants_usage: bool = False) -> tuple[StreamTally, list[bytes]]:
    info = StreamTally(client_wants_usage=wants_usage)
    kept = [e for e in events if observe(e, info) is not None]
    return info, kept


def test_learns_id_finish_and_usage_and_drops_the_unasked_usage_chunk() -> None:
    for spaced in (False, True):
        usage_chunk = {
            "id": "c1",
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
        events = [
            event(chunk("Hi", usage=None), spaced),
            event(chunk(" there", usage=None), spaced),
            event(chunk(None, "stop", usage=None), spaced),
            event(usage_chunk, spaced),
            b"data: [DONE]\n\n",
        ]
        info, kept = run(events)
        assert (info.response_id, info.response_model, info.finish_reasons) == ("c1", "m", ["stop"])
        assert (info.tokens.input, info.tokens.output) == (7, 3)
        assert len(kept) == 4 and events[3] not in kept
        info, kept = run(events, wants_usage=True)
        assert kept == events


def test_usage_inside_a_content_chunk_and_several_choices_are_not_missed() -> None:
    two_choices = {
        "id": "c1",
        "model": "m",
        "choices": [
            {"index": 0, "delta": {}, "finish_reason": None},
            {"index": 1, "delta": {}, "finish_reason": "length"},
        ],
    }
    with_usage = chunk(None, "stop", usage={"prompt_tokens": 2, "completion_tokens": 5})
    info, kept = run([event(chunk("a")), event(two_choices), event(with_usage, spaced=True)])
    assert info.finish_reasons == ["length", "stop"]
    assert info.tokens.output == 5 and len(kept) == 3


def test_error_events_are_recorded_and_forwarded() -> None:
    info, kept = run(
        [event(chunk("a")), event({"error": {"message": "boom", "type": "server_error"}})]
    )
    assert info.error == {"message": "boom", "type": "server_error"} and len(kept) == 2


def test_splitter_hands_out_whole_events_only() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'data: {"a":1}\n\n']
    assert splitter.feed(b":2}\r\n\r\n: keep-alive\n\n") == [
        b'data: {"b":2}\n\n',
        b": keep-alive\n\n",
    ]
    assert splitter.feed(b"data: partial") == [] and splitter.rest() == b"data: partial"
