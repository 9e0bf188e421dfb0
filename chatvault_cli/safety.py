"""What keeps the CLI from leaking keys or letting a server drive the terminal. Standard library only.

- Keys: whitespace around a key (a Kubernetes secret mounted as a file ends in a
  newline) is stripped; a key with whitespace or control characters *inside* it is
  refused with a message that names where it came from, never the key. Every key the
  CLI holds is remembered, and ``redact`` blanks it out of any text that is printed.
- Transport: keys go over plain HTTP only to loopback addresses, unless the operator
  says ``--insecure``.
- Terminal: ``clean`` removes escape sequences and control characters from strings
  the server sent (health messages, upstream errors, trace export errors), so a
  hostile or broken server cannot move the cursor, retitle the window or hide text.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

# Every key this process holds, longest first, so that redaction never leaves a tail.
_SECRETS: list[str] = []
REDACTED = "[redacted]"


class BadKey(ValueError):
    """A key that cannot be sent in an HTTP header. The message never contains the key."""


def strip_key(value: str | None) -> str | None:
    """A key with surrounding whitespace removed; None when nothing is left."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def check_key(key: str, source: str) -> str:
    """Remember ``key`` for redaction and return it; BadKey if it cannot be a header value."""
    remember(key)
    # Keys are printable ASCII without spaces; anything else would be refused by
    # http.client with a ValueError whose message quotes the whole header.
    if not all("!" <= ch <= "~" for ch in key):
        raise BadKey(
            f"the key from {source} contains whitespace or a control character inside it; "
            "check how it was copied"
        )
    return key


def remember(key: str) -> None:
    if key and key not in _SECRETS:
        _SECRETS.append(key)
        _SECRETS.sort(key=len, reverse=True)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def is_loopback(host: str) -> bool:
    """Is ``host`` this machine? Literal addresses and ``localhost`` only: no DNS lookup."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# CSI (ESC [ … final), OSC (ESC ] … BEL or ST), DCS/SOS/PM/APC strings, any other
# two-byte ESC sequence, and the 8-bit CSI.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[\s\S]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
)
_CONTROLS: dict[int, str | None] = {
    **{c: None for c in range(0x20)},
    0x7F: None,
    **{c: None for c in range(0x80, 0xA0)},
    # Bidirectional overrides and isolates reorder what is shown (a "Trojan source").
    **{c: None for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F)},
    # Line breaks and tabs become spaces: table cells and error lines stay one line.
    0x09: " ",
    0x0A: " ",
    0x0D: " ",
}


def clean(text: str) -> str:
    """``text`` without escape sequences and control characters, safe to show."""
    if text.isprintable():
        return text  # the common case, and isprintable() is fast
    return _ESCAPES.sub("", text).translate(_CONTROLS)


def scrub(value: Any) -> Any:
    """``value`` (parsed JSON) with every string, keys included, cleaned and redacted."""
    if isinstance(value, str):
        return clean(redact(value))
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value
