"""The mock's reading and writing of text: tokens counted deterministically, prompts
read from messages, log-probabilities, answers cut at a stop sequence or a token limit,
and the pieces a stream sends."""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")
_TOKEN_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")  # tokens with their leading space
_ALTERNATIVES = (" the", " a", ",", ".", " and", " of", " to", " in", " is", " it")
_NON_WORD = re.compile(r"\W")
CHUNK_CHARS = 65536  # one regex call: about 5 ms; then another thread may run


def count_tokens(text: str) -> int:
    if len(text) <= CHUNK_CHARS:
        return len(_TOKEN.findall(text))
    # In pieces cut before a non-word character (no token spans one), so that a
    # thread counting a 4 MB prompt (0.3 s) gives the GIL back between pieces.
    total, start = 0, 0
    while start < len(text):
        cut = _NON_WORD.search(text, start + CHUNK_CHARS)
        end = cut.start() if cut else len(text)
        total += len(_TOKEN.findall(text, start, end))
        start = end
    return total


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_tokens(messages: list[Any]) -> int:
    # One token per message for its role, as real chat templates spend some too.
    return sum(
        1 + count_tokens(message_text(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return ""


def logprob_entries(text: str, top: int) -> list[dict[str, Any]]:
    """Plausible, deterministic log-probabilities for each token of ``text``: mostly
    confident, and the alternatives share what the chosen token leaves."""
    out = []
    for piece in _TOKEN_PIECE.findall(text):
        h = zlib.crc32(piece.encode())
        chosen = -(((h % 1000) / 1000) ** 3) * 4 - 0.0001
        rest = 1.0 - math.exp(chosen)
        alternatives = [
            {
                "token": _ALTERNATIVES[(h + j) % len(_ALTERNATIVES)],
                "logprob": max(math.log(rest * 0.5 ** (j + 1)), -30.0),
                "bytes": list(_ALTERNATIVES[(h + j) % len(_ALTERNATIVES)].encode()),
            }
            for j in range(max(top - 1, 0))
        ]
        first = {"token": piece, "logprob": chosen, "bytes": list(piece.encode())}
        out.append({**first, "top_logprobs": [first, *alternatives] if top else []})
    return out


def cut_at_stop(text: str, stop: Any) -> str:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut = len(text)
    for s in stops:
        if isinstance(s, str) and s:
            at = text.find(s)
            if 0 <= at < cut:
                cut = at
    return text[:cut]  # the finish reason stays "stop", as OpenAI reports it


def cut_at_limit(text: str, limit: Any) -> tuple[str, bool]:
    if not isinstance(limit, int) or limit <= 0:
        return text, False
    kept: list[str] = []
    used = 0
    for word in text.split(" "):
        n = count_tokens(word)
        if used + n > limit:
            return " ".join(kept), True
        kept.append(word)
        used += n
    return text, False


def stream_words(text: str) -> list[str]:
    """The pieces a stream sends: words with their leading space; long runs without
    spaces (JSON) in pieces of 16 characters."""
    out = []
    for word in re.findall(r"\s*\S+", text):
        while len(word) > 16:
            out.append(word[:16])
            word = word[16:]
        out.append(word)
    return out
