"""Settings: the whole of config.yaml, its sections checked against each other."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, model_validator

from daemon.config.fields import Strict
from daemon.config.models import ModelConfig
from daemon.config.sections import (
    AuthConfig,
    CacheConfig,
    LedgerConfig,
    LimitsConfig,
    MonitoringConfig,
    RequestLimits,
    RoutingConfig,
    ServerConfig,
    UpstreamConfig,
)


class Settings(Strict):
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
