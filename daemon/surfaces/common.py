"""Small pieces the surfaces share: lenient reads of client JSON, SSE events as JSON
objects, and closing the stream a translator wraps."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson

DONE = b"[DONE]"


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def json_object(data: bytes | None) -> dict[str, Any] | None:
    """An SSE event's data as a JSON object; None for no data, ``[DONE]``, bad JSON
    or anything but an object (a translator skips those)."""
    if data is None or data == DONE:
        return None
    try:
        value: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def close_quietly(chunks: AsyncIterator[list[bytes]]) -> None:
    """Close the upstream stream a translator consumed (its connection goes back)."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()
