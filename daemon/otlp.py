"""OTLP span export: the protobuf wire encoding, written directly, and two transports.

The SDK's exporters build a protobuf object per span, attribute and value before
serialising: about 170 µs of CPU per span, more than the rest of the gateway spends
on a whole request. Writing the same wire format directly costs a small fraction of
that (see docs/benchmarks.md); the test suite checks that collector-side parsing
of these bytes equals the SDK's own encoding.

``GrpcSpanExporter`` calls ``TraceService/Export`` (the default, port 4317) and
``HttpSpanExporter`` posts to ``/v1/traces`` (``http/protobuf``, port 4318). Both retry
what the OTLP spec calls retryable, within one export timeout, and keep the reason of
the last failure for the operator.
"""

from __future__ import annotations

import http.client
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as two's complement, as protobuf does
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len(field: int, data: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _len(field, text.encode("utf-8"))


# Hot paths below are written out by hand: this runs for every attribute of every span.
_T_STRING, _T_BOOL, _T_INT, _T_DOUBLE = _tag(1, 2), _tag(2, 0), _tag(3, 0), _tag(4, 1)
_T_KEY, _T_VALUE, _T_ATTR = _tag(1, 2), _tag(2, 2), _tag(9, 2)
_TRUE, _FALSE = _T_BOOL + b"\x01", _T_BOOL + b"\x00"
_KEYS: dict[str, bytes] = {}


def encode_value(value: Any) -> bytes:
    """An AnyValue message."""
    kind = type(value)
    if kind is str:
        data: bytes = value.encode("utf-8")
        n = len(data)
        return _T_STRING + (_SMALL[n] if n < 0x80 else _varint(n)) + data
    if kind is bool:
        return _TRUE if value else _FALSE
    if kind is int:
        return _T_INT + (_SMALL[value] if 0 <= value < 0x80 else _varint(value))
    if kind is float:
        return _T_DOUBLE + _DOUBLE.pack(value)
    if value is None:
        return b""
    if isinstance(value, bytes):
        return _len(7, value)
    if isinstance(value, Mapping):
        return _len(6, b"".join(_len(1, _key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _len(5, b"".join(_len(1, encode_value(v)) for v in value))
    if isinstance(value, str | bool | int | float):  # subclasses of the simple types
        return encode_value(kind.__mro__[-2](value))
    raise TypeError(f"cannot encode {type(value).__name__} as an OTLP value")


def _key_value(key: str, value: Any) -> bytes:
    encoded_key = _KEYS.get(key)
    if encoded_key is None:
        encoded_key = _str(1, key)
        if len(_KEYS) < 4096:  # attribute keys are a small, fixed set; values are not cached
            _KEYS[key] = encoded_key
    v = encode_value(value)
    n = len(v)
    return encoded_key + _T_VALUE + (_SMALL[n] if n < 0x80 else _varint(n)) + v


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    tag = _T_ATTR if field == 9 else _tag(field, 2)
    # The SDK's BoundedAttributes iterates through the Mapping ABC, slowly; its plain
    # dict is read directly when it is there.
    plain = getattr(attributes, "_dict", attributes)
    out = []
    for k, v in plain.items():
        kv = _key_value(k, v)
        n = len(kv)
        out.append(tag + (_SMALL[n] if n < 0x80 else _varint(n)) + kv)
    return b"".join(out)


def _fixed64(field: int, n: int) -> bytes:
    return _tag(field, 1) + _FIXED64.pack(n)


def encode_span(span: ReadableSpan) -> bytes:
    ctx = span.get_span_context()
    assert ctx is not None
    parts = [
        _len(1, ctx.trace_id.to_bytes(16, "big")),
        _len(2, ctx.span_id.to_bytes(8, "big")),
    ]
    if ctx.trace_state:
        parts.append(_str(3, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())))
    parent = span.parent
    if parent is not None:
        parts.append(_len(4, parent.span_id.to_bytes(8, "big")))
    if span.name:
        parts.append(_str(5, span.name))
    parts.append(_tag(6, 0) + _varint(span.kind.value + 1))  # the SDK's enum starts at INTERNAL=0
    parts.append(_fixed64(7, span.start_time or 0))
    parts.append(_fixed64(8, span.end_time or 0))
    parts.append(_attributes(9, span.attributes))
    if span.dropped_attributes:
        parts.append(_tag(10, 0) + _varint(span.dropped_attributes))
    for event in span.events:
        body = _fixed64(1, event.timestamp) + _str(2, event.name) + _attributes(3, event.attributes)
        if event.dropped_attributes:
            body += _tag(4, 0) + _varint(event.dropped_attributes)
        parts.append(_len(11, body))
    if span.dropped_events:
        parts.append(_tag(12, 0) + _varint(span.dropped_events))
    for link in span.links:
        lctx = link.context
        body = _len(1, lctx.trace_id.to_bytes(16, "big")) + _len(2, lctx.span_id.to_bytes(8, "big"))
        body += _attributes(4, link.attributes)
        if link.dropped_attributes:
            body += _tag(5, 0) + _varint(link.dropped_attributes)
        body += _tag(6, 5) + _FIXED32.pack(_HAS_IS_REMOTE | (_IS_REMOTE if lctx.is_remote else 0))
        parts.append(_len(13, body))
    if span.dropped_links:
        parts.append(_tag(14, 0) + _varint(span.dropped_links))
    status = span.status
    status_body = b""
    if status.description:
        status_body += _str(2, status.description)
    if status.status_code.value:
        status_body += _tag(3, 0) + _varint(status.status_code.value)
    parts.append(_len(15, status_body))
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    parts.append(_tag(16, 5) + _FIXED32.pack(flags))
    return b"".join(parts)


class Encoder:
    """ExportTraceServiceRequest bytes for a batch; resource and scope encoded once."""

    def __init__(self) -> None:
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}

    def _resource(self, resource: Resource) -> bytes:
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            cached = (resource, _len(1, _attributes(1, resource.attributes)))
            self._resources[id(resource)] = cached
        return cached[1]

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        if scope is None:
            return b""
        cached = self._scopes.get(id(scope))
        if cached is None or cached[0] is not scope:
            body = _str(1, scope.name) if scope.name else b""
            if scope.version:
                body += _str(2, scope.version)
            body += _attributes(3, scope.attributes)
            cached = (scope, _len(1, body))
            self._scopes[id(scope)] = cached
        return cached[1]

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        return self.request([encoded(span) for span in spans])

    def request(self, spans: Sequence[EncodedSpan]) -> bytes:
        """An ExportTraceServiceRequest from spans already encoded one by one."""
        # Grouped by identity: hashing a Resource serialises it to JSON every time.
        grouped: dict[
            int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]
        ] = {}
        for resource, scope, data in spans:
            by_scope = grouped.setdefault(id(resource), (resource, {}))[1]
            by_scope.setdefault(id(scope), (scope, []))[1].append(data)
        out = []
        for resource, by_scope in grouped.values():
            scope_spans = []
            for scope, datas in by_scope.values():
                body = self._scope(scope) + b"".join(_len(2, d) for d in datas)
                if scope is not None and scope.schema_url:
                    body += _str(3, scope.schema_url)
                scope_spans.append(_len(2, body))
            resource_spans = self._resource(resource) + b"".join(scope_spans)
            if resource.schema_url:
                resource_spans += _str(3, resource.schema_url)
            out.append(_len(1, resource_spans))
        return b"".join(out)


EncodedSpan = tuple[Resource, InstrumentationScope | None, bytes]


def encoded(span: ReadableSpan) -> EncodedSpan:
    """One span's bytes, with what groups it in a request."""
    return (span.resource, span.instrumentation_scope, encode_span(span))


class OTLPExporter(SpanExporter):
    """Retries within ``timeout_s`` with backoff; ``last_error`` says why it failed."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.encoder = Encoder()
        self.last_error: str | None = None
        self._shutdown = threading.Event()

    def _send(self, payload: bytes, timeout_s: float) -> tuple[bool, bool, str]:
        """(ok, retryable, error text)."""
        raise NotImplementedError

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.export_encoded([encoded(span) for span in spans])

    def export_encoded(self, spans: Sequence[EncodedSpan]) -> SpanExportResult:
        """Export spans encoded beforehand (see ``ExportingSpanProcessor``)."""
        if self._shutdown.is_set():
            self.last_error = "exporter is shut down"
            return SpanExportResult.FAILURE
        payload = self.encoder.request(spans)
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.25
        while True:
            left = deadline - time.monotonic()
            ok, retryable, error = self._send(payload, max(left, 0.05))
            if ok:
                return SpanExportResult.SUCCESS
            self.last_error = error
            if not retryable or deadline - time.monotonic() < backoff:
                return SpanExportResult.FAILURE
            if self._shutdown.wait(backoff):
                return SpanExportResult.FAILURE
            backoff *= 2

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        self._shutdown.set()


class GrpcSpanExporter(OTLPExporter):
    RETRYABLE = frozenset(
        {
            "CANCELLED",
            "DEADLINE_EXCEEDED",
            "RESOURCE_EXHAUSTED",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNAVAILABLE",
            "DATA_LOSS",
        }
    )

    def __init__(self, endpoint: str, *, headers: Mapping[str, str], timeout_s: float) -> None:
        import grpc  # only when this exporter is configured

        super().__init__(timeout_s)
        parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
        target = parts.netloc or parts.path
        if parts.scheme == "https":
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self._call = self.channel.unary_unary(_EXPORT_METHOD)  # bytes in, bytes out
        self._metadata = tuple((k.lower(), v) for k, v in headers.items())
        self._rpc_error = grpc.RpcError

    def _send(self, payload: bytes, timeout_s: float) -> tuple[bool, bool, str]:
        try:
            self._call(payload, timeout=timeout_s, metadata=self._metadata)
        except self._rpc_error as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            return False, name in self.RETRYABLE, f"{name}: {exc.details()}"
        return True, False, ""

    def shutdown(self) -> None:
        super().shutdown()
        self.channel.close()


class HttpSpanExporter(OTLPExporter):
    RETRYABLE = frozenset({429, 502, 503, 504})

    def __init__(self, url: str, *, headers: Mapping[str, str], timeout_s: float) -> None:
        super().__init__(timeout_s)
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 4318)
        self.path = parts.path or "/v1/traces"
        self.headers = {"content-type": "application/x-protobuf", **headers}
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=timeout_s)
        self._conn.timeout = timeout_s
        return self._conn

    def _send(self, payload: bytes, timeout_s: float) -> tuple[bool, bool, str]:
        try:
            conn = self._connection(timeout_s)
            conn.request("POST", self.path, body=payload, headers=self.headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return False, True, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status < 300:
            return True, False, ""
        detail = body[:200].decode("utf-8", "replace")
        return False, response.status in self.RETRYABLE, f"HTTP {response.status}: {detail}"

    def shutdown(self) -> None:
        super().shutdown()
        if self._conn is not None:
            self._conn.close()
