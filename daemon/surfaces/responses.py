"""The Responses API (``POST /v1/responses``) over chat completions, or passed through.

Three pure translations and one stream translator:

- ``to_chat(body)``: a Responses request to a chat completions request (``input``
  as a string or items, ``instructions``, function ``tools`` and function-call
  items, ``text.format``, ``max_output_tokens``, ``top_logprobs``);
- ``response_from_chat(...)``: a chat completion to a Response object;
- ``ResponsesStream``: chat chunks to the Responses event sequence that the official
  client's ``responses.stream()`` consumes (``response.created``, ``…in_progress``,
  ``…output_item.added``, ``…content_part.added``, ``…output_text.delta``, …,
  ``response.completed`` with usage);
- ``observe``: reads ids, usage and errors from Responses events for the relay, for
  translated and passed-through streams alike.

Stateful features (``previous_response_id``, ``store: true``, ``conversation``,
``background``, stored prompts, item references) and built-in tools cannot be
translated: they are refused with a 400 unless the deployment passes requests through
to an upstream that speaks the Responses API itself (``responses_api: native``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from daemon.errors import InvalidRequest, UpstreamIncomplete
from daemon.providers.base import Provider, Reply, UpstreamCall, responses_tokens
from daemon.providers.openai_compat import OpenAICompatProvider
from daemon.providers.sse import event_data
from daemon.relay import StreamTally
from daemon.requests import parse_chat
from daemon.usage import TokenCounts


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


# Request fields that need state on the server: only a native upstream has it.
_STATEFUL = ("previous_response_id", "conversation", "prompt")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Request fields echoed back on the Response object, as OpenAI does.
_ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "user", "metadata")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _refuse(message: str, param: str, code: str = "unsupported_parameter") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def stateful_features(body: dict[str, Any]) -> list[str]:
    """The stateful features a request uses (what only a native upstream can serve)."""
    used = [name for name in _STATEFUL if body.get(name) not in (None, "", {})]
    if body.get("store") is True:
        used.append("store")
    if body.get("background") is True:
        used.append("background")
    return used


# -- request: Responses → chat completions --------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """Translate a Responses request into a chat completions request (raises 400)."""
    used = stateful_features(body)
    if used:
        name = used[0]
        raise _refuse(
            f"'{name}' needs server-side state, which this model's upstream does not "
            "keep: send the whole conversation in 'input' (and leave 'store' unset or "
            "false) instead.",
            name,
        )
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages.extend(_input_messages(body.get("input")))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    _copy_sampling(body, chat)
    _copy_tools(body, chat)
    _copy_text_format(body.get("text"), chat)
    _copy_logprobs(body, chat)
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream") is not None:
        chat["stream"] = body["stream"]
    return chat


def _copy_sampling(body: dict[str, Any], chat: dict[str, Any]) -> None:
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise InvalidRequest(
                "Invalid 'max_output_tokens': expected a positive integer.",
                param="max_output_tokens",
                code="invalid_value",
            )
        # max_tokens rather than max_completion_tokens: every OpenAI-compatible server
        # (Ollama, vLLM, LM Studio) and litellm know it.
        chat["max_tokens"] = limit


def _input_messages(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, str):
        if not data:
            raise InvalidRequest("'input' must not be empty.", param="input")
        return [{"role": "user", "content": data}]
    if not isinstance(data, list) or not data:
        raise InvalidRequest(
            "'input' must be a non-empty string or array of input items.", param="input"
        )
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidRequest(f"Invalid 'input[{i}]': expected an object.", param=f"input[{i}]")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, i))
        elif kind == "function_call":
            _function_call(item, i, messages)
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _required_str(item, "call_id", i),
                    "content": output if isinstance(output, str) else _parts_text(output),
                }
            )
        elif kind == "reasoning":
            continue  # the upstream's own hidden reasoning: nothing to send back
        elif kind == "item_reference":
            raise _refuse(
                "Item references need stored responses, which this model's upstream does "
                "not keep: send the items themselves.",
                f"input[{i}]",
            )
        else:
            raise _refuse(
                f"Input items of type '{kind}' are not supported for this model (only "
                "messages, function calls and function call outputs are translated).",
                f"input[{i}]",
            )
    if not messages:
        raise InvalidRequest("'input' holds no message to answer.", param="input")
    return messages


def _required_str(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'input[{i}].{key}' must be a string.", param=f"input[{i}].{key}")
    return value


def _function_call(item: dict[str, Any], i: int, messages: list[dict[str, Any]]) -> None:
    call = {
        "id": _required_str(item, "call_id", i),
        "type": "function",
        "function": {
            "name": _required_str(item, "name", i),
            "arguments": item.get("arguments") if isinstance(item.get("arguments"), str) else "",
        },
    }
    last = messages[-1] if messages else None
    # Parallel calls are one assistant message in chat completions.
    if last is not None and last["role"] == "assistant" and "tool_calls" in last:
        last["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _message(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = _ROLES.get(str(item.get("role")))
    if role is None:
        raise InvalidRequest(
            f"Invalid 'input[{i}].role': expected user, assistant, system or developer.",
            param=f"input[{i}].role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'input[{i}].content' must be a string or an array of content parts.",
            param=f"input[{i}].content",
        )
    if role != "user":  # chat completions take text only from the other roles
        return {"role": role, "content": _parts_text(content)}
    parts = [_part(part, i, j) for j, part in enumerate(content)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": role, "content": parts[0]["text"]}  # what every server accepts
    return {"role": role, "content": parts}


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    texts = [
        str(p.get("text") or p.get("refusal") or "")
        for p in parts
        if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text", "refusal")
    ]
    return "\n".join(texts)


def _part(part: Any, i: int, j: int) -> dict[str, Any]:
    where = f"input[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text") or "")}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and isinstance(part.get("file_data"), str):
        file = {"file_data": part["file_data"]}
        if part.get("filename"):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    if kind == "input_audio" and isinstance(part.get("input_audio"), dict):
        return {"type": "input_audio", "input_audio": part["input_audio"]}
    raise _refuse(
        f"Content parts of type '{kind}' are not supported for this model (file ids and "
        "URLs need the upstream's file store; send the data inline).",
        where,
    )


def _copy_tools(body: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("'tools' must be an array.", param="tools")
        chat_tools = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise _refuse(
                    f"Tools of type '{kind}' are not supported for this model: only "
                    "function tools are translated (built-in tools need an upstream "
                    "that serves the Responses API itself).",
                    f"tools[{i}]",
                )
            function: dict[str, Any] = _dict(tool.get("function")) or tool  # chat's shape too
            if not isinstance(function.get("name"), str):
                raise InvalidRequest(
                    f"'tools[{i}].name' must be a string.", param=f"tools[{i}].name"
                )
            spec = {
                k: function[k]
                for k in ("name", "description", "parameters", "strict")
                if function.get(k) is not None
            }
            chat_tools.append({"type": "function", "function": spec})
        if chat_tools:
            chat["tools"] = chat_tools
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _refuse(
            "'tool_choice' must be auto, none, required or a function "
            '({"type": "function", "name": ...}) for this model.',
            "tool_choice",
        )


def _copy_text_format(text: Any, chat: dict[str, Any]) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object.", param="text")
    fmt = text.get("format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
        return
    if kind == "json_schema" and isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        schema = {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None
        }
        schema.setdefault("name", "response")
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        return
    raise InvalidRequest(
        "'text.format' must be text, json_object, or json_schema with a 'schema'.",
        param="text.format",
    )


def _copy_logprobs(body: dict[str, Any], chat: dict[str, Any]) -> None:
    top = body.get("top_logprobs")
    include = body.get("include")
    wanted = isinstance(include, list) and "message.output_text.logprobs" in include
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
            raise InvalidRequest(
                "'top_logprobs' must be an integer from 0 to 20.", param="top_logprobs"
            )
        chat["logprobs"] = True
        chat["top_logprobs"] = top
    elif wanted:
        chat["logprobs"] = True


# -- answer: chat completion → Response -----------------------------------------------


def _usage(tokens: TokenCounts) -> dict[str, Any]:
    return {
        "input_tokens": tokens.input,
        "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.output,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.total,
    }


def _logprobs(content: Any) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` entries in the Responses shape."""
    if not isinstance(content, list):
        return []
    out = []
    for entry in content:
        if not isinstance(entry, dict):
            continue
        tops = entry.get("top_logprobs") or []
        out.append(
            {
                "token": entry.get("token", ""),
                "logprob": entry.get("logprob", 0.0),
                "bytes": entry.get("bytes") or [],
                "top_logprobs": [
                    {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0)}
                    for t in tops
                    if isinstance(t, dict)
                ],
            }
        )
    return out


