"""The effective tracing settings: config.yaml, overridden by the standard OTEL_* variables.

Operators in containers set ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER`` and friends; ``resolve`` merges them over the config file,
reading only the environment it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from daemon.config import TracingConfig

log = logging.getLogger("chatvault.tracing")

_TRUE = ("true", "1", "yes", "on")


@dataclass(frozen=True)
class TraceSettings:
    """Config merged with the OTEL_* environment."""

    enabled: bool
    endpoint: str
    protocol: str  # grpc | http/protobuf
    headers: dict[str, str]
    service_name: str
    resource_attributes: dict[str, str]
    sampler: Sampler
    capture_content: bool
    max_content_chars: int
    user_id_header: bytes | None
    export_timeout_s: float
    max_queue_size: int
    schedule_delay_s: float
    max_batch_size: int
    trust_incoming_context: bool
    trace_probes: bool
    trace_ledger: bool


def _pairs(value: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (values URL-encoded), as OTEL_*_HEADERS and OTEL_RESOURCE_ATTRIBUTES."""
    out = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(val.strip())
    return out


def _sampler(name: str | None, arg: str | None, default_ratio: float) -> Sampler:
    ratio = default_ratio
    if arg:
        try:
            ratio = min(max(float(arg), 0.0), 1.0)
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using %s", arg, ratio)
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name:
        if name in samplers:
            return samplers[name]
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported; using parentbased_traceidratio", name)
    return ParentBased(TraceIdRatioBased(ratio)) if ratio < 1.0 else ParentBased(ALWAYS_ON)


def _positive(environ: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(environ[name])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


def resolve(config: TracingConfig, environ: Mapping[str, str]) -> TraceSettings:
    """The effective settings: OTEL_* variables win over the config file."""
    e = environ
    enabled = config.enabled and e.get("OTEL_SDK_DISABLED", "").strip().lower() not in _TRUE
    protocol = (
        e.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or e.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or config.protocol
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        log.warning("OTLP protocol %r is not supported; using grpc", protocol)
        protocol = "grpc"
    endpoint = e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        endpoint = e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint and protocol == "http/protobuf":
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # the spec appends the signal path
    if not endpoint:
        endpoint = config.endpoint
        if protocol == "http/protobuf" and not urlsplit(endpoint).path.strip("/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    headers = dict(config.headers)
    headers.update(_pairs(e.get("OTEL_EXPORTER_OTLP_HEADERS", "")))
    headers.update(_pairs(e.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")))
    resource = _pairs(e.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    service = (
        e.get("OTEL_SERVICE_NAME") or resource.pop("service.name", None) or config.service_name
    )
    return TraceSettings(
        enabled=enabled,
        endpoint=endpoint,
        protocol=protocol,
        headers=headers,
        service_name=service,
        resource_attributes=resource,
        sampler=_sampler(
            e.get("OTEL_TRACES_SAMPLER"), e.get("OTEL_TRACES_SAMPLER_ARG"), config.sample_ratio
        ),
        capture_content=config.capture_content,
        max_content_chars=config.max_content_chars,
        user_id_header=config.user_id_header.lower().encode() if config.user_id_header else None,
        export_timeout_s=_positive(e, "OTEL_BSP_EXPORT_TIMEOUT", config.export_timeout_s * 1000)
        / 1000,
        max_queue_size=int(_positive(e, "OTEL_BSP_MAX_QUEUE_SIZE", config.max_queue_size)),
        schedule_delay_s=_positive(e, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000,
        max_batch_size=int(_positive(e, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
        trust_incoming_context=config.trust_incoming_context,
        trace_probes=config.trace_probes,
        trace_ledger=config.trace_ledger,
    )
