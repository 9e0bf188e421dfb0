"""The mock model behaves like a model: tools, structured output, n, stop, logprobs and its
prompt markers, checked with the official client's own parsing helpers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from daemon.providers.mock_json import example
from tests.conftest import MakeClient
from tests.helpers import ledger_rows, wait_for
from tests.surfaces_support import openai_client


class Address(BaseModel):
    street: str
    zip_code: str = Field(min_length=5, max_length=5)


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=120)
    role: Literal["admin", "user"]
    email: str | None
    addresses: list[Address] = Field(min_length=2)
    score: float = Field(gt=0, multiple_of=0.25)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_structured_output_with_parse_and_a_pydantic_model(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    completion = client.chat.completions.parse(
        model="mock", messages=user("Describe a person"), response_format=Person
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert len(person.addresses) >= 2

    plain = client.chat.completions.create(
        model="mock", messages=user("json please"), response_format={"type": "json_object"}
    )
    content = plain.choices[0].message.content
    assert content is not None and content.startswith('{"reply":')


def test_tool_call_with_parse_and_a_strict_pydantic_tool(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    tool = openai.pydantic_function_tool(Person, name="save_person")
    completion = client.chat.completions.parse(
        model="mock", messages=user("Remember me"), tools=[tool], tool_choice="required"
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "save_person"
    assert isinstance(call.function.parsed_arguments, Person)


def test_tool_choice_auto_calls_only_when_asked(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    tools: Any = [
        openai.pydantic_function_tool(Address, name="lookup_address"),
        openai.pydantic_function_tool(Person, name="save_person"),
    ]
    asked = client.chat.completions.create(
        model="mock", messages=user("please save_person for me"), tools=tools
    )
    calls = asked.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "save_person"
    assert calls[0].type == "function"
    Person.model_validate_json(calls[0].function.arguments)

    chatting = client.chat.completions.create(
        model="mock", messages=user("just chatting"), tools=tools
    )
    assert chatting.choices[0].message.tool_calls is None
    assert chatting.choices[0].finish_reason == "stop"

    after_tool: Any = [
        *user("please save_person"),
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "saved as #7"},
    ]
    answer = client.chat.completions.create(model="mock", messages=after_tool, tools=tools)
    assert answer.choices[0].message.content == "The tool returned: saved as #7"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="mock",
            messages=user("x"),
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )
    assert info.value.code is None or isinstance(info.value.code, str)


def test_streamed_tool_call_accumulates_in_the_stream_helper(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    tool = openai.pydantic_function_tool(Person, name="save_person")
    with client.chat.completions.stream(
        model="mock",
        messages=user("go"),
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "save_person"}},
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and isinstance(calls[0].function.parsed_arguments, Person)


def test_n_stop_and_logprobs(make_client: MakeClient) -> None:
    client = openai_client(make_client())
    completion = client.chat.completions.create(
        model="mock",
        messages=user("tell me"),
        n=3,
        stop=["model", "zzz"],
        logprobs=True,
        top_logprobs=4,
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert choice.message.content == "This is ChatVault's mock "
        assert choice.finish_reason == "stop"
        assert choice.logprobs is not None and choice.logprobs.content
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content.rstrip()
        for token in tokens:
            assert token.logprob < 0
            assert len(token.top_logprobs) == 4
            assert token.top_logprobs[0].token == token.token
            assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0 + 1e-9
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3 * 6  # This is ChatVault ' s mock


def test_markers_many_chunks_and_failures(tmp_path: Path, make_client: MakeClient) -> None:
    client = openai_client(make_client())
    chunks = list(
        client.chat.completions.create(model="mock", messages=user("mock:chunks=300"), stream=True)
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 300
    slow = client.chat.completions.create(model="mock", messages=user("mock:slow=0.05 hi"))
    assert slow.choices[0].finish_reason == "stop"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="mock", messages=user("mock:fail"))
    assert info.value.status_code == 502
    rows = wait_for(lambda: ledger_rows(tmp_path / "data" / "ledger.db", "status_code = 502"))
    assert rows[0]["error_type"] == "upstream_error"


SCHEMAS: list[Any] = [
    Person.model_json_schema(),
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}}}},
    {"type": ["string", "null"], "minLength": 20},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "minItems": 2},
    {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 3, "maximum": 4}]},
    {"allOf": [{"properties": {"a": {"type": "string", "format": "date"}}}, {"required": ["a"]}]},
    {"type": "integer", "minimum": 10, "multipleOf": 7},
    {"type": "string", "format": "email"},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_mock_json_values_validate(schema: Any) -> None:
    jsonschema.validate(example(schema), schema)


def test_mock_json_is_bounded_on_recursive_schemas() -> None:
    recursive = {
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
        "$ref": "#/$defs/Node",
    }
    value = example(recursive)
    depth = 0
    while isinstance(value, dict) and "child" in value:
        value = value["child"]
        depth += 1
    assert 0 < depth <= 20
    huge = {"type": "array", "items": {"type": "string"}, "minItems": 10**9}
    assert len(example(huge)) == 64
