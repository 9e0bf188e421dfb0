"""Every GenAI attribute ChatVault emits, checked against the semantic conventions.

Spans come from a real daemon through the real OTLP/gRPC receiver, for a chat, a
streamed chat, embeddings, a tool-calling exchange and a failed attempt. Names are
checked against the registry shipped in ``opentelemetry-semantic-conventions`` (the
``gen_ai`` attribute constants), values against each attribute's type, and the
message attributes against the conventions' JSON schemas
(``docs/gen-ai/gen-ai-input-messages.json`` and ``gen-ai-output-messages.json`` of
open-telemetry/semantic-conventions; the parts used here, copied below).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import jsonschema
import openai
import pytest
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.otlp import OTLPReceiver, ReceivedSpan
from tests.helpers import ServerThread, base_config, client_for, free_port, running, wait_for

CLIENT = 3
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BSP_EXPORT_TIMEOUT": "2000"}
CONVERSATION = "conv_5j66UpCpwteGg4YSxUnt7lPY"

# The registry's gen_ai.* names, from the package that ships them.
REGISTERED = {
    value
    for name, value in vars(gen_ai_attributes).items()
    if name.startswith("GEN_AI_") and isinstance(value, str)
}
# Each attribute ChatVault may emit, and its type in the conventions.
TYPES: dict[str, type | tuple[type, ...]] = {
    "gen_ai.operation.name": str,
    "gen_ai.provider.name": str,
    "gen_ai.request.model": str,
    "gen_ai.response.model": str,
    "gen_ai.response.id": str,
    "gen_ai.conversation.id": str,
    "gen_ai.output.type": str,
    "gen_ai.request.stream": bool,
    "gen_ai.request.temperature": float,
    "gen_ai.request.top_p": float,
    "gen_ai.request.frequency_penalty": float,
    "gen_ai.request.presence_penalty": float,
    "gen_ai.request.max_tokens": int,
    "gen_ai.request.seed": int,
    "gen_ai.request.choice.count": int,
    "gen_ai.request.stop_sequences": tuple,
    "gen_ai.request.encoding_formats": tuple,
    "gen_ai.embeddings.dimension.count": int,
    "gen_ai.response.finish_reasons": tuple,
    "gen_ai.response.time_to_first_chunk": float,
    "gen_ai.usage.input_tokens": int,
    "gen_ai.usage.output_tokens": int,
    "gen_ai.usage.cache_read.input_tokens": int,
    "gen_ai.usage.reasoning.output_tokens": int,
    "gen_ai.input.messages": str,  # JSON (the conventions allow a string on spans)
    "gen_ai.output.messages": str,
}
# Attributes of the embeddings span in the conventions (plus the common ones).
EMBEDDINGS_ONLY = {"gen_ai.request.encoding_formats", "gen_ai.embeddings.dimension.count"}
NOT_ON_EMBEDDINGS = {
    "gen_ai.usage.output_tokens",
    "gen_ai.request.stream",
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.response.finish_reasons",
    "gen_ai.request.temperature",
}

_PARTS = {
    "anyOf": [
        {"$ref": "#/$defs/TextPart"},
        {"$ref": "#/$defs/ToolCallRequestPart"},
        {"$ref": "#/$defs/ToolCallResponsePart"},
        {"$ref": "#/$defs/GenericPart"},
    ]
}
_DEFS = {
    "TextPart": {
        "type": "object",
        "properties": {"type": {"const": "text"}, "content": {"type": "string"}},
        "required": ["type", "content"],
    },
    "ToolCallRequestPart": {
        "type": "object",
        "properties": {
            "type": {"const": "tool_call"},
            "id": {"type": ["string", "null"]},
            "name": {"type": "string"},
            "arguments": {},
        },
        "required": ["type", "name"],
    },
    "ToolCallResponsePart": {
        "type": "object",
        "properties": {
            "type": {"const": "tool_call_response"},
            "id": {"type": ["string", "null"]},
            "response": {},
        },
        "required": ["type", "response"],
    },
    "GenericPart": {
        "type": "object",
        "properties": {"type": {"type": "string", "not": {"enum": ["text", "tool_call"]}}},
        "required": ["type"],
    },
}
INPUT_SCHEMA = {
    "$defs": _DEFS,
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "role": {"type": "string"},
            "parts": {"type": "array", "items": _PARTS},
            "name": {"type": ["string", "null"]},
        },
        "required": ["role", "parts"],
    },
}
OUTPUT_SCHEMA = {
    "$defs": _DEFS,
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "role": {"type": "string"},
            "parts": {"type": "array", "items": _PARTS},
            "finish_reason": {
                "anyOf": [
                    {"enum": ["stop", "length", "content_filter", "tool_call", "error"]},
                    {"type": "string"},
                ]
            },
        },
        "required": ["role", "parts", "finish_reason"],
    },
}

USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 7,
    "total_tokens": 27,
    "prompt_tokens_details": {"cached_tokens": 12},
    "completion_tokens_details": {"reasoning_tokens": 3},
}
TOOL_CALL = {
    "id": "call_VSPygqKTWdrhaFErNvMV18Yl",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
}


def upstream_app() -> Starlette:
    """An OpenAI-compatible upstream that calls tools and reports cached/reasoning tokens."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        created = int(time.time())
        if body.get("stream"):

            async def events() -> Any:
                base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": created}
                base["model"] = body["model"]
                for delta, finish in (({"role": "assistant", "content": "Rain"}, None),):
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                    yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
                yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': USAGE})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        if body.get("tools") and body["messages"][-1]["role"] == "user":
            message: dict[str, Any] = {"role": "assistant", "content": None}
            message["tool_calls"] = [TOOL_CALL]
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": "Rainy, 57°F."}, "stop"
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": created,
                "model": body["model"] + "-2024",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": USAGE,
            }
        )

    async def embeddings(request: Request) -> Response:
        body = await request.json()
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": body["model"],
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "up", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with OTLPReceiver() as receiver, ServerThread(upstream_app()) as upstream:
        tracing = {
            "enabled": True,
            "endpoint": receiver.endpoint,
            "capture_content": True,
            "trust_incoming_context": True,
        }
        config = base_config(monitoring={"tracing": tracing})
        config["models"] = [
            {
                "name": "remote",
                "provider": "openai",
                "model": "up",
                "api_base": upstream.url + "/v1",
            },
            {
                "name": "vectors",
                "provider": "openai",
                "model": "embed-up",
                "api_base": upstream.url + "/v1",
            },
            {  # nothing listens there: the attempt fails
                "name": "broken",
                "provider": "openai",
                "model": "gone",
                "api_base": f"http://127.0.0.1:{free_port()}/v1",
            },
        ]
        with running(tmp_path_factory.mktemp("genai"), config, env=FAST_EXPORT) as daemon:
            yield daemon, receiver


