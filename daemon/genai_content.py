"""Prompt and completion content in the GenAI conventions' JSON shapes, bounded in size.

Only called with ``monitoring.tracing.capture_content`` on, and only for spans that
record. OpenAI chat messages become ``{"role", "parts": [...]}`` objects (the schemas
``gen-ai-input-messages.json`` and ``gen-ai-output-messages.json`` of the OpenTelemetry
semantic conventions): text parts, ``tool_call`` parts for an assistant's tool calls,
``tool_call_response`` parts for tool results, ``uri``/``blob``/``file`` parts for
images, audio and files.

System and developer messages stay in ``gen_ai.input.messages``, in the order sent:
the Chat Completions API carries them in the chat history, and the conventions say
instructions that are part of the history are recorded there (``gen_ai.system_instructions``
is for APIs that take instructions separately).

Every value is bounded by a character budget per attribute (``max_content_chars``):
text is cut at the budget, a blob that does not fit is left out, and later messages
are dropped once it is spent. A collector outage then holds at most the queue size
times the budget in memory.
"""

from __future__ import annotations

from typing import Any

import orjson

# The JSON around each part and message is charged too (about its length), so that
# many tiny messages cannot exceed the budget through their framing alone.
_PART_COST = 30  # {"type":"text","content":""},
_MESSAGE_COST = 24  # {"role":"","parts":[]}, without the role

# OpenAI finish reasons to the output schema's FinishReason values where they differ.
_FINISH = {"tool_calls": "tool_call", "function_call": "tool_call"}


class Budget:
    """Characters of content left for one attribute."""

    __slots__ = ("cut", "left")

    def __init__(self, chars: int) -> None:
        self.left = chars
        self.cut = False  # something was shortened or left out

    def spend(self, chars: int) -> bool:
        """Charge ``chars`` of structure; False (and nothing charged) if they do not fit."""
        if chars > self.left:
            self.left = 0
            self.cut = True
            return False
        self.left -= chars
        return True

    def take(self, text: str) -> str | None:
        """``text``, cut to what is left; None once nothing is left."""
        self.left -= _PART_COST
        if self.left <= 0:
            self.left = 0
            self.cut = True
            return None
        if len(text) > self.left:
            text = text[: self.left]
            self.left = 0
            self.cut = True
            return text
        self.left -= len(text)
        return text

    def fits(self, size: int) -> bool:
        """Take ``size`` characters whole (a blob cut in half is garbage), or none."""
        if size + _PART_COST > self.left:
            self.cut = True
            return False
        self.left -= size + _PART_COST
        return True


def _text(text: str, budget: Budget) -> dict[str, Any] | None:
    taken = budget.take(text)
    return None if taken is None else {"type": "text", "content": taken}


def _arguments(raw: Any, budget: Budget) -> Any:
    """Tool-call arguments as the object they encode (the schema's example), else the text."""
    if not isinstance(raw, str):
        return None
    taken = budget.take(raw)
    if taken is None or len(taken) < len(raw):
        return taken  # a cut JSON text no longer parses: keep the text
    try:
        return orjson.loads(taken)
    except orjson.JSONDecodeError:
        return taken


def _tool_calls(calls: Any, budget: Budget) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if not isinstance(calls, list):
        return parts
    for call in calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if not isinstance(function, dict):
            continue
        name = str(function.get("name") or "")
        call_id = call.get("id") if isinstance(call.get("id"), str) else None
        if not budget.spend(48 + len(name) + len(call_id or "")):
            break
        part: dict[str, Any] = {
            "type": "tool_call",
            "id": call_id,
            "name": name,
            "arguments": _arguments(function.get("arguments"), budget),
        }
        parts.append(part)
    return parts


