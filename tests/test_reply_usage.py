"""Usage extraction from non-streamed answers (``daemon/providers/base.py``): chat
completions and Responses API objects as upstreams send them, and what is billed when
they leave things out."""

from __future__ import annotations

import json
from typing import Any

from daemon.providers.base import Reply, responses_tokens
from daemon.usage import TokenCounts

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "Yo"}, "finish_reason": "length"},
        {"index": 2, "message": {"role": "assistant", "content": "…"}, "finish_reason": None},
        "junk",
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 80,
        "total_tokens": 1280,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 64},
    },
}

RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "model": "gpt-4.1",
    "status": "completed",
    "incomplete_details": None,
    "usage": {
        "input_tokens": 500,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 16},
        "total_tokens": 540,
    },
}


def reply(payload: Any, responses: bool = False) -> Reply:
    body = json.dumps(payload).encode()
    parse = Reply.from_responses_json if responses else Reply.from_json
    return parse(body, json.loads(body))


def test_a_chat_completion_is_read_for_its_tokens_ids_and_finish_reasons() -> None:
    r = reply(CHAT)
    assert r.tokens == TokenCounts(input=1200, output=80, cached=1024, reasoning=64)
    assert (r.response_id, r.response_model) == ("chatcmpl-1", "gpt-4o-2024-08-06")
    assert r.finish_reasons == ("stop", "length")
    assert r.body == json.dumps(CHAT).encode()  # passed on unchanged
    assert r.output_text() == "Hi"


def test_a_chat_completion_missing_parts_costs_nothing_it_did_not_report() -> None:
    bare = reply({"choices": "none", "usage": None})
    assert bare.tokens == TokenCounts() and bare.finish_reasons == ()
    assert (bare.response_id, bare.response_model) == ("", "")
    assert reply([1, 2]).tokens == TokenCounts() and reply([1, 2]).response_id == ""
    assert reply([1, 2]).body == b"[1, 2]"  # whatever it was, the client gets it unchanged
    assert reply({"model": None, "id": None}).response_model == ""


def test_output_text_only_when_the_first_choice_has_text() -> None:
    assert reply({"choices": [{"message": {"content": None}}]}).output_text() is None
    assert reply({"choices": []}).output_text() is None
    assert reply({"choices": [{"message": {}}]}).output_text() is None
    assert reply({"choices": [None]}).output_text() is None
    assert Reply(b"not json", TokenCounts()).output_text() is None
    parts = [{"type": "text", "text": "Hi"}]
    assert reply({"choices": [{"message": {"content": parts}}]}).output_text() is None


def test_a_responses_object_is_read_with_its_own_usage_names() -> None:
    r = reply(RESPONSE, responses=True)
    assert r.tokens == TokenCounts(input=500, output=40, cached=256, reasoning=16)
    assert (r.response_id, r.response_model) == ("resp_1", "gpt-4.1")
    assert r.finish_reasons == ("completed",)
    assert r.body == json.dumps(RESPONSE).encode()


def test_an_incomplete_response_gives_its_reason() -> None:
    cut = {
        **RESPONSE,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    assert reply(cut, responses=True).finish_reasons == ("max_output_tokens",)
    odd = {**RESPONSE, "status": "incomplete", "incomplete_details": "x"}
    assert reply(odd, responses=True).finish_reasons == ("incomplete",)
    assert reply({**RESPONSE, "status": None}, responses=True).finish_reasons == ()
    bare = reply({"usage": "x"}, responses=True)
    assert bare.tokens == TokenCounts() and (bare.response_id, bare.response_model) == ("", "")
    assert reply([1], responses=True).tokens == TokenCounts()
    assert reply([1], responses=True).body == b"[1]"


def test_responses_usage_tolerates_missing_details() -> None:
    assert responses_tokens(None) == TokenCounts()
    assert responses_tokens({"input_tokens": 3, "output_tokens": 2}) == TokenCounts(3, 2)
    odd = {"input_tokens": 3, "input_tokens_details": [1], "output_tokens_details": "x"}
    assert responses_tokens(odd) == TokenCounts(input=3)