def _status(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _text_item(item_id: str, text: str, logprobs: list[dict[str, Any]], status: str) -> Any:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}],
    }


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Any:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def response_object(
    request: dict[str, Any],
    *,
    response_id: str,
    created: int,
    model: str,
    output: list[Any],
    status: str,
    incomplete: dict[str, str] | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    text = request.get("text") if isinstance(request.get("text"), dict) else None
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "text": text or {"format": {"type": "text"}},
        "previous_response_id": None,
        "reasoning": request.get("reasoning"),
        "store": False,
        "truncation": "disabled",
        "usage": usage,
    }
    for name in _ECHOED:
        response[name] = request.get(name)
    if response["metadata"] is None:
        response["metadata"] = {}
    return response


def response_from_chat(request: dict[str, Any], chat: Any, response_id: str) -> dict[str, Any]:
    """A chat completion (parsed JSON) as a Response object for ``request``."""
    choice: dict[str, Any] = {}
    if isinstance(chat, dict) and isinstance(chat.get("choices"), list) and chat["choices"]:
        first = chat["choices"][0]
        choice = first if isinstance(first, dict) else {}
    message = _dict(choice.get("message"))
    output: list[Any] = []
    content = message.get("content")
    refusal = message.get("refusal")
    if isinstance(content, str) and content:
        logprobs = _dict(choice.get("logprobs"))
        output.append(
            _text_item(_new_id("msg_"), content, _logprobs(logprobs.get("content")), "completed")
        )
    elif isinstance(refusal, str) and refusal:
        item = _text_item(_new_id("msg_"), "", [], "completed")
        item["content"] = [{"type": "refusal", "refusal": refusal}]
        output.append(item)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            output.append(
                _call_item(
                    _new_id("fc_"),
                    str(call.get("id") or _new_id("call_")),
                    str(function.get("name") or ""),
                    str(function.get("arguments") or ""),
                    "completed",
                )
            )
    status, incomplete = _status(choice.get("finish_reason"))
    usage = chat.get("usage") if isinstance(chat, dict) else None
    return response_object(
        request,
        response_id=response_id,
        created=int(chat.get("created") or time.time()) if isinstance(chat, dict) else 0,
        model=str(chat.get("model") or request.get("model") or "")
        if isinstance(chat, dict)
        else "",
        output=output,
        status=status,
        incomplete=incomplete,
        usage=_usage(TokenCounts.from_openai(usage)),
    )


