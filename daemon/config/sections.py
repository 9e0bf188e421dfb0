"""config.yaml's sections other than ``models``, one class each, with their defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from daemon.config.fields import EnvName, Positive, RedisUrl, Strict

USER_TYPES = ("standard", "service", "admin")  # a key's --user-type


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    drain_timeout_s: Positive = 30.0
    # Connections and requests served at once (uvicorn's limit_concurrency; idle
    # keep-alive connections count): past it, new requests get 503.
    limit_concurrency: int = Field(default=2048, gt=0)
    # A client must send its request headers within this time of connecting (or of
    # starting its next request), and its whole body within body_timeout_s of them.
    header_timeout_s: Positive = 10.0
    body_timeout_s: Positive = 60.0
    keep_alive_s: Positive = 5.0
    request_id_header: str = "x-request-id"
    access_log: bool = True


class LedgerConfig(Strict):
    # sqlite:///relative/or/absolute/path.db, or postgresql://user@host/db
    url: str = "sqlite:///data/chatvault.db"
    batch_size: int = Field(default=500, gt=0)
    flush_interval_s: Positive = 0.2
    max_queue: int = Field(default=100_000, gt=0)  # billed rows in memory, then the journal
    # Where billed rows wait while the database is unreachable (docs/ledger.md). Default:
    # beside a SQLite ledger (<file>.journal), <data_dir>/ledger-journal for PostgreSQL.
    journal_dir: Path | None = None
    journal_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # A row waiting longer than this in memory is journaled: what a SIGKILL can lose.
    spill_after_s: Positive = 0.5
    # Refused requests at no cost (401, 429...): their own bounded queue, never journaled.
    rejected_max_queue: int = Field(default=10_000, gt=0)
    # /readyz stays up this long into a database outage while the journal absorbs rows.
    ready_during_outage_s: float = Field(default=30.0, ge=0)
    # Apply pending schema migrations at start; false: refuse to start until
    # `chatvault db migrate` has run (for operators who migrate before deploying).
    migrate_on_start: bool = True

    @model_validator(mode="after")
    def _check(self) -> LedgerConfig:
        scheme = self.url.split("://", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres") or "://" not in self.url:
            raise ValueError("url: expected sqlite:///path or postgresql://...")
        return self


class AuthConfig(Strict):
    admin_key_env: EnvName = "CHATVAULT_ADMIN_KEY"
    refresh_interval_s: Positive = 1.0  # how soon new and revoked keys take effect
    # A model the key may not use: 404 like an unknown model (names cannot be probed),
    # or 403 saying the key is not allowed.
    forbidden_model_status: Literal[404, 403] = 404


class RequestLimits(Strict):
    """What one request may make the gateway do (docs/security.md)."""

    # JSON values in a body over 64 KiB (counted by its commas and brackets, before
    # parsing): 4 MiB of "[]," parses for about a second on the event loop.
    max_json_values: int = Field(default=200_000, gt=0)
    max_embedding_inputs: int = Field(default=2048, gt=0)  # OpenAI's own limit
    max_embedding_dimensions: int = Field(default=16384, gt=0)
    # inputs x dimensions: the size of the answer, about 21 bytes of JSON per value.
    # 2^20 values (22 MB) cost the event loop about 40 ms of copying; OpenAI's largest
    # batch (2048 x 3072, 130 MB) would cost a quarter of a second (docs/security.md).
    max_embedding_values: int = Field(default=1 << 20, gt=0)
    max_chat_messages: int = Field(default=4096, gt=0)


class LimitsConfig(Strict):
    backend: Literal["memory", "redis"] = "memory"  # memory: one process; redis: shared
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field(default="chatvault", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    on_backend_error: Literal["deny", "allow"] = "deny"  # Redis unreachable: 503, or admit
    backend_timeout_s: Positive = 0.25  # the longest a request waits for Redis
    reservation_ttl_s: Positive = 900.0  # a reservation left by a dead replica expires
    # The output a request without max_tokens is reserved for, per choice.
    default_max_tokens: int = Field(default=4096, gt=0)
    # Accepted so older configs still load; a spent budget does not come back in an
    # hour, so 429s for budgets carry no Retry-After any more.
    budget_retry_after_s: int = Field(default=3600, gt=0)


class UpstreamConfig(Strict):
    # The defaults of every model's timeouts (ModelConfig): the whole call, connecting,
    # and the response starting (also the longest silence between reads of a stream).
    timeout_s: Positive = 600.0
    connect_timeout_s: Positive = 5.0
    first_byte_timeout_s: Positive = 120.0
    # The longest SSE event an upstream may send (or the bytes it may send without
    # ending one): past it the call fails as an upstream error.
    max_event_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_connections: int = Field(default=512, gt=0)
    # Attempts per model when routing.retries is not set (routing.retries wins).
    max_attempts: int = Field(default=2, ge=1, le=10)


class CircuitBreakerConfig(Strict):
    failures: int = Field(default=5, gt=0)  # consecutive failures that open a circuit
    cooldown_s: Positive = 30.0  # then one trial request (half-open)


class RoutingConfig(Strict):
    """docs/routing.md: strategies, retries, fallbacks, circuits."""

    strategy: Literal["weighted", "least-busy", "latency"] = "weighted"
    # Extra attempts per model on a retryable failure. Unset: upstream.max_attempts - 1.
    retries: int | None = Field(default=None, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.1, ge=0)
    request_deadline_s: Positive = 120.0
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


class CacheConfig(Strict):
    """The exact-match response cache (docs/routing.md)."""

    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    redis_url: RedisUrl | None = None  # limits.redis_url
    ttl_s: Positive = 3600.0
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # memory backend's bound
    scope: Literal["key", "global"] = "key"
    # n > 1 or a non-zero (or unset, i.e. default 1) temperature: cached only if true.
    cache_nondeterministic: bool = False


class MetricsConfig(Strict):
    enabled: bool = True
    require_auth: bool = True
    business_refresh_s: Positive = 30.0


class TracingConfig(Strict):
    enabled: bool = True
    endpoint: str = "http://localhost:4317"
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    headers: dict[str, str] = {}
    service_name: str = "chatvault"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    capture_content: bool = False
    # Content characters per message attribute of a span (capture_content only): bounds
    # what a collector outage can hold in memory (max_queue_size spans of it).
    max_content_chars: int = Field(default=16384, gt=0)
    user_id_header: str | None = "x-user-id"
    export_timeout_s: Positive = 5.0
    max_queue_size: int = Field(default=2048, gt=0)
    # Continue a client's traceparent? Off: a client can neither force sampling nor
    # choose the trace id in the ledger; its context is kept as a span link.
    trust_incoming_context: bool = False
    # Background work is told by the metrics; traced only on request.
    trace_probes: bool = False
    trace_ledger: bool = False


class HealthConfig(Strict):
    probe_interval_s: Positive = 30.0
    probe_timeout_s: Positive = 2.0
    # Consecutive upstream failures that open a circuit, when routing.circuit_breaker is
    # not set (docs/routing.md).
    failure_threshold: int = Field(default=3, gt=0)


class MonitoringConfig(Strict):
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    health: HealthConfig = HealthConfig()
