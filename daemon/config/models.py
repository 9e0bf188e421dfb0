"""One entry of config.yaml's ``models`` list: a deployment, its price and its options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from daemon.config.fields import EnvName, HttpUrl, Positive, Strict


class Pricing(Strict):
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)


class MockOptions(Strict):
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


class ForwardFields(Strict):
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


class ModelConfig(Strict):
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