# -- streams: chat chunks → Responses events -----------------------------------------


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    # "event:" as OpenAI sends it: some clients dispatch on it rather than on "type".
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class ResponsesStream:
    """Turns one chat completion stream into the Responses API's event sequence."""

    def __init__(self, request: dict[str, Any], response_id: str, model: str) -> None:
        self.request = request
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[Any] = []  # finished items, in output order
        self.text_item: dict[str, Any] | None = None  # the open message item
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index → open item
        self.call_index: dict[int, int] = {}  # chat tool-call index → output index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return _sse(kind, payload)

    def _snapshot(self, status: str, output: list[Any], **extra: Any) -> dict[str, Any]:
        incomplete = extra.pop("incomplete", None)
        return response_object(
            self.request,
            response_id=self.response_id,
            created=self.created,
            model=self.model,
            output=output,
            status=status,
            incomplete=incomplete,
            usage=extra.pop("usage", None),
        )

    def start(self) -> list[bytes]:
        snapshot = self._snapshot("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if chunk.get("model") and isinstance(chunk["model"], str):
            self.model = chunk["model"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the Responses API has one answer per request
            delta = _dict(choice.get("delta"))
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.extend(self._text_delta(content, choice.get("logprobs")))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out.extend(self._call_delta(call))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        return out

    def _text_delta(self, content: str, logprobs: Any) -> list[bytes]:
        out: list[bytes] = []
        if self.text_item is None:
            self.text_item = _text_item(_new_id("msg_"), "", [], "in_progress")
            self.text_item["content"] = []
            index = len(self.output)
            self.output.append(self.text_item)
            out.append(
                self._event("response.output_item.added", output_index=index, item=self.text_item)
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=self.text_item["id"],
                    output_index=index,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                )
            )
        entries = _logprobs(logprobs.get("content")) if isinstance(logprobs, dict) else []
        self.logprobs.extend(entries)
        self.text.append(content)
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=self.text_item["id"],
                output_index=self.output.index(self.text_item),
                content_index=0,
                delta=content,
                logprobs=entries,
            )
        )
        return out

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        function = _dict(call.get("function"))
        item = self.calls.get(index)
        if item is None:
            out.extend(self._close_text())
            call_id = str(call.get("id") or _new_id("call_"))
            item = _call_item(
                _new_id("fc_"), call_id, str(function.get("name") or ""), "", "in_progress"
            )
            self.calls[index] = item
            self.call_index[index] = len(self.output)
            self.output.append(item)
            out.append(
                self._event(
                    "response.output_item.added", output_index=self.call_index[index], item=item
                )
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.call_index[index],
                    delta=arguments,
                )
            )
        return out

    def _close_text(self) -> list[bytes]:
        item = self.text_item
        if item is None:
            return []
        self.text_item = None
        index = self.output.index(item)
        text = "".join(self.text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs}
        item["content"] = [part]
        item["status"] = "completed"
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=self.logprobs,
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def finish(self) -> list[bytes]:
        out = self._close_text()
        for index, item in self.calls.items():
            item["status"] = "completed"
            position = self.call_index[index]
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=position,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            out.append(self._event("response.output_item.done", output_index=position, item=item))
        status, incomplete = _status(self.finish_reason)
        tokens = TokenCounts.from_openai(self.usage)
        final = self._snapshot(status, self.output, incomplete=incomplete, usage=_usage(tokens))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self._event(kind, response=final))
        return out


