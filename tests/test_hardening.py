"""Hostile clients and broken upstreams (issue 13): bounded work, real timeouts,
fields a client may not turn on, models a key may not probe, broken streams.

Upstreams here are real servers on loopback: the fakes of tests/fakes.py, small
Starlette apps, and raw sockets that never accept or never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import ADMIN_KEY, ServerThread, base_config, ledger_rows, wait_for
from tests.surfaces_support import openai_client
from tests.test_api import CHAT, assert_openai_error, bearer, chat_body, new_key

PRICING = {"input_per_million": 1.0, "output_per_million": 2.0}


def ledger(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


def upstream_model(url: str, **entry: Any) -> dict[str, Any]:
    return {
        "name": "up",
        "provider": "openai",
        "model": "up-model",
        "api_base": url + "/v1",
        "pricing": PRICING,
        **entry,
    }


def one_row(tmp_path: Path) -> dict[str, Any]:
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path)))
    assert len(rows) == 1, rows
    return rows[0]


# -- models a key may not use ------------------------------------------------------------


def test_a_model_the_key_may_not_use_answers_exactly_like_one_that_does_not_exist(
    make_client: MakeClient, make_settings: Any
) -> None:
    config = base_config(
        models=[
            {"name": "mock", "provider": "mock"},
            {"name": "mock-2", "provider": "mock", "model": "other"},
        ]
    )
    client = make_client(config)
    key = new_key(make_settings(config), models=("mock-2",))["key"]
    forbidden = client.post(CHAT, json=chat_body(model="mock"), headers=bearer(key))
    unknown = client.post(CHAT, json=chat_body(model="mock-3"), headers=bearer(key))
    assert_openai_error(forbidden, 404, "model_not_found")
    assert_openai_error(unknown, 404, "model_not_found")
    # The same answer but for the name itself: nothing tells the two apart.
    assert forbidden.text.replace("'mock'", "'X'") == unknown.text.replace("'mock-3'", "'X'")
    embed = client.post("/v1/embeddings", json={"model": "mock", "input": "x"}, headers=bearer(key))
    assert_openai_error(embed, 404, "model_not_found")
    assert client.get("/v1/models/mock", headers=bearer(key)).status_code == 404
    assert client.post(CHAT, json=chat_body(model="mock-2"), headers=bearer(key)).status_code == 200


# -- fields forwarded to OpenAI-compatible upstreams --------------------------------------


@pytest.fixture
def fake_openai() -> Iterator[tuple[Upstream, str]]:
    state = Upstream()
    with ServerThread(openai_upstream(state)) as server:
        yield state, server.url


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("service_tier", "priority"),
        ("store", True),
        ("web_search_options", {}),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_fields_that_change_price_or_retention_are_refused_by_default(
    tmp_path: Path,
    make_client: MakeClient,
    fake_openai: tuple[Upstream, str],
    field: str,
    value: Any,
) -> None:
    state, url = fake_openai
    client = openai_client(make_client(base_config(models=[upstream_model(url)])))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="up",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={field: value},
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == field and error["code"] == "field_not_allowed"
    assert f"'{field}'" in error["message"] and "forward_fields" in error["message"]
    assert state.posts() == []  # nothing reached the upstream
    assert one_row(tmp_path)["status_code"] == 400


def test_fields_that_ask_for_nothing_and_operator_allowed_fields_pass(
    make_client: MakeClient, fake_openai: tuple[Upstream, str]
) -> None:
    state, url = fake_openai
    models = [
        upstream_model(url),
        upstream_model(url, name="open", forward_fields={"deny": []}),
        upstream_model(url, name="strict", forward_fields={"allow": ["messages"]}),
    ]
    client = openai_client(make_client(base_config(models=models)))
    hi = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="up", messages=hi, store=False)
    client.chat.completions.create(model="open", messages=hi, service_tier="priority")
    client.chat.completions.create(model="strict", messages=hi)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="strict", messages=hi, temperature=0.5)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "temperature"
    sent = state.posts()
    assert sent[0].body.get("store") is False
    assert sent[1].body["service_tier"] == "priority"
    assert len(sent) == 3


# -- broken streams -------------------------------------------------------------------------


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    return _sse(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def streaming_upstream(parts: list[bytes], forever: bytes = b"", every_s: float = 0.0) -> Starlette:
    """An upstream whose streams send ``parts``, then ``forever`` again and again."""

    async def chat(request: Request) -> Response:
        async def body() -> Any:
            for part in parts:
                yield part
            while forever:
                yield forever
                await asyncio.sleep(every_s)

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_a_stream_ended_early_but_cleanly_is_an_error_with_estimated_tokens(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # Two words and a clean close: no finish_reason, no usage, no [DONE].
    upstream = streaming_upstream([_chunk("Hello"), _chunk(" there")])
    with ServerThread(upstream) as server:
        client = openai_client(make_client(base_config(models=[upstream_model(server.url)])))
        received: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in client.chat.completions.create(
                model="up", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) == "Hello there"
    assert "before the answer was complete" in caught.value.message
    row = one_row(tmp_path)
    assert (row["status_code"], row["error_type"]) == (502, "upstream_incomplete")
    assert row["estimated"] == 1 and row["estimated_reason"] == "stream_incomplete"
    assert row["output_tokens"] == 2  # one per content chunk, as documented


def test_an_early_end_is_an_error_on_the_responses_and_completions_surfaces(
    tmp_path: Path, make_client: MakeClient
) -> None:
    upstream = streaming_upstream([_chunk("Hello"), _chunk(" there")])
    with ServerThread(upstream) as server:
        client = openai_client(make_client(base_config(models=[upstream_model(server.url)])))
        with pytest.raises(openai.APIError), client.responses.stream(model="up", input="hi") as s:
            for _ in s:
                pass
        with pytest.raises(openai.APIError):
            for _ in client.completions.create(model="up", prompt="hi", stream=True):
                pass
    rows = wait_for(lambda: (r := ledger_rows(ledger(tmp_path))) and len(r) == 2 and r)
    assert [(r["operation"], r["status_code"], r["error_type"]) for r in rows] == [
        ("responses", 502, "upstream_incomplete"),
        ("text_completion", 502, "upstream_incomplete"),
    ]
    assert all(r["estimated_reason"] == "stream_incomplete" for r in rows)


def test_a_complete_stream_without_done_is_still_a_success(
    tmp_path: Path, make_client: MakeClient
) -> None:
    upstream = streaming_upstream([_chunk("Hi"), _chunk(finish="stop")])
    with ServerThread(upstream) as server:
        client = openai_client(make_client(base_config(models=[upstream_model(server.url)])))
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="up", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if c.choices
        )
    assert text == "Hi"
    assert one_row(tmp_path)["status_code"] == 200


def test_an_upstream_that_never_ends_an_event_fails_the_call(
    tmp_path: Path, make_client: MakeClient
) -> None:
    upstream = streaming_upstream([_chunk("Hi")], forever=b"x" * 16384, every_s=0.001)
    with ServerThread(upstream) as server:
        config = base_config(
            models=[upstream_model(server.url)], upstream={"max_event_bytes": 65536}
        )
        client = openai_client(make_client(config))
        started = time.monotonic()
        with pytest.raises(openai.APIError) as caught:
            for _ in client.chat.completions.create(
                model="up", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
    assert time.monotonic() - started < 10
    assert "without ending an event" in caught.value.message
    row = one_row(tmp_path)
    assert (row["status_code"], row["error_type"]) == (502, "upstream_error")


# -- upstream timeouts, each against a listener that misbehaves ---------------------------


@contextlib.contextmanager
def never_accepting() -> Iterator[int]:
    """A port whose accept queue is full: a new connection's SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # more than the queue holds; the rest hang in SYN_SENT
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