def genai_span(gateway: Any, call: Any) -> ReceivedSpan:
    """Make one call with a fresh trace; the CLIENT span it produced."""
    daemon, receiver = gateway
    trace_id = secrets.token_hex(16)
    headers = {
        "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        "x-chatvault-conversation-id": CONVERSATION,
    }
    call(client_for(daemon.url, headers=headers))

    def found() -> ReceivedSpan | None:
        with receiver.lock:
            spans = [s for s in receiver.spans if s.trace_id == trace_id and s.kind == CLIENT]
        return spans[0] if spans else None

    span: ReceivedSpan = wait_for(found, timeout=15)
    check_conventions(span)
    return span


def check_conventions(span: ReceivedSpan) -> None:
    a = span.attributes
    genai = {k for k in a if k.startswith("gen_ai.")}
    assert genai <= REGISTERED, genai - REGISTERED
    for key in genai:
        assert key in TYPES, f"{key} is emitted but not checked here"
        assert isinstance(a[key], TYPES[key]), (key, a[key])
        if TYPES[key] is tuple:
            assert a[key] and all(isinstance(v, str) for v in a[key]), key
        if TYPES[key] is int:
            assert not isinstance(a[key], bool) and a[key] >= 0, key
    operation = a["gen_ai.operation.name"]
    assert operation in ("chat", "embeddings")
    assert span.kind == CLIENT
    assert span.name == f"{operation} {a['gen_ai.request.model']}"
    assert a["gen_ai.provider.name"] == "openai"
    assert "server.port" in a if "server.address" in a else True
    assert a["gen_ai.conversation.id"] == CONVERSATION
    if operation == "embeddings":
        assert not genai & NOT_ON_EMBEDDINGS, genai & NOT_ON_EMBEDDINGS
    else:
        assert not genai & EMBEDDINGS_ONLY
        assert a.get("gen_ai.request.stream", True) is True  # only set when streaming
        if "gen_ai.request.choice.count" in a:
            assert a["gen_ai.request.choice.count"] != 1
        jsonschema.validate(json.loads(a["gen_ai.input.messages"]), INPUT_SCHEMA)
        if "gen_ai.output.messages" in a:
            jsonschema.validate(json.loads(a["gen_ai.output.messages"]), OUTPUT_SCHEMA)
    if "error.type" in a:
        assert span.status_code == 2  # ERROR
        assert not {k for k in genai if k.startswith("gen_ai.usage.")}, "unknown: omitted"


