"""Streams: chat chunks to the Responses event sequence, and what the relay learns from
Responses events (translated and passed-through streams alike)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from daemon.errors import UpstreamIncomplete
from daemon.providers.base import Reply, responses_tokens
from daemon.providers.sse import event_data
from daemon.relay import StreamTally
from daemon.surfaces.common import DONE, as_dict, close_quietly, json_object, new_id
from daemon.surfaces.responses.reply import (
    call_item,
    output_logprobs,
    response_object,
    status_for,
    text_item,
    usage_json,
)
from daemon.usage import TokenCounts


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
            delta = as_dict(choice.get("delta"))
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
            self.text_item = text_item(new_id("msg_"), "", [], "in_progress")
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
        entries = output_logprobs(logprobs.get("content")) if isinstance(logprobs, dict) else []
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
        function = as_dict(call.get("function"))
        item = self.calls.get(index)
        if item is None:
            out.extend(self._close_text())
            call_id = str(call.get("id") or new_id("call_"))
            item = call_item(
                new_id("fc_"), call_id, str(function.get("name") or ""), "", "in_progress"
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
        status, incomplete = status_for(self.finish_reason)
        tokens = TokenCounts.from_openai(self.usage)
        final = self._snapshot(status, self.output, incomplete=incomplete, usage=usage_json(tokens))
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
                done = done or data == DONE
                chunk = json_object(data)
                if chunk is None:
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
        await close_quietly(chunks)


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
    payload = json_object(data)
    if payload is None:
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
