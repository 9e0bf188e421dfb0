"""The built-in mock model: in-process, deterministic, free.

It answers like an OpenAI server so that demos, tests and benchmarks exercise the
whole gateway without a model. Replies depend only on the request; token counts are
real counts of the text sent and returned (one token per word or punctuation mark);
streams go word by word. docs/mock.md describes the behaviour in full:

- ``tools``: with ``tool_choice`` ``required`` or a named function, or ``auto`` when
  the last user message names a tool (or says ``mock:tool``), the answer is a tool
  call whose arguments are valid JSON for the tool's ``parameters`` schema; after a
  tool result (a ``tool`` message last) it answers in text;
- ``response_format``: ``json_object`` gives ``{"reply": ...}``, ``json_schema``
  gives JSON valid for the schema (``providers/mock_json.py``);
- ``n`` choices, ``stop`` cuts the text, ``max_tokens`` cuts at whole words,
  ``logprobs``/``top_logprobs`` give plausible log-probabilities;
- markers in the last user message: ``mock:fail`` (an upstream error before any
  output), ``mock:fail-mid-stream`` (an error event after two words),
  ``mock:slow=S`` (wait S seconds, default 1, at most 30, before answering),
  ``mock:chunks=N`` (a reply of N words, at most 10000: a stream of N chunks).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from daemon.config import MockOptions
from daemon.errors import InvalidRequest, UpstreamError
from daemon.providers.base import SSE_DONE, ProbeResult, Reply, UpstreamCall, sse_event
from daemon.providers.mock_json import example
from daemon.providers.mock_text import (
    CHUNK_CHARS,
    count_tokens,
    cut_at_limit,
    cut_at_stop,
    last_user_text,
    logprob_entries,
    message_text,
    prompt_tokens,
    stream_words,
)
from daemon.usage import TokenCounts

_ECHO_WORDS = 24
_SLOW = re.compile(r"mock:slow(?:=(\d+(?:\.\d+)?))?")
_CHUNKS = re.compile(r"mock:chunks=(\d+)")
MAX_SLOW_S = 30.0
MAX_CHUNKS = 10_000
_LOREM = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


@dataclass(slots=True)
class Choice:
    text: str | None  # None: a tool call instead of text
    finish: str
    tool_call: dict[str, Any] | None = None


@dataclass(slots=True)
class Plan:
    choices: list[Choice]
    n_in: int
    logprobs: bool = False
    top_logprobs: int = 0
    fail_mid_stream: bool = False
    delay_s: float = 0.0
    words: list[list[str]] = field(default_factory=list)  # per choice, what to stream

    def tokens(self) -> TokenCounts:
        out = 0
        for c in self.choices:
            if c.tool_call is not None:
                function = c.tool_call["function"]
                out += count_tokens(function["name"]) + count_tokens(function["arguments"])
            else:
                out += count_tokens(c.text or "")
        return TokenCounts(input=self.n_in, output=out)


class MockProvider:
    name = "mock"
    server_address: str | None = None
    server_port: int | None = None

    def __init__(self, model: str, options: MockOptions | None = None) -> None:
        self.model = model
        self.options = options or MockOptions()

    def reply_words(self, messages: list[Any]) -> list[str]:
        if self.options.reply is not None:
            text = self.options.reply
        else:
            said = " ".join(last_user_text(messages).split(maxsplit=_ECHO_WORDS)[:_ECHO_WORDS])
            text = f"This is ChatVault's mock model. You said: {said}".strip()
        return text.split()

    # -- what to answer --------------------------------------------------------------

    def _plan(self, body: dict[str, Any]) -> Plan:
        messages = body.get("messages") or []
        prompt = last_user_text(messages)
        plan = Plan(choices=[], n_in=prompt_tokens(messages))
        chunks = 0
        if "mock:" in prompt:  # markers are rare: the plain path pays one substring test
            if "mock:fail-mid-stream" in prompt:
                plan.fail_mid_stream = True
            elif "mock:fail" in prompt:
                raise UpstreamError("The mock model failed on purpose (mock:fail).")
            slow = _SLOW.search(prompt)
            if slow:
                plan.delay_s = min(float(slow.group(1) or 1.0), MAX_SLOW_S)
            many = _CHUNKS.search(prompt)
            if many:
                chunks = max(1, min(int(many.group(1)), MAX_CHUNKS))
        raw_n = body.get("n")
        n = raw_n if isinstance(raw_n, int) and raw_n > 0 else 1
        tool = self._tool_to_call(body, messages, prompt)
        if tool is not None:
            name = str(tool.get("name") or "")
            arguments = orjson.dumps(example(tool.get("parameters") or {}, name)).decode()
            for _ in range(n):
                call = {
                    "id": "call_" + secrets.token_hex(12),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
                plan.choices.append(Choice(None, "tool_calls", call))
            return plan
        text = self._text(body, messages, chunks)
        text = cut_at_stop(text, body.get("stop"))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        text, cut = cut_at_limit(text, limit)
        finish = "length" if cut else "stop"
        plan.choices = [Choice(text, finish) for _ in range(n)]
        if body.get("logprobs") is True:
            plan.logprobs = True
            top = body.get("top_logprobs")
            plan.top_logprobs = top if isinstance(top, int) and 0 <= top <= 20 else 0
        return plan

    def _text(self, body: dict[str, Any], messages: list[Any], chunks: int) -> str:
        fmt = body.get("response_format")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema" and isinstance(fmt, dict):
            raw = fmt.get("json_schema")
            spec: dict[str, Any] = raw if isinstance(raw, dict) else {}
            return orjson.dumps(
                example(spec.get("schema") or {}, str(spec.get("name") or ""))
            ).decode()
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if last.get("role") == "tool":  # after a tool ran: say what it returned, in text
            result = " ".join(
                message_text(last.get("content")).split(maxsplit=_ECHO_WORDS)[:_ECHO_WORDS]
            )
            text = f"The tool returned: {result}"
        elif chunks:
            text = " ".join(_LOREM[i % len(_LOREM)] for i in range(chunks))
        else:
            text = " ".join(self.reply_words(messages))
        if kind == "json_object":
            return orjson.dumps({"reply": text}).decode()
        return text

    def _tool_to_call(
        self, body: dict[str, Any], messages: list[Any], prompt: str
    ) -> dict[str, Any] | None:
        tools: list[dict[str, Any]] = [
            t["function"]
            for t in body.get("tools") or ()
            if isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
        ]
        choice = body.get("tool_choice")
        if not tools or choice == "none":
            return None
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            for tool in tools:
                if tool.get("name") == wanted:
                    return tool
            raise InvalidRequest(
                f"tool_choice names the function '{wanted}', which is not in 'tools'.",
                param="tool_choice",
            )
        lowered = prompt.lower()
        named = next((t for t in tools if str(t.get("name") or "\0").lower() in lowered), None)
        if choice == "required":
            return named or tools[0]
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if last.get("role") == "tool":
            return None  # it has its result: answer in text, as models do
        if named is not None:
            return named
        return tools[0] if "mock:tool" in prompt else None

    # -- answering -------------------------------------------------------------------

    async def _delay(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _choice_json(self, index: int, choice: Choice, plan: Plan) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_call is not None:
            message["tool_calls"] = [choice.tool_call]
        logprobs = None
        if plan.logprobs and choice.text is not None:
            logprobs = {"content": logprob_entries(choice.text, plan.top_logprobs), "refusal": None}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": choice.finish,
        }

    async def _plan_for(self, body: dict[str, Any]) -> Plan:
        """The plan, made in a worker thread when the prompt is large (a 4 MB prompt
        takes 0.3 s to count); small prompts, nearly all of them, stay on the loop."""
        if _prompt_chars(body.get("messages")) <= CHUNK_CHARS:
            return self._plan(body)
        return await asyncio.to_thread(self._plan, body)

    async def complete(self, call: UpstreamCall) -> Reply:
        plan = await self._plan_for(call.body)  # mock:fail-mid-stream fails streams only
        await self._delay(self.options.latency_s + plan.delay_s)
        tokens = plan.tokens()
        response_id = "chatcmpl-" + secrets.token_hex(12)
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [self._choice_json(i, c, plan) for i, c in enumerate(plan.choices)],
            "usage": _usage(tokens),
        }
        reasons = tuple(c.finish for c in plan.choices)
        return Reply(orjson.dumps(body), tokens, self.model, response_id, reasons)

    async def open_stream(self, call: UpstreamCall) -> AsyncIterator[list[bytes]]:
        plan = await self._plan_for(call.body)
        include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        await self._delay(self.options.latency_s + plan.delay_s)
        return self._stream(plan, include_usage)

    async def _stream(self, plan: Plan, include_usage: bool) -> AsyncIterator[list[bytes]]:
        response_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None
        ) -> bytes:
            payload: dict[str, Any] = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return sse_event(payload)

        choices = plan.choices
        yield [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(choices))]
        words = [stream_words(c.text) if c.text is not None else [] for c in choices]
        for i, c in enumerate(choices):
            if c.tool_call is not None:
                yield [chunk(i, {"tool_calls": [_call_delta(c.tool_call)]})]
                for piece in _pieces(c.tool_call["function"]["arguments"]):
                    yield [
                        chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                    ]
        for position in range(max((len(w) for w in words), default=0)):
            await self._delay(self.options.chunk_delay_s)
            batch = []
            for i, pieces in enumerate(words):
                if position < len(pieces):
                    lp = None
                    if plan.logprobs:
                        lp = {"content": logprob_entries(pieces[position], plan.top_logprobs)}
                    batch.append(chunk(i, {"content": pieces[position]}, lp=lp))
            yield batch
            if plan.fail_mid_stream and position == 1:
                error = {
                    "message": "The mock model failed mid-stream on purpose.",
                    "type": "upstream_error",
                    "param": None,
                    "code": "bad_gateway",
                }
                yield [sse_event({"error": error})]
                return
        yield [chunk(i, {}, c.finish) for i, c in enumerate(choices)]
        if include_usage:
            final = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [],
                "usage": _usage(plan.tokens()),
            }
            yield [sse_event(final)]
        yield [SSE_DONE]

    async def embed(self, call: UpstreamCall) -> Reply:
        raw = call.body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest("The mock model embeds strings only.", param="input")
        await self._delay(self.options.latency_s)
        dims = int(call.body.get("dimensions") or self.options.embedding_dimensions)
        # 2048 inputs of 3072 dimensions take about a second to make: in a thread
        # (the GIL is handed back between vectors), not on the event loop.
        if len(inputs) * dims + sum(map(len, inputs)) <= CHUNK_CHARS:
            return self._embeddings(inputs, dims)
        return await asyncio.to_thread(self._embeddings, inputs, dims)

    def _embeddings(self, inputs: list[str], dims: int) -> Reply:
        n_in = sum(count_tokens(text) for text in inputs)
        # Serialised a vector at a time: orjson holds the GIL for a whole call, and
        # one call over 2048 x 3072 values would stop the event loop for 0.4 s. One
        # join, not two: copying the result is the other cost (about 10 ms per 10 MB).
        tail = {"model": self.model, "usage": {"prompt_tokens": n_in, "total_tokens": n_in}}
        parts = [b'{"object":"list","data":[']
        for i, text in enumerate(inputs):
            if i:
                parts.append(b",")
            item = {"object": "embedding", "index": i, "embedding": _vector(text, dims)}
            parts.append(orjson.dumps(item))
        parts.append(b"]," + orjson.dumps(tail)[1:])
        body = b"".join(parts)
        return Reply(body, TokenCounts(input=n_in), self.model)

    async def probe(self, timeout_s: float) -> ProbeResult:
        return ProbeResult(ok=True, latency_s=0.0)


def _prompt_chars(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        len(m["content"]) if isinstance(m.get("content"), str) else 64
        for m in messages
        if isinstance(m, dict)
    )


def _call_delta(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": 0,
        "id": call["id"],
        "type": "function",
        "function": {"name": call["function"]["name"], "arguments": ""},
    }


def _pieces(text: str, size: int = 24) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _usage(tokens: TokenCounts) -> dict[str, int]:
    return {
        "prompt_tokens": tokens.input,
        "completion_tokens": tokens.output,
        "total_tokens": tokens.total,
    }


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector from the text's hash."""
    seed = hashlib.sha256(text.encode()).digest()
    blocks = -(-dims // 8)
    stream = b"".join(hashlib.sha256(seed + c.to_bytes(4, "big")).digest() for c in range(blocks))
    raw = [v / 2**31 - 1.0 for v in struct.unpack(f">{dims}I", stream[: dims * 4])]
    norm = math.sqrt(math.fsum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