def _content_part(item: dict[str, Any], budget: Budget) -> dict[str, Any] | None:
    """One OpenAI content part (text, image, audio, file) as a conventions part."""
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        return _text(item["text"], budget)
    if kind == "image_url":
        image = item.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            return None
        if url.startswith("data:"):
            meta, _, data = url.partition(",")
            mime = meta[5:].split(";", 1)[0] or None
            if not budget.fits(len(data)):
                return None
            return {"type": "blob", "modality": "image", "mime_type": mime, "content": data}
        uri = budget.take(url)
        return None if uri is None else {"type": "uri", "modality": "image", "uri": uri}
    if kind == "input_audio":
        audio = item.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            return None
        if not budget.fits(len(audio["data"])):
            return None
        fmt = audio.get("format")
        return {
            "type": "blob",
            "modality": "audio",
            "mime_type": f"audio/{fmt}" if isinstance(fmt, str) else None,
            "content": audio["data"],
        }
    if kind == "file":
        file = item.get("file")
        if isinstance(file, dict) and isinstance(file.get("file_id"), str):
            budget.take("")
            return {"type": "file", "modality": "document", "file_id": file["file_id"]}
        return None
    if isinstance(kind, str):
        budget.take("")
        return {"type": kind}  # the schema's GenericPart: the kind, without its data
    return None


def _parts(content: Any, budget: Budget) -> list[dict[str, Any]]:
    if isinstance(content, str):
        part = _text(content, budget)
        return [part] if part else []
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for item in content:
            if isinstance(item, dict):
                part = _content_part(item, budget)
                if part is not None:
                    parts.append(part)
    return parts


def _plain(content: Any) -> str:
    """A tool result's text (a string, or the text of its parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def input_messages(messages: Any, max_chars: int) -> tuple[str, bool]:
    """``gen_ai.input.messages`` as JSON, and whether anything was cut to fit."""
    budget = Budget(max_chars)
    out: list[dict[str, Any]] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else "user"
        if not budget.spend(_MESSAGE_COST + len(role)):
            break  # later messages are left out
        content = message.get("content")
        if role in ("tool", "function"):
            response = budget.take(_plain(content))
            parts: list[dict[str, Any]] = []
            if response is not None:
                call_id = message.get("tool_call_id")
                parts.append(
                    {
                        "type": "tool_call_response",
                        "id": call_id if isinstance(call_id, str) else None,
                        "response": response,
                    }
                )
            out.append({"role": "tool", "parts": parts})
            continue
        parts = _parts(content, budget)
        if role == "assistant":
            parts.extend(_tool_calls(message.get("tool_calls"), budget))
        entry: dict[str, Any] = {"role": role, "parts": parts}
        name = message.get("name")
        if isinstance(name, str):
            entry["name"] = name
        out.append(entry)
    return orjson.dumps(out).decode(), budget.cut


def _finish(reason: Any, error: bool) -> str:
    if isinstance(reason, str) and reason:
        return _FINISH.get(reason, reason)
    return "error" if error else "stop"


def output_from_text(
    text: str, finish_reasons: tuple[str, ...], max_chars: int, *, error: bool = False
) -> tuple[str, bool]:
    """``gen_ai.output.messages`` for one streamed reply (its text only)."""
    budget = Budget(max_chars)
    part = _text(text, budget)
    message = {
        "role": "assistant",
        "parts": [part] if part else [],
        "finish_reason": _finish(finish_reasons[0] if finish_reasons else None, error),
    }
    return orjson.dumps([message]).decode(), budget.cut


def output_from_body(body: bytes, max_chars: int) -> tuple[str, bool] | None:
    """``gen_ai.output.messages`` from a Chat Completions response, one message per choice."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    choices = parsed.get("choices") if isinstance(parsed, dict) else None
    if not isinstance(choices, list):
        return None
    budget = Budget(max_chars)
    out: list[dict[str, Any]] = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        parts = _parts(message.get("content"), budget)
        parts.extend(_tool_calls(message.get("tool_calls"), budget))
        role = message.get("role")
        out.append(
            {
                "role": role if isinstance(role, str) else "assistant",
                "parts": parts,
                "finish_reason": _finish(choice.get("finish_reason"), False),
            }
        )
    return orjson.dumps(out).decode(), budget.cut
