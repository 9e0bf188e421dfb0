"""Deterministic JSON values that validate against a JSON Schema, for the mock model.

Covers what tool parameters and structured outputs use in practice (what pydantic
and zod emit): ``type`` (and lists of types), ``properties``/``required``, ``items``
and ``prefixItems``, ``enum``, ``const``, ``default``, ``anyOf``/``oneOf``/``allOf``,
``$ref`` into ``$defs``/``definitions``, string ``format``s, length and numeric
bounds. ``pattern`` is not honoured. Work is bounded (depth and node count), so a
hostile or recursive schema costs little CPU: past the bounds, the simplest value
of the type is used.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 12
MAX_NODES = 2000

_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
}


class _Walk:
    def __init__(self, root: Any) -> None:
        self.root = root if isinstance(root, dict) else {}
        self.nodes = 0

    def ref(self, ref: str) -> Any:
        # Local references only ("#/$defs/Name"); anything else is an empty schema.
        if not ref.startswith("#/"):
            return {}
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict):
                return {}
            node = node.get(part.replace("~1", "/").replace("~0", "~"))
        return node if isinstance(node, dict) else {}

    def value(self, schema: Any, name: str, depth: int, index: int = 0) -> Any:
        self.nodes += 1
        if schema is True or not isinstance(schema, dict):
            return f"mock {name}"
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            return _simplest(schema)
        if isinstance(schema.get("$ref"), str):
            return self.value(self.ref(schema["$ref"]), name, depth + 1, index)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][index % len(schema["enum"])]
        if "default" in schema:
            return schema["default"]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                # Prefer a non-null option: a value says more than null does.
                chosen = next((o for o in options if not _is_null(o)), options[0])
                return self.value(chosen, name, depth + 1, index)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                part = self.ref(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value(_merge(merged, rest), name, depth + 1, index)
        kind = _type(schema)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "string":
            return _string(schema, name, index)
        if kind == "integer":
            return int(_number(schema, 1 + index, integer=True))
        if kind == "number":
            return _number(schema, 1.5 + index, integer=False)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return f"mock {name}"

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        out: dict[str, Any] = {}
        if isinstance(properties, dict):
            for key, sub in properties.items():
                out[str(key)] = self.value(sub, str(key), depth + 1)
        return out

    def array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        raw_low, raw_high = schema.get("minItems"), schema.get("maxItems")
        low = raw_low if isinstance(raw_low, int) else 0
        high = raw_high if isinstance(raw_high, int) else None
        count = max(low, 1 if items not in (None, False) or prefix else 0)
        if high is not None:
            count = min(count, high)
        count = min(count, 64)  # a schema asking for a million items gets the minimum it can
        out: list[Any] = []
        for i in range(count):
            if isinstance(prefix, list) and i < len(prefix):
                sub = prefix[i]
            else:
                sub = items if items is not None else {}
            out.append(self.value(sub, name, depth + 1, index=i))
        return out


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **b}
    if isinstance(a.get("properties"), dict) and isinstance(b.get("properties"), dict):
        out["properties"] = {**a["properties"], **b["properties"]}
    return out


def _type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _simplest(schema: dict[str, Any]) -> Any:
    return {
        "object": {},
        "array": [],
        "string": "",
        "integer": 0,
        "number": 0,
        "boolean": True,
    }.get(_type(schema) or "")


def _string(schema: dict[str, Any], name: str, index: int) -> str:
    fmt = schema.get("format")
    text = _FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
    if not text:
        text = f"mock {name}" if index == 0 else f"mock {name} {index + 1}"
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = text + "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[: max(high, 0)]
    return text


def _number(schema: dict[str, Any], start: float, *, integer: bool) -> float:
    value = start
    low, high = schema.get("minimum"), schema.get("maximum")
    xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    step = 1 if integer else 0.5
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(xlow, int | float) and value <= xlow:
        value = xlow + step
    if isinstance(high, int | float) and value > high:
        value = high
    if isinstance(xhigh, int | float) and value >= xhigh:
        value = xhigh - step
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        value = -(-value // multiple) * multiple  # up to the next multiple
    return int(value) if integer else float(value)


def example(schema: Any, name: str = "value") -> Any:
    """A value valid for ``schema`` (a JSON Schema as parsed JSON)."""
    return _Walk(schema).value(schema, name, 0)