async def translate_stream(
    chunks: AsyncIterator[list[bytes]], stream: ResponsesStream
) -> AsyncIterator[list[bytes]]:
    """Chat chunk events in, Responses events out; an error event passes unchanged
    (the official client raises on it) and ends the stream."""
    first = True
    done = False
    try:
        async for batch in chunks:
            out: list[bytes] = stream.start() if first else []
            first = False
            for event in batch:
                data = event_data(event)
                if data == b"[DONE]":
                    done = True
                if data is None or data == b"[DONE]":
                    continue
                try:
                    chunk: Any = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    out.append(event)
                    yield out
                    return
                out.extend(stream.feed(chunk))
            if out:
                yield out
        if not done and stream.finish_reason is None:  # cut short: no response.completed
            raise UpstreamIncomplete(
                "The upstream ended the stream before the answer was complete "
                "(no finish_reason, no [DONE])."
            )
        yield (stream.start() if first else []) + stream.finish()
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


# -- what the relay learns from Responses events ------------------------------------

_DELTA = b'{"type":"response.output_text.delta"'
_FINAL = ("response.completed", "response.incomplete", "response.failed")


def observe(event: bytes, tally: StreamTally) -> bytes | None:
    """Learn ids, text, usage and errors from one Responses event; never drop one."""
    data = event_data(event)
    if data is None:
        return event
    if data.startswith(_DELTA) and not tally.capture:
        tally.content_chunks += 1  # the common event: no JSON parse needed
        return event
    try:
        payload: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return event
    if not isinstance(payload, dict):
        return event
    kind = payload.get("type")
    if payload.get("error") and kind is None:  # the gateway's (or a chat upstream's) error
        error = payload["error"]
        tally.error = error if isinstance(error, dict) else {"message": str(error)}
    elif kind == "error":
        tally.error = {"message": str(payload.get("message") or ""), "code": payload.get("code")}
    elif kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
        tally.content_chunks += 1
        if tally.capture and kind == "response.output_text.delta":
            tally.text.append(str(payload.get("delta") or ""))
    elif isinstance(payload.get("response"), dict):
        response = payload["response"]
        if response.get("id") and not tally.response_id:
            tally.response_id = str(response["id"])
        if response.get("model"):
            tally.response_model = str(response["model"])
        if kind in _FINAL:
            reply = Reply.from_responses_json(b"", response)
            tally.finish_reasons.extend(reply.finish_reasons)
            if isinstance(response.get("usage"), dict):
                tally.tokens = responses_tokens(response["usage"])
                tally.saw_usage = True
            if kind == "response.failed":
                error = response.get("error")
                tally.error = error if isinstance(error, dict) else {"message": "failed"}
    return event


