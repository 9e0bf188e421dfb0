"""Settings: the validated form of config.yaml.

The file is read and validated once, at start. Every error names the path of the
bad key (``models[1].api_base: not a URL``) so an operator can fix it without
reading a traceback. Relative paths resolve against the config file's folder, so a
config works the same whatever the current directory is.

    settings = load_config(Path("config.yaml"), os.environ)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

USER_TYPES = ("standard", "service", "admin")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the bad key."""


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not a URL")
    return value.rstrip("/")


def _env_name(value: str) -> str:
    if not value or not value.replace("_", "").isalnum() or value[0].isdigit():
        raise ValueError("not an environment variable name")
    return value


HttpUrl = Annotated[str, AfterValidator(_url)]
EnvName = Annotated[str, AfterValidator(_env_name)]
Positive = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them with their path.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pricing(_Strict):
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)


class MockOptions(_Strict):
    """Behaviour of the in-process mock provider (tests, demos, benchmarks)."""

    reply: str | None = None  # fixed reply text; default: a deterministic echo
    latency_s: float = Field(default=0.0, ge=0)  # before the first byte
    chunk_delay_s: float = Field(default=0.0, ge=0)  # between streamed words
    embedding_dimensions: int = Field(default=8, gt=0, le=4096)


# Request fields that change what an OpenAI-compatible upstream charges or keeps, refused
# unless a model's ``forward_fields`` says otherwise (docs/security.md): a priority tier,
# stored completions, paid web search, predicted outputs (rejected tokens are billed),
# background (stored) responses.
DEFAULT_DENIED_FIELDS = ("service_tier", "store", "web_search_options", "prediction", "background")


class ForwardFields(_Strict):
    """Which top-level request fields reach this model's upstream: ``allow`` (only these,
    besides the ones the gateway sets itself) or ``deny`` (all but these; replaces the
    default list, ``[]`` forwards everything)."""

    allow: list[str] | None = None
    deny: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> ForwardFields:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("give either allow or deny")
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    model: str | None = None
    api_base: HttpUrl | None = None
    api_key_env: EnvName | None = None
    pricing: Pricing | None = None
    # Upstream timeouts, each defaulting to upstream's: connecting, the response
    # starting (and each later read), and the whole call (a stream to its end).
    connect_timeout_s: Positive | None = None
    first_byte_timeout_s: Positive | None = None
    timeout_s: Positive | None = None
    # Fields forwarded to an OpenAI-compatible upstream; default: deny DEFAULT_DENIED_FIELDS.
    forward_fields: ForwardFields | None = None
    mock: MockOptions = MockOptions()
    # How /v1/responses reaches this deployment: "translate" to chat completions (any
    # provider), or "native": passed through to the upstream's own POST /responses
    # (OpenAI-compatible servers that implement it; stateful features then work).
    responses_api: Literal["translate", "native"] = "translate"
    # Routing (docs/routing.md): this deployment's share among those of the same name,
    # and the other public model names tried, in order, when this one cannot answer.
    weight: float = Field(default=1.0, ge=0)
    fallbacks: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.provider != "mock" and not self.model:
            raise ValueError(f"model: required for provider {self.provider!r}")
        if self.provider in ("openai", "ollama") and not self.api_base:
            raise ValueError(f"api_base: required for provider {self.provider!r}")
        if self.responses_api == "native" and self.provider not in ("openai", "ollama"):
            raise ValueError(
                "responses_api: 'native' needs an OpenAI-compatible provider (openai, ollama)"
            )
        return self

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


class ServerConfig(_Strict):
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


class LedgerConfig(_Strict):
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


class AuthConfig(_Strict):
    admin_key_env: EnvName = "CHATVAULT_ADMIN_KEY"
    refresh_interval_s: Positive = 1.0  # how soon new and revoked keys take effect
    # A model the key may not use: 404 like an unknown model (names cannot be probed),
    # or 403 saying the key is not allowed.
    forbidden_model_status: Literal[404, 403] = 404


class RequestLimits(_Strict):
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


def _redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("not a Redis URL (redis://host:port/db)")
    return value


class LimitsConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"  # memory: one process; redis: shared
    redis_url: Annotated[str, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field(default="chatvault", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    on_backend_error: Literal["deny", "allow"] = "deny"  # Redis unreachable: 503, or admit
    backend_timeout_s: Positive = 0.25  # the longest a request waits for Redis
    reservation_ttl_s: Positive = 900.0  # a reservation left by a dead replica expires
    # The output a request without max_tokens is reserved for, per choice.
    default_max_tokens: int = Field(default=4096, gt=0)
    # Accepted so older configs still load; a spent budget does not come back in an
    # hour, so 429s for budgets carry no Retry-After any more.
    budget_retry_after_s: int = Field(default=3600, gt=0)


class UpstreamConfig(_Strict):
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


class CircuitBreakerConfig(_Strict):
    failures: int = Field(default=5, gt=0)  # consecutive failures that open a circuit
    cooldown_s: Positive = 30.0  # then one trial request (half-open)


class RoutingConfig(_Strict):
    """docs/routing.md: strategies, retries, fallbacks, circuits."""

    strategy: Literal["weighted", "least-busy", "latency"] = "weighted"
    # Extra attempts per model on a retryable failure. Unset: upstream.max_attempts - 1.
    retries: int | None = Field(default=None, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.1, ge=0)
    request_deadline_s: Positive = 120.0
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


class CacheConfig(_Strict):
    """The exact-match response cache (docs/routing.md)."""

    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    redis_url: Annotated[str, AfterValidator(_redis_url)] | None = None  # limits.redis_url
    ttl_s: Positive = 3600.0
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # memory backend's bound
    scope: Literal["key", "global"] = "key"
    # n > 1 or a non-zero (or unset, i.e. default 1) temperature: cached only if true.
    cache_nondeterministic: bool = False


class MetricsConfig(_Strict):
    enabled: bool = True
    require_auth: bool = True
    business_refresh_s: Positive = 30.0


class TracingConfig(_Strict):
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


class HealthConfig(_Strict):
    probe_interval_s: Positive = 30.0
    probe_timeout_s: Positive = 2.0
    # Consecutive upstream failures that open a circuit, when routing.circuit_breaker is
    # not set (docs/routing.md).
    failure_threshold: int = Field(default=3, gt=0)


class MonitoringConfig(_Strict):
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    health: HealthConfig = HealthConfig()


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    data_dir: Path = Path("data")
    ledger: LedgerConfig = LedgerConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    requests: RequestLimits = RequestLimits()
    models: list[ModelConfig] = Field(min_length=1)
    monitoring: MonitoringConfig = MonitoringConfig()
    routing: RoutingConfig = RoutingConfig()
    cache: CacheConfig = CacheConfig()
    # Where the settings came from; set by load_config, shown by /health.
    source: Path | None = None

    @model_validator(mode="after")
    def _unique_deployments(self) -> Settings:
        seen: set[tuple[str, str, str | None, str | None]] = set()
        for index, model in enumerate(self.models):
            ident = (model.name, model.provider, model.model, model.api_base)
            if ident in seen:
                raise ValueError(f"models[{index}]: duplicate of an earlier entry")
            seen.add(ident)
        return self

    @model_validator(mode="after")
    def _fallbacks(self) -> Settings:
        names = {m.name for m in self.models}
        for index, model in enumerate(self.models):
            for j, target in enumerate(model.fallbacks):
                if target not in names:
                    raise ValueError(f"models[{index}].fallbacks[{j}]: unknown model {target!r}")
        cycle = fallback_cycle(self.fallbacks)
        if cycle:
            index = next(i for i, m in enumerate(self.models) if m.name == cycle[0])
            raise ValueError(f"models[{index}].fallbacks: a cycle: {' -> '.join(cycle)}")
        return self

    @property
    def fallbacks(self) -> dict[str, list[str]]:
        """Each public name's fallbacks, in order (entries of one name add theirs)."""
        out: dict[str, list[str]] = {}
        for m in self.models:
            chain = out.setdefault(m.name, [])
            chain.extend(t for t in m.fallbacks if t not in chain)
        return out

    @property
    def retries(self) -> int:
        r = self.routing.retries
        return self.upstream.max_attempts - 1 if r is None else r

    @property
    def circuit_failures(self) -> int:
        """routing.circuit_breaker.failures; an older config's health.failure_threshold
        still counts when the circuit breaker is not configured."""
        health = self.monitoring.health
        if "circuit_breaker" not in self.routing.model_fields_set and (
            "failure_threshold" in health.model_fields_set
        ):
            return health.failure_threshold
        return self.routing.circuit_breaker.failures

    @property
    def cache_redis_url(self) -> str:
        return self.cache.redis_url or self.limits.redis_url

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"


def fallback_cycle(graph: Mapping[str, list[str]]) -> list[str]:
    """A cycle in the fallback graph, as the names along it (first repeated last), or []."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return []
        for target in graph.get(name, ()):
            found = visit(target, [*path, name])
            if found:
                return found
        done.add(name)
        return []

    for name in graph:
        found = visit(name, [])
        if found:
            return found
    return []


def _format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = _format_location(tuple(p for p in item["loc"] if p not in ("function-after",)))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required"
        # A model-level validator names the key itself ("model: required ...").
        if ": " in message and item["type"] == "value_error" and not message.startswith("not "):
            key, _, rest = message.partition(": ")
            if key.isidentifier():
                loc = f"{loc}.{key}" if loc else key
                message = rest
        lines.append(f"{loc}: {message}" if loc else message)
    return "\n".join(lines)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    data_dir = Path(raw.get("data_dir") or "data")
    raw["data_dir"] = data_dir if data_dir.is_absolute() else base / data_dir
    ledger = raw.setdefault("ledger", {})
    if isinstance(ledger, dict):
        ledger.setdefault("url", LedgerConfig.model_fields["url"].default)
    if isinstance(ledger, dict) and isinstance(ledger.get("url"), str):
        url: str = ledger["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            ledger["url"] = "sqlite:///" + str(base / url.removeprefix("sqlite:///"))
        _resolve_journal_dir(ledger, base, raw["data_dir"])


def _resolve_journal_dir(ledger: dict[str, Any], base: Path, data_dir: Path) -> None:
    journal = ledger.get("journal_dir")
    if isinstance(journal, str | Path) and str(journal):
        path = Path(journal)
        ledger["journal_dir"] = path if path.is_absolute() else base / path
        return
    url = str(ledger["url"])
    if url.startswith("sqlite:") and "mode=ro" not in url:
        file = "/" + url.removeprefix("sqlite:").partition("?")[0].lstrip("/")
        ledger["journal_dir"] = Path(file + ".journal")
    else:
        ledger["journal_dir"] = data_dir / "ledger-journal"


def parse_config(raw: object, *, base: Path, source: Path | None = None) -> Settings:
    """Validate an already-parsed config mapping. Raises ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping of keys")
    raw = dict(raw)
    _resolve_paths(raw, base)
    if source is not None:
        raw["source"] = source
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file. Raises ConfigError with the bad key's path.

    ``environ`` supplies overrides: CHATVAULT_HOST, CHATVAULT_PORT, CHATVAULT_LEDGER_URL,
    CHATVAULT_REDIS_URL.
    """
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if isinstance(raw, dict):
        _apply_environ(raw, environ)
    try:
        return parse_config(raw, base=path.resolve().parent, source=path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def builtin_config(data_dir: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings used when there is no config file: the mock model, the SQLite ledger
    in ``data_dir`` (absolute), no tracing (no collector can be assumed). The same
    environment overrides apply as for a file."""
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "ledger": {"url": "sqlite:///" + str(data_dir / "chatvault.db")},
        "models": [
            {
                "name": "mock",
                "provider": "mock",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
            }
        ],
        "monitoring": {"tracing": {"enabled": False}},
    }
    _apply_environ(raw, os.environ if environ is None else environ)
    return parse_config(raw, base=data_dir)


def _apply_environ(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    server = raw.setdefault("server", {}) if isinstance(raw.get("server", {}), dict) else None
    if server is not None:
        if "CHATVAULT_HOST" in environ:
            server["host"] = environ["CHATVAULT_HOST"]
        if "CHATVAULT_PORT" in environ:
            server["port"] = environ["CHATVAULT_PORT"]
    if "CHATVAULT_LEDGER_URL" in environ:
        ledger = raw.setdefault("ledger", {})
        if isinstance(ledger, dict):
            ledger["url"] = environ["CHATVAULT_LEDGER_URL"]
    if "CHATVAULT_REDIS_URL" in environ:
        limits = raw.setdefault("limits", {})
        if isinstance(limits, dict):
            limits["redis_url"] = environ["CHATVAULT_REDIS_URL"]