def test_chat(gateway: Any) -> None:
    span = genai_span(
        gateway,
        lambda c: c.chat.completions.create(
            model="remote",
            messages=[
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            ],
            temperature=0.5,
            n=1,
            response_format={"type": "json_object"},
        ),
    )
    a = span.attributes
    assert a["gen_ai.request.temperature"] == 0.5
    assert "gen_ai.request.choice.count" not in a and "gen_ai.request.stream" not in a
    assert a["gen_ai.output.type"] == "json"
    assert a["gen_ai.response.model"] == "up-2024"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (20, 7)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 12
    assert a["gen_ai.usage.reasoning.output_tokens"] == 3
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "You are a weather bot."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather in Paris?"}]},
    ]
    assert json.loads(a["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Rainy, 57°F."}],
            "finish_reason": "stop",
        }
    ]


def test_streamed_chat(gateway: Any) -> None:
    def call(c: Any) -> None:
        for _ in c.chat.completions.create(
            model="remote", messages=[{"role": "user", "content": "Weather?"}], stream=True
        ):
            pass

    a = genai_span(gateway, call).attributes
    assert a["gen_ai.request.stream"] is True
    assert 0 <= a["gen_ai.response.time_to_first_chunk"] < 10
    assert a["gen_ai.usage.output_tokens"] == 7 and a["gen_ai.usage.cache_read.input_tokens"] == 12
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"] == [
        {"type": "text", "content": "Rain"}
    ]


def test_embeddings(gateway: Any) -> None:
    a = genai_span(
        gateway,
        lambda c: c.embeddings.create(
            model="vectors", input="hello", dimensions=2, encoding_format="float"
        ),
    ).attributes
    assert a["gen_ai.operation.name"] == "embeddings"
    assert a["gen_ai.request.encoding_formats"] == ("float",)
    assert a["gen_ai.embeddings.dimension.count"] == 2
    assert a["gen_ai.usage.input_tokens"] == 5


def test_tool_calling(gateway: Any) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
            },
        }
    ]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = genai_span(
        gateway, lambda c: c.chat.completions.create(model="remote", messages=ask, tools=tools)
    ).attributes
    assert first["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert json.loads(first["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": TOOL_CALL["id"],
                    "name": "get_weather",
                    "arguments": {"location": "Paris"},
                }
            ],
            "finish_reason": "tool_call",
        }
    ]
    history = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": TOOL_CALL["id"], "content": "rainy, 57°F"},
    ]
    second = genai_span(
        gateway,
        lambda c: c.chat.completions.create(model="remote", messages=history, tools=tools),
    ).attributes
    messages = json.loads(second["gen_ai.input.messages"])
    assert messages[1] == {
        "role": "assistant",
        "parts": [
            {
                "type": "tool_call",
                "id": TOOL_CALL["id"],
                "name": "get_weather",
                "arguments": {"location": "Paris"},
            }
        ],
    }
    assert messages[2] == {
        "role": "tool",
        "parts": [{"type": "tool_call_response", "id": TOOL_CALL["id"], "response": "rainy, 57°F"}],
    }


def test_failed_attempt(gateway: Any) -> None:
    def call(c: Any) -> None:
        with pytest.raises(openai.APIStatusError, match=r"502|upstream"):
            c.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])

    a = genai_span(gateway, call).attributes
    assert a["error.type"].startswith("upstream")
    assert "gen_ai.usage.input_tokens" not in a and "gen_ai.usage.output_tokens" not in a
