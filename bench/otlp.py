"""A real OTLP/gRPC trace receiver, built on the collector's own service definitions.

Tests use it to assert on the spans a daemon sends; the benchmark runs it as the live
collector (``python -m bench.otlp --port P``), keeping only counts.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]
    events: list[str]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        with self.receiver.lock:
            if not self.receiver.keep:
                self.receiver.count += sum(
                    len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                )
                self.receiver.exports += 1
                return trace_service_pb2.ExportTraceServiceResponse()
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.receiver.spans.append(
                            ReceivedSpan(
                                name=s.name,
                                kind=s.kind,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                status_code=s.status.code,
                                resource=resource,
                                events=[e.name for e in s.events],
                            )
                        )
            self.receiver.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    """``with OTLPReceiver() as r:`` listens on r.endpoint until the block ends (or ``stop()``)."""

    def __init__(self, port: int | None = None, keep: bool = True) -> None:
        self.port = port or _free_port()
        self.keep = keep  # False: count spans only (the benchmark's collector)
        self.count = 0
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.lock = threading.Lock()
        self.server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OTLPReceiver:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0).wait()
            self.server = None

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            time.sleep(0.05)
        with self.lock:
            names = [s.name for s in self.spans]
        raise AssertionError(f"no matching span within {timeout}s; received: {names}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description="a counting OTLP/gRPC trace receiver")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    receiver = OTLPReceiver(args.port, keep=False).start()
    try:
        assert receiver.server is not None
        receiver.server.wait_for_termination()
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
