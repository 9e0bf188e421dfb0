"""Request translation: a Responses API request to a chat completions request."""

from __future__ import annotations

from typing import Any

from daemon.errors import InvalidRequest
from daemon.surfaces.common import as_dict

# Request fields that need state on the server: only a native upstream has it.
_STATEFUL = ("previous_response_id", "conversation", "prompt")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Request fields echoed back on the Response object, as OpenAI does.
ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "user", "metadata")


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
            function: dict[str, Any] = as_dict(tool.get("function")) or tool  # chat's shape too
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
