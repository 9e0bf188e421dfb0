"""Legacy text completions (``POST /v1/completions``) over chat completions.

The prompt becomes one user message; sampling parameters pass unchanged; ``logprobs``
(an integer here) becomes chat's ``logprobs``/``top_logprobs``; the answer and its
stream chunks are rewritten into the ``text_completion`` shape. What has no chat
equivalent is refused with a 400 naming the parameter: several prompts in one
request, token-id prompts, ``suffix``, ``echo`` and ``best_of`` above ``n``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from daemon.errors import InvalidRequest
from daemon.providers.base import Provider, Reply, UpstreamCall, sse_event
from daemon.providers.sse import event_data
from daemon.relay import StreamTally, observe
from daemon.requests import parse_chat
from daemon.surfaces.common import DONE, as_dict, as_str, close_quietly, json_object, new_id

# Passed to the chat request as they are: same names, same meaning.
_SAME = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "logit_bias",
    "stream",
    "stream_options",
)


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise InvalidRequest(
            "Only one prompt per request is supported: send the prompts as separate requests.",
            param="prompt",
            code="unsupported_parameter",
        )
    if isinstance(prompt, list) and prompt:
        raise InvalidRequest(
            "Token-id prompts are not supported: send the prompt as text.",
            param="prompt",
            code="unsupported_parameter",
        )
    raise InvalidRequest("'prompt' must be a string.", param="prompt")


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """Translate a legacy completions request into a chat completions request."""
    prompt = _prompt(body)
    for name in ("suffix", "echo"):
        if body.get(name) not in (None, False, ""):
            raise InvalidRequest(
                f"'{name}' is not supported: it has no chat completions equivalent.",
                param=name,
                code="unsupported_parameter",
            )
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise InvalidRequest(
            "'best_of' is not supported (other than equal to 'n').",
            param="best_of",
            code="unsupported_parameter",
        )
    chat: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    chat["messages"] = [{"role": "user", "content": prompt}]
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 5:
            raise InvalidRequest(
                "'logprobs' must be an integer from 0 to 5.", param="logprobs", code="invalid_value"
            )
        chat["logprobs"] = True
        chat["top_logprobs"] = logprobs
    return chat


def completion_logprobs(content: Any, offset: int = 0) -> dict[str, Any] | None:
    """Chat's ``logprobs.content`` as the legacy shape (parallel arrays)."""
    if not isinstance(content, list):
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in content:
        if not isinstance(entry, dict):
            continue
        token = str(entry.get("token", ""))
        tokens.append(token)
        token_logprobs.append(entry.get("logprob", 0.0))
        top.append(
            {
                str(t.get("token", "")): t.get("logprob", 0.0)
                for t in entry.get("top_logprobs") or ()
                if isinstance(t, dict)
            }
        )
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _finish(reason: Any) -> Any:
    # A legacy completion cannot call tools; anything else keeps its name.
    return "stop" if reason in ("tool_calls", "function_call") else reason


def completion_from_chat(chat: Any) -> dict[str, Any]:
    if not isinstance(chat, dict):
        chat = {}
    choices = []
    for i, choice in enumerate(chat.get("choices") or ()):
        if not isinstance(choice, dict):
            continue
        message = as_dict(choice.get("message"))
        logprobs = as_dict(choice.get("logprobs"))
        choices.append(
            {
                "text": message.get("content") or "",
                "index": choice.get("index", i),
                "logprobs": completion_logprobs(logprobs.get("content")),
                "finish_reason": _finish(choice.get("finish_reason")),
            }
        )
    out: dict[str, Any] = {
        "id": "cmpl-" + str(chat.get("id") or new_id("")).removeprefix("chatcmpl-"),
        "object": "text_completion",
        "created": chat.get("created") or 0,
        "model": chat.get("model") or "",
        "choices": choices,
    }
    if chat.get("system_fingerprint"):
        out["system_fingerprint"] = chat["system_fingerprint"]
    if chat.get("usage") is not None:
        out["usage"] = chat["usage"]
    return out


def chunk_from_chat(chunk: dict[str, Any], offsets: dict[int, int]) -> dict[str, Any] | None:
    """One chat chunk as a legacy completion chunk; None for a chunk that carries
    nothing a legacy client reads (the role-only first chunk)."""
    choices = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = as_dict(choice.get("delta"))
        text = as_str(delta.get("content"))
        reason = choice.get("finish_reason")
        if not text and not reason:
            continue
        index = choice.get("index", 0)
        logprobs = as_dict(choice.get("logprobs"))
        start = offsets.get(index, 0)
        offsets[index] = start + len(text)
        choices.append(
            {
                "text": text,
                "index": index,
                "logprobs": completion_logprobs(logprobs.get("content"), start),
                "finish_reason": _finish(reason),
            }
        )
    usage = chunk.get("usage")
    if not choices and not usage:
        return None
    out: dict[str, Any] = {
        "id": "cmpl-" + str(chunk.get("id") or "").removeprefix("chatcmpl-"),
        "object": "text_completion",
        "created": chunk.get("created") or 0,
        "model": chunk.get("model") or "",
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


async def translate_stream(chunks: AsyncIterator[list[bytes]]) -> AsyncIterator[list[bytes]]:
    offsets: dict[int, int] = {}
    try:
        async for batch in chunks:
            out: list[bytes] = []
            for event in batch:
                data = event_data(event)
                if data == DONE:
                    out.append(event)
                    continue
                chunk = json_object(data)
                if chunk is None:
                    continue
                if chunk.get("error"):
                    out.append(event)
                    continue
                converted = chunk_from_chat(chunk, offsets)
                if converted is not None:
                    out.append(sse_event(converted))
            if out:
                yield out
    finally:
        await close_quietly(chunks)


class CompletionsSurface:
    """One ``/v1/completions`` request: its chat form, and its answer translated back."""

    operation = "text_completion"

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.chat_body = to_chat(body)
        params = parse_chat(self.chat_body)
        self.model = params.model
        self.stream = params.stream
        self.include_usage = params.include_usage
        # Legacy chunks carry id, model, finish reasons and usage where chat chunks do.
        self.observe: Callable[[bytes, StreamTally], bytes | None] = observe

    def check_servable(self, providers: Iterable[Provider]) -> None:
        """Every deployment can translate a legacy completion."""

    async def complete(self, provider: Provider, call: UpstreamCall) -> Reply:
        reply = await provider.complete(call)
        try:
            chat = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            chat = {}
        out = completion_from_chat(chat)
        return Reply(
            orjson.dumps(out),
            reply.tokens,
            reply.response_model,
            str(out["id"]),
            reply.finish_reasons,
        )

    async def open_stream(
        self, provider: Provider, call: UpstreamCall
    ) -> AsyncIterator[list[bytes]]:
        return translate_stream(await provider.open_stream(call))
