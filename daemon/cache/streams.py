"""Cached answers and streams: a miss's stream copied as it passes (``collect``), the
``chat.completion`` its chunks add up to (``completion_from_chunks``), and a hit
replayed as SSE chunks (``replay``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from daemon.providers.base import SSE_DONE, sse_event
from daemon.providers.sse import event_data


@dataclass(slots=True)
class Pending:
    """A miss's key, and the answer once known: the reply's bytes or a stream's events."""

    key: str
    body: bytes | None = None
    events: list[bytes] | None = None
    size: int = 0


async def collect(
    events: AsyncIterator[list[bytes]], pending: Pending, limit: int
) -> AsyncIterator[list[bytes]]:
    """Pass a stream's event batches on, keeping a copy for the cache (up to ``limit``
    bytes; a longer answer is not stored)."""
    kept: list[bytes] = []
    pending.events = kept
    async for batch in events:
        if pending.size <= limit:
            kept.extend(batch)
            pending.size += sum(len(e) for e in batch)
        yield batch
    if pending.size > limit:
        pending.events = None


def completion_from_chunks(events: list[bytes] | None) -> bytes | None:
    """The ``chat.completion`` a complete stream of chunks adds up to, or None."""
    if not events:
        return None
    head: dict[str, Any] | None = None
    usage: Any = None
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event_data(event)
        if data is None or data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or chunk.get("error"):
            return None
        head = head or chunk
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or ():
            _fold(choices.setdefault(int(c.get("index", 0)), _new_choice()), c)
    if head is None or not choices or any(c["finish_reason"] is None for c in choices.values()):
        return None
    out: dict[str, Any] = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [_message(i, choices[i]) for i in sorted(choices)],
        "usage": usage,
    }
    if head.get("system_fingerprint") is not None:
        out["system_fingerprint"] = head["system_fingerprint"]
    return orjson.dumps(out)


def _new_choice() -> dict[str, Any]:
    return {"role": "assistant", "content": [], "refusal": [], "tools": {}, "finish_reason": None}


def _fold(state: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta") or {}
    if delta.get("role"):
        state["role"] = delta["role"]
    for field in ("content", "refusal"):
        if isinstance(delta.get(field), str):
            state[field].append(delta[field])
    for call in delta.get("tool_calls") or ():
        tool = state["tools"].setdefault(
            int(call.get("index", 0)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            tool["id"] = call["id"]
        function = call.get("function") or {}
        for part in ("name", "arguments"):
            if isinstance(function.get(part), str):
                tool["function"][part] += function[part]
    if choice.get("finish_reason"):
        state["finish_reason"] = choice["finish_reason"]


def _message(index: int, state: dict[str, Any]) -> dict[str, Any]:
    tools = [state["tools"][i] for i in sorted(state["tools"])]
    message: dict[str, Any] = {
        "role": state["role"],
        "content": "".join(state["content"]) if state["content"] or not tools else None,
        "refusal": "".join(state["refusal"]) if state["refusal"] else None,
    }
    if tools:
        message["tool_calls"] = tools
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": state["finish_reason"],
    }


def replay(body: bytes, include_usage: bool) -> list[bytes]:
    """A cached ``chat.completion`` as the SSE events of a stream: per choice, its
    message in one delta, then its finish reason; the usage chunk if the client asked."""
    completion = orjson.loads(body)
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    out = []
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant")}
        delta["content"] = message.get("content")
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        for d, reason in ((delta, None), ({}, choice.get("finish_reason"))):
            part = {"index": index, "delta": d, "logprobs": None, "finish_reason": reason}
            out.append(sse_event({**base, "choices": [part]}))
    if include_usage:
        out.append(sse_event({**base, "choices": [], "usage": completion.get("usage")}))
    out.append(SSE_DONE)
    return out


async def replay_stream(events: list[bytes]) -> AsyncIterator[bytes]:
    yield b"".join(events)
