"""POST /v1/responses with the official client: translated to chat completions (the mock,
an OpenAI-compatible upstream that only speaks chat) and passed through (an upstream
that speaks the Responses API), streamed and not; each request ledgered and metered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import MakeClient
from tests.fakes import Upstream, openai_upstream
from tests.helpers import (
    ADMIN_KEY,
    ServerThread,
    base_config,
    ledger_rows,
    new_key,
    running,
    wait_for,
)
from tests.surfaces_support import metric_value, openai_client, responses_upstream

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def ledger(tmp_path: Path) -> Path:
    return tmp_path / "data" / "ledger.db"


def upstream_config(url: str, **entry: Any) -> dict[str, Any]:
    model = {
        "name": "up",
        "provider": "openai",
        "model": "up-model",
        "api_base": url + "/v1",
        "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
        **entry,
    }
    return base_config(models=[model])


class Weather(BaseModel):
    city: str
    celsius: float
    sunny: bool
    tags: list[str]


def test_create_against_mock_is_ledgered_and_metered(
    tmp_path: Path, make_client: MakeClient
) -> None:
    app = make_client()
    client = openai_client(app)
    before = metric_value(app, "chatvault_model_requests_total", model="mock", status="success")

    response = client.responses.create(
        model="mock", instructions="Answer briefly.", input="hello responses", max_output_tokens=64
    )

    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output_text == "This is ChatVault's mock model. You said: hello responses"
    assert response.usage is not None
    # The mock counts a token per word or mark, plus one per message: system (1 + 3)
    # and user (1 + 2); the reply counts 13.
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 13)
    assert response.max_output_tokens == 64 and response.instructions == "Answer briefly."
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path), "operation = 'responses'"))
    row = rows[0]
    assert (row["model"], row["status_code"], row["stream"]) == ("mock", 200, 0)
    assert (row["input_tokens"], row["output_tokens"]) == (7, 13)
    assert row["cost_usd"] > 0
    after = metric_value(app, "chatvault_model_requests_total", model="mock", status="success")
    assert after == before + 1
    assert metric_value(app, "chatvault_http_requests_total", endpoint="/v1/responses") == 1


def test_stream_helper_against_mock_gets_events_text_and_usage(
    tmp_path: Path, make_client: MakeClient
) -> None:
    client = openai_client(make_client())
    input_items: Any = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "stream this please"}]},
    ]
    with client.responses.stream(model="mock", input=input_items) as stream:
        kinds = []
        deltas = []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()

    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    expected = "This is ChatVault's mock model. You said: stream this please"
    assert "".join(deltas) == expected == final.output_text
    assert final.status == "completed" and final.usage is not None
    assert final.usage.output_tokens == 14
    row = wait_for(lambda: ledger_rows(ledger(tmp_path), "operation = 'responses'"))[0]
    assert (row["stream"], row["status_code"], row["output_tokens"]) == (1, 200, 14)
    assert row["estimated"] == 0


def test_parse_with_a_pydantic_model_against_mock(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    response = client.responses.parse(model="mock", input="weather in Paris", text_format=Weather)
    parsed = response.output_parsed
    assert isinstance(parsed, Weather)
    assert Weather.model_validate_json(response.output_text) == parsed

    with client.responses.stream(model="mock", input="again", text_format=Weather) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Weather)


def test_function_tools_round_trip_against_mock(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": Weather.model_json_schema(),
            "strict": False,
        }
    ]
    first = client.responses.create(
        model="mock", input="What is the weather?", tools=tools, tool_choice="required"
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    Weather.model_validate_json(calls[0].arguments)  # valid for the tool's schema

    # The result goes back as items; with its result the model answers in text.
    follow_up: Any = [
        {"role": "user", "content": "What is the weather?"},
        {
            "type": "function_call",
            "call_id": calls[0].call_id,
            "name": "get_weather",
            "arguments": calls[0].arguments,
        },
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"},
    ]
    second = client.responses.create(model="mock", input=follow_up, tools=tools)
    assert second.output_text == "The tool returned: sunny, 21C"

    # Streamed: the call arrives as function_call_arguments deltas.
    with client.responses.stream(
        model="mock",
        input="weather please",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    streamed = [item for item in final.output if item.type == "function_call"]
    Weather.model_validate_json(streamed[0].arguments)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_abc"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": ""}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
    ],
)
def test_what_cannot_be_translated_is_a_clear_400(
    tmp_path: Path, make_client: MakeClient, extra: dict[str, Any], param: str
) -> None:
    app = make_client()
    body = {"model": "mock", "input": "hi", **extra}
    response = app.post("/v1/responses", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    # Refused requests are on record too.
    rows = wait_for(lambda: ledger_rows(ledger(tmp_path), "status_code = 400"))
    assert rows[0]["operation"] == "responses"


def test_a_request_no_deployment_can_serve_uses_none_of_the_keys_limits(
    make_client: MakeClient, make_settings: Any
) -> None:
    config = base_config()
    app = make_client(config)
    key = new_key(make_settings(config), rpm=1)["key"]
    headers = {"Authorization": f"Bearer {key}"}
    stateful = {"model": "mock", "input": "hi", "previous_response_id": "resp_abc"}
    for _ in range(3):  # refused before admission: not one of the key's one request a minute
        assert app.post("/v1/responses", json=stateful, headers=headers).status_code == 400
    plain = {"model": "mock", "input": "hi"}
    assert app.post("/v1/responses", json=plain, headers=headers).status_code == 200
    assert app.post("/v1/responses", json=plain, headers=headers).status_code == 429


def test_unauthenticated_and_unknown_model(make_client: MakeClient) -> None:
    app = make_client()
    with pytest.raises(openai.AuthenticationError):
        openai_client(app, key="cv-wrong").responses.create(model="mock", input="hi")
    with pytest.raises(openai.NotFoundError):
        openai_client(app).responses.create(model="no-such-model", input="hi")


def test_translated_for_an_upstream_that_only_speaks_chat(
    tmp_path: Path, make_client: MakeClient
) -> None:
    state = Upstream(reply_words=("Bonjour", "from", "upstream"), usage=(17, 4))
    with ServerThread(openai_upstream(state)) as upstream:
        client = openai_client(make_client(upstream_config(upstream.url)))
        response = client.responses.create(
            model="up",
            instructions="Speak French.",
            input="hello",
            max_output_tokens=50,
            temperature=0.3,
            text={"format": {"type": "json_object"}},
        )
        with client.responses.stream(model="up", input="stream it") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()

    assert response.output_text == "Bonjour from upstream"
    assert response.usage is not None and response.usage.input_tokens == 17
    sent = [r for r in state.posts() if r.path == "/v1/chat/completions"]
    assert len(sent) == 2
    assert sent[0].body["model"] == "up-model"
    assert sent[0].body["messages"] == [
        {"role": "system", "content": "Speak French."},
        {"role": "user", "content": "hello"},
    ]
    assert sent[0].body["max_tokens"] == 50 and sent[0].body["temperature"] == 0.3
    assert sent[0].body["response_format"] == {"type": "json_object"}
    assert "input" not in sent[0].body and "instructions" not in sent[0].body
    # The stream asked the upstream for its usage, which lands in response.completed.
    assert sent[1].body["stream_options"] == {"include_usage": True}
    assert "".join(deltas) == "Bonjour from upstream " == final.output_text
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
        17,
        4,
    )
    rows = wait_for(lambda: (r := ledger_rows(ledger(tmp_path))) and len(r) == 2 and r)
    assert [(r["operation"], r["provider"], r["input_tokens"]) for r in rows] == [
        ("responses", "openai", 17),
        ("responses", "openai", 17),
    ]


def test_passed_through_to_an_upstream_that_speaks_responses(
    tmp_path: Path, make_client: MakeClient
) -> None:
    state = Upstream(reply_words=("native", "answer"), usage=(21, 5))
    with ServerThread(responses_upstream(state)) as upstream:
        # store is refused by default (docs/security.md): this operator allows it.
        config = upstream_config(
            upstream.url, responses_api="native", forward_fields={"deny": ["service_tier"]}
        )
        client = openai_client(make_client(config))
        # Stateful features are the upstream's business here: they pass through.
        response = client.responses.create(
            model="up", input="hi", previous_response_id="resp_prev", store=True
        )
        with client.responses.stream(model="up", input="stream", store=False) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()

    assert response.id == "resp_upstream_1" and response.output_text == "native answer"
    sent = [r for r in state.posts() if r.path == "/v1/responses"]
    assert len(sent) == 2
    assert sent[0].body == {
        "model": "up-model",
        "input": "hi",
        "previous_response_id": "resp_prev",
        "store": True,
    }
    assert sent[1].body["stream"] is True and "stream_options" not in sent[1].body
    assert "".join(deltas) == "native answer" == final.output_text
    rows = wait_for(lambda: (r := ledger_rows(ledger(tmp_path))) and len(r) == 2 and r)
    for row in rows:
        assert row["operation"] == "responses" and row["status_code"] == 200
        assert (row["input_tokens"], row["output_tokens"]) == (21, 5)
        assert (row["cached_tokens"], row["reasoning_tokens"]) == (2, 1)
        assert row["estimated"] == 0
    assert [r["stream"] for r in rows] == [0, 1]


def test_upstream_failure_mid_stream_reaches_the_client_and_the_ledger(
    tmp_path: Path, make_client: MakeClient
) -> None:
    client = openai_client(make_client())
    with (
        pytest.raises(openai.APIError),
        client.responses.stream(model="mock", input="mock:fail-mid-stream") as stream,
    ):
        for _ in stream:
            pass
    row = wait_for(lambda: ledger_rows(ledger(tmp_path), "status_code = 502"))[0]
    assert row["operation"] == "responses" and row["stream"] == 1


def test_against_a_real_daemon(tmp_path: Path) -> None:
    """Served by ``chatvault serve`` over a real socket: the SSE framing as clients see it."""
    with running(tmp_path, base_config()) as daemon:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        with client.responses.stream(model="mock", input="over the wire") as stream:
            final = stream.get_final_response()
        assert final.output_text.endswith("You said: over the wire")
        raw = httpx.post(
            daemon.url + "/v1/responses",
            json={"model": "mock", "input": "raw", "stream": True},
            headers=ADMIN,
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.text.startswith("event: response.created\ndata: {")
        row = wait_for(
            lambda: (
                ledger_rows(daemon.ledger_path, "operation = 'responses'")
                and len(ledger_rows(daemon.ledger_path)) == 2
                and ledger_rows(daemon.ledger_path)
            )
        )
        assert all(r["status_code"] == 200 and r["output_tokens"] > 0 for r in row)
