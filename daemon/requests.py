"""Reading and validating client requests: bounded bodies, JSON, OpenAI's parameters.

Everything here raises ``InvalidRequest`` or ``RequestTooLarge`` with the offending
parameter named, the way OpenAI's own API answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from daemon.config import RequestLimits
from daemon.errors import ClientClosedRequest, InvalidRequest, RequestTimeout, RequestTooLarge

DEFAULT_LIMITS = RequestLimits()


# Set in a request's scope state by the connection when its body deadline passed.
BODY_TIMED_OUT = "chatvault.body_timed_out"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes. Its deadline (server.body_timeout_s) is kept
    by the connection (``daemon/connections.py``), which answers 408 and lets go of
    the client; the request then fails here with the same 408."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        if request.scope["state"].get(BODY_TIMED_OUT):
            raise RequestTimeout("The request body did not arrive in time.") from None
        raise ClientClosedRequest("The client closed the connection mid-request.") from None
    return b"".join(chunks)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this gateway accepts ({limit} bytes).")


# Below this size any body parses in a few milliseconds, whatever its shape.
_SMALL_BODY = 64 * 1024


def json_values_bound(raw: bytes) -> int:
    """An upper bound on the JSON values in ``raw``, without parsing it: every value
    past the first of an array or object follows a comma, and a nested one opens a
    bracket (bytes inside strings count too, so this errs high). One pass: 3-5 ms for
    4 MiB, where three ``count`` calls took 7-10 ms."""
    return len(raw) - len(raw.translate(None, b",[{"))


def parse_json_object(raw: bytes, max_values: int | None = None) -> dict[str, Any]:
    """The body as a JSON object. A large body with more than ``max_values`` values is
    refused before it is parsed: orjson holds the GIL, and 4 MiB of ``[],`` takes about
    a second to parse and free (measured), all of it on the event loop."""
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    if max_values is not None and len(raw) > _SMALL_BODY:
        count = json_values_bound(raw)
        if count > max_values:
            raise InvalidRequest(
                f"The request body has too many JSON values (about {count}; this gateway "
                f"accepts {max_values}: setting requests.max_json_values).",
                code="too_many_values",
            )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


MAX_MODEL_NAME = 256


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("You must provide a model parameter.", param="model")
    # The name is stored in the ledger and shown in terminals: keep it printable.
    if len(model) > MAX_MODEL_NAME or not model.isprintable():
        raise InvalidRequest(
            f"Invalid 'model': at most {MAX_MODEL_NAME} printable characters.", param="model"
        )
    return model


_NUMBER = (int, float)

# parameter: (accepted types, description for the error, minimum, maximum)
_CHAT_PARAMS: dict[str, tuple[tuple[type, ...], str, float | None, float | None]] = {
    "temperature": (_NUMBER, "a number", 0, 2),
    "top_p": (_NUMBER, "a number", 0, 1),
    "presence_penalty": (_NUMBER, "a number", -2, 2),
    "frequency_penalty": (_NUMBER, "a number", -2, 2),
    "max_tokens": ((int,), "an integer", 1, None),
    "max_completion_tokens": ((int,), "an integer", 1, None),
    "n": ((int,), "an integer", 1, 128),
    "seed": ((int,), "an integer", None, None),
    "stream": ((bool,), "a boolean", None, None),
    "stop": ((str, list), "a string or an array of strings", None, None),
    "tools": ((list,), "an array", None, None),
    "user": ((str,), "a string", None, None),
    "stream_options": ((dict,), "an object", None, None),
}


def _check_params(
    body: dict[str, Any], spec: dict[str, tuple[tuple[type, ...], str, float | None, float | None]]
) -> None:
    for name, (types, described, low, high) in spec.items():
        value = body.get(name)
        if value is None:
            continue
        # bool is an int in Python; JSON true is not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InvalidRequest(
                f"Invalid type for '{name}': expected {described}, but got {_json_type(value)}.",
                param=name,
                code="invalid_type",
            )
        number = float(value) if isinstance(value, int | float) else 0.0
        if low is not None and number < low:
            raise InvalidRequest(
                f"Invalid '{name}': {value} is less than the minimum of {low:g}.",
                param=name,
                code="invalid_value",
            )
        if high is not None and number > high:
            raise InvalidRequest(
                f"Invalid '{name}': {value} is greater than the maximum of {high:g}.",
                param=name,
                code="invalid_value",
            )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@dataclass(slots=True)
class ChatParams:
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk of a stream


def _too_many(param: str, count: int, limit: int, setting: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': {count} items, more than this gateway accepts ({limit}: "
        f"setting requests.{setting}).",
        param=param,
        code="too_many_items",
    )


def parse_chat(body: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS) -> ChatParams:
    model = _require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "'messages' must be a non-empty array of message objects.", param="messages"
        )
    if len(messages) > limits.max_chat_messages:
        raise _too_many("messages", len(messages), limits.max_chat_messages, "max_chat_messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Invalid 'messages[{i}]': expected an object with a string 'role'.",
                param=f"messages[{i}]",
            )
    _check_params(body, _CHAT_PARAMS)
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ChatParams(model=model, stream=stream, include_usage=include_usage)


_EMBEDDING_PARAMS: dict[str, tuple[tuple[type, ...], str, float | None, float | None]] = {
    "dimensions": ((int,), "an integer", 1, 16384),
    "encoding_format": ((str,), "a string", None, None),
    "user": ((str,), "a string", None, None),
}


def parse_embeddings(body: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS) -> str:
    model = _require_model(body)
    data = body.get("input")
    # Counted before the items are looked at: the check below is linear in them.
    if isinstance(data, list) and len(data) > limits.max_embedding_inputs:
        raise _too_many("input", len(data), limits.max_embedding_inputs, "max_embedding_inputs")
    valid = (isinstance(data, str) and data != "") or (
        isinstance(data, list)
        and data != []
        and (
            all(isinstance(i, str) for i in data)
            or all(isinstance(i, int) and not isinstance(i, bool) for i in data)
            or all(isinstance(i, list) and all(isinstance(t, int) for t in i) for i in data)
        )
    )
    if not valid:
        raise InvalidRequest(
            "'input' must be a non-empty string, array of strings, or array of token arrays.",
            param="input",
        )
    _check_params(body, _EMBEDDING_PARAMS)
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    _check_embedding_size(body, data, limits)
    return model


def _check_embedding_size(body: dict[str, Any], data: Any, limits: RequestLimits) -> None:
    """The answer's size: inputs x dimensions (a vector per input)."""
    dimensions = body.get("dimensions")
    if dimensions is None:
        return
    if dimensions > limits.max_embedding_dimensions:
        raise InvalidRequest(
            f"Invalid 'dimensions': {dimensions} is greater than this gateway accepts "
            f"({limits.max_embedding_dimensions}: setting requests.max_embedding_dimensions).",
            param="dimensions",
            code="invalid_value",
        )
    inputs = len(data) if isinstance(data, list) and not _is_token_array(data) else 1
    if inputs * dimensions > limits.max_embedding_values:
        raise InvalidRequest(
            f"The request asks for {inputs} vectors of {dimensions} dimensions, more values "
            f"than this gateway returns at once ({limits.max_embedding_values}: setting "
            "requests.max_embedding_values); send fewer inputs per request.",
            param="input",
            code="too_many_values",
        )


def _is_token_array(data: list[Any]) -> bool:
    """One input given as an array of token ids (``[1, 2, 3]``)."""
    return bool(data) and isinstance(data[0], int)