@contextlib.contextmanager
def never_answering() -> Iterator[int]:
    """A port that completes the handshake (the kernel does) and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


TIMEOUTS = {"connect_timeout_s": 0.5, "first_byte_timeout_s": 0.7, "timeout_s": 1.5}


def _timed_failure(client: openai.OpenAI, stream: bool = False) -> tuple[float, openai.APIError]:
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        result = client.chat.completions.create(
            model="up", messages=[{"role": "user", "content": "hi"}], stream=stream
        )
        if stream:
            for _ in result:  # type: ignore[union-attr]
                pass
    return time.monotonic() - started, caught.value


def test_connect_timeout_against_a_listener_that_never_accepts(
    tmp_path: Path, make_client: MakeClient
) -> None:
    with never_accepting() as port:
        model = upstream_model(f"http://127.0.0.1:{port}", **TIMEOUTS)
        client = openai_client(make_client(base_config(models=[model])))
        took, error = _timed_failure(client)
    assert isinstance(error, openai.APIStatusError) and error.status_code == 504
    assert 0.4 < took < 3.0  # connect_timeout_s, not the OS's two minutes
    assert "could not be connected to" in error.message
    assert one_row(tmp_path)["error_type"] == "upstream_connect_timeout"


def test_first_byte_timeout_against_a_listener_that_never_answers(
    tmp_path: Path, make_client: MakeClient
) -> None:
    with never_answering() as port:
        model = upstream_model(f"http://127.0.0.1:{port}", **TIMEOUTS)
        client = openai_client(make_client(base_config(models=[model])))
        took, error = _timed_failure(client)
    assert isinstance(error, openai.APIStatusError) and error.status_code == 504
    assert 0.6 < took < 3.0
    assert "first_byte_timeout_s" in error.message
    assert one_row(tmp_path)["error_type"] == "upstream_first_byte_timeout"


def test_total_timeout_against_an_upstream_that_never_finishes(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # Answers at once and keeps talking, each piece well within first_byte_timeout_s.
    upstream = streaming_upstream([_chunk("Hi")], forever=_chunk(" more"), every_s=0.1)
    with ServerThread(upstream) as server:
        model = upstream_model(server.url, **TIMEOUTS)
        client = openai_client(make_client(base_config(models=[model])))
        took, error = _timed_failure(client, stream=True)
    assert 1.4 < took < 4.0
    assert "did not answer in time" in error.message
    row = one_row(tmp_path)
    assert (row["status_code"], row["error_type"]) == (504, "upstream_timeout")


def test_the_request_deadline_cuts_an_answer_that_never_finishes(
    tmp_path: Path, make_client: MakeClient
) -> None:
    # Not streamed: the answer is read whole inside the attempt, and with the deadline
    # before timeout_s the provider arms no total timer of its own: the deadline must cut it.
    upstream = streaming_upstream([_chunk("Hi")], forever=_chunk(" more"), every_s=0.1)
    with ServerThread(upstream) as server:
        model = upstream_model(server.url, **{**TIMEOUTS, "timeout_s": 60})
        config = base_config(models=[model], routing={"request_deadline_s": 1.5, "retries": 0})
        client = openai_client(make_client(config))
        took, error = _timed_failure(client)
    assert 1.4 < took < 4.0
    assert isinstance(error, openai.APIStatusError) and error.status_code == 504
    assert "request_deadline_s" in error.message
    row = one_row(tmp_path)
    assert (row["status_code"], row["error_type"]) == (504, "upstream_timeout")


def test_a_models_timeouts_default_to_the_upstream_section(make_settings: Any) -> None:
    from daemon.providers import timeouts_for

    settings = make_settings(
        base_config(
            upstream={"connect_timeout_s": 2, "first_byte_timeout_s": 30, "timeout_s": 90},
            models=[
                upstream_model("http://127.0.0.1:9", timeout_s=10),
                upstream_model("http://127.0.0.1:9", name="b"),
            ],
        )
    )
    a, b = (timeouts_for(m, settings.upstream) for m in settings.models)
    assert (a.connect_s, a.first_byte_s, a.total_s) == (2, 30, 10)
    assert (b.connect_s, b.first_byte_s, b.total_s) == (2, 30, 90)
    # A model's own timeout_s no longer drops the connect timeout (it did: sock_read only).
    timeout = a.client_timeout()
    assert (timeout.connect, timeout.sock_read, timeout.total) == (2, 30, 10)


# -- bounded work per request --------------------------------------------------------------


def test_embedding_requests_are_bounded(make_client: MakeClient) -> None:
    client = make_client()
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    many = client.post(
        "/v1/embeddings", json={"model": "mock", "input": [""] * 5000}, headers=headers
    )
    error = assert_openai_error(many, 400, "too_many_items")
    assert error["param"] == "input" and "requests.max_embedding_inputs" in error["message"]
    huge = client.post(
        "/v1/embeddings",
        json={"model": "mock", "input": ["a"] * 2048, "dimensions": 16384},
        headers=headers,
    )
    error = assert_openai_error(huge, 400, "too_many_values")
    assert "requests.max_embedding_values" in error["message"]
    fine = client.post(
        "/v1/embeddings",
        json={"model": "mock", "input": ["a", "b"], "dimensions": 16},
        headers=headers,
    )
    assert fine.status_code == 200 and len(fine.json()["data"][0]["embedding"]) == 16


def test_a_body_of_millions_of_tiny_values_is_refused_before_parsing(
    make_client: MakeClient,
) -> None:
    client = make_client()
    raw = (
        b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"x":['
        + b",".join([b"[]"] * 1_000_000)
        + b"]}"
    )
    started = time.monotonic()
    response = client.post(CHAT, content=raw, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert time.monotonic() - started < 2
    error = assert_openai_error(response, 400, "too_many_values")
    assert "requests.max_json_values" in error["message"]
    too_long = client.post(
        CHAT,
        json={"model": "mock", "messages": [{"role": "user", "content": "a"}] * 5000},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert_openai_error(too_long, 400, "too_many_items")


def test_a_large_embeddings_answer_is_forwarded_whole_and_billed_from_its_usage(
    tmp_path: Path, make_client: MakeClient
) -> None:
    vectors = [[round(i * 0.001 + j * 1e-6, 6) for j in range(1000)] for i in range(300)]
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": "up-embed-3",
        "usage": {"prompt_tokens": 1234, "total_tokens": 1234},
    }

    async def embeddings(request: Request) -> Response:
        return Response(orjson.dumps(answer), media_type="application/json")

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])
    with ServerThread(app) as server:
        client = openai_client(make_client(base_config(models=[upstream_model(server.url)])))
        reply = client.embeddings.create(model="up", input=["a"] * 300)
    assert len(orjson.dumps(answer)) > 2 << 20  # past the size where it is only skimmed
    assert [d.embedding for d in reply.data] == vectors
    assert reply.usage.prompt_tokens == 1234 and reply.model == "up-embed-3"
    row = one_row(tmp_path)
    assert row["input_tokens"] == 1234
    assert row["cost_usd"] == pytest.approx(1234 * PRICING["input_per_million"] / 1e6)


def test_mock_counts_a_huge_prompt_exactly_in_pieces() -> None:
    from daemon.providers.mock_text import count_tokens

    text = ("word, " * 30000 + "x" * 70000 + "!" * 70000 + " tail ") * 3
    # One token per word or punctuation mark, counted here without the regex.
    per_block = 30000 * 2 + 1 + 70000 + 1
    assert count_tokens(text) == per_block * 3


# -- the CLI on a wrong-typed answer -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"enabled": True, "last_success": "yesterday", "last_failure": {"a": 1}},
        {"enabled": True, "queue_size": 3, "queue_capacity": "n"},
        {"enabled": True, "spans_exported": "lots"},
        {"enabled": "yes"},
        {"enabled": True, "last_error": ["\x1b]0;pwned\x07"]},
    ],
)
def test_traces_status_on_wrong_typed_json_is_one_line(body: dict[str, Any]) -> None:
    from starlette.responses import JSONResponse

    from tests.helpers import cli

    async def traces(request: Request) -> Response:
        return JSONResponse(body)

    app = Starlette(routes=[Route("/admin/traces/status", traces)])
    env = {"CHATVAULT_ADMIN_KEY": ADMIN_KEY, "NO_COLOR": "1", "COLUMNS": "100"}
    with ServerThread(app) as server:
        for extra in ((), ("--json",)):
            result = cli("traces", "status", "--url", server.url, *extra, env=env)
            text = result.stdout + result.stderr
            assert result.returncode == 3, text
            assert "Traceback" not in text and "\x1b" not in text
            (line,) = result.stderr.strip().splitlines()
            assert "did not answer like ChatVault" in line and "wrong type" in line


def test_forward_fields_takes_allow_or_deny_not_both(make_settings: Any) -> None:
    from daemon.config import ConfigError

    for rule in ({"allow": ["messages"], "deny": ["store"]}, {}):
        with pytest.raises(ConfigError, match="forward_fields"):
            make_settings(
                base_config(models=[upstream_model("http://127.0.0.1:9", forward_fields=rule)])
            )
