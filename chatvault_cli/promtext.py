"""A small parser for the Prometheus text format, enough for ChatVault's own /metrics.

prometheus_client's parser would do, but importing that package costs a tenth of a
second that ``chatvault metrics top --once`` does not need to spend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]


class ParseError(ValueError):
    """The page is not the Prometheus text format; the message says which line."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        if text[i] != '"':
            raise ValueError(f"bad label value at {text[i : i + 20]!r}")
        i += 1
        value: list[str] = []
        while text[i] != '"':
            if text[i] == "\\":
                i += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[i], text[i]))
            else:
                value.append(text[i])
            i += 1
        out[key] = "".join(value)
        i += 1
    return out


def _value(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    return float(text)


def parse(text: str) -> list[Sample]:
    """Every sample line; comments and the OpenMetrics ``# EOF`` are skipped.

    Raises ParseError on the first line that is not a sample.
    """
    samples = []
    # Lines end at "\n" only: splitlines() would also break inside a label value at a
    # carriage return, form feed or U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_sample(line))
        except (ValueError, IndexError):
            raise ParseError(f"line {number} is not a sample: {line[:60]!r}") from None
    return samples


def _sample(line: str) -> Sample:
    if "{" in line:
        name, _, rest = line.partition("{")
        labels_text, _, tail = rest.rpartition("}")
        labels = _labels(labels_text)
    else:
        name, _, tail = line.partition(" ")
        labels = {}
    parts = tail.split()
    if not name.strip() or not parts:
        raise ValueError("no name or no value")
    return Sample(name.strip(), labels, _value(parts[0]))
