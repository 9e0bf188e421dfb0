"""Reply translation: a chat completion to a Response object."""

from __future__ import annotations

import time
from typing import Any

from daemon.surfaces.common import as_dict, new_id
from daemon.surfaces.responses.request import ECHOED
from daemon.usage import TokenCounts


def usage_json(tokens: TokenCounts) -> dict[str, Any]:
    return {
        "input_tokens": tokens.input,
        "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.output,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.total,
    }


def output_logprobs(content: Any) -> list[dict[str, Any]]:
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


def status_for(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def text_item(item_id: str, text: str, logprobs: list[dict[str, Any]], status: str) -> Any:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Any:
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
    for name in ECHOED:
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
    message = as_dict(choice.get("message"))
    output: list[Any] = []
    content = message.get("content")
    refusal = message.get("refusal")
    if isinstance(content, str) and content:
        logprobs = as_dict(choice.get("logprobs"))
        output.append(
            text_item(
                new_id("msg_"), content, output_logprobs(logprobs.get("content")), "completed"
            )
        )
    elif isinstance(refusal, str) and refusal:
        item = text_item(new_id("msg_"), "", [], "completed")
        item["content"] = [{"type": "refusal", "refusal": refusal}]
        output.append(item)
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            output.append(
                call_item(
                    new_id("fc_"),
                    str(call.get("id") or new_id("call_")),
                    str(function.get("name") or ""),
                    str(function.get("arguments") or ""),
                    "completed",
                )
            )
    status, incomplete = status_for(choice.get("finish_reason"))
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
        usage=usage_json(TokenCounts.from_openai(usage)),
    )