# -- the adapter ---------------------------------------------------------------------


def _native(provider: Provider) -> OpenAICompatProvider | None:
    if isinstance(provider, OpenAICompatProvider) and provider.responses_native:
        return provider
    return None


class ResponsesSurface:
    """One ``/v1/responses`` request: its chat form, and how to answer it per attempt."""

    operation = "responses"
    include_usage = True  # the usage travels in response.completed; nothing to drop

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.stream = body.get("stream") is True
        self.error: InvalidRequest | None = None
        try:
            self.chat_body = to_chat(body)
        except InvalidRequest as exc:
            # A native upstream may serve it (stored state, built-in tools): refuse it
            # only when an attempt would have to translate.
            self.error = exc
            self.chat_body = {"model": body.get("model"), "messages": [_placeholder(body)]}
            if self.stream:
                self.chat_body["stream"] = True
        params = parse_chat(self.chat_body)
        self.model = params.model
        self.observe = observe

    def _passthrough(self, call: UpstreamCall) -> UpstreamCall:
        body = {**self.body, "model": call.body["model"]}
        return UpstreamCall(
            operation=call.operation,
            body=body,
            stream=call.stream,
            headers=call.headers,
            timeout_s=call.timeout_s,
        )

    async def complete(self, provider: Provider, call: UpstreamCall) -> Reply:
        native = _native(provider)
        if native is not None:
            return await native.create_response(self._passthrough(call))
        if self.error is not None:
            raise self.error
        reply = await provider.complete(call)
        response_id = _new_id("resp_")
        try:
            chat = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            chat = {}
        body = orjson.dumps(response_from_chat(self.body, chat, response_id))
        return Reply(body, reply.tokens, reply.response_model, response_id, reply.finish_reasons)

    async def open_stream(
        self, provider: Provider, call: UpstreamCall
    ) -> AsyncIterator[list[bytes]]:
        native = _native(provider)
        if native is not None:
            return await native.open_response_stream(self._passthrough(call))
        if self.error is not None:
            raise self.error
        chunks = await provider.open_stream(call)
        model = str(call.body.get("model") or "")
        return translate_stream(chunks, ResponsesStream(self.body, _new_id("resp_"), model))


def _placeholder(body: dict[str, Any]) -> dict[str, Any]:
    """A stand-in message for a request only a native upstream can serve: what the
    gateway's own accounting (prompt size estimates, spans) reads."""
    data = body.get("input")
    return {"role": "user", "content": data if isinstance(data, str) else ""}
