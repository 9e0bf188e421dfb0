"""Providers: the upstreams a deployment can call. ``build_provider`` picks one."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from daemon.config import ModelConfig, UpstreamConfig
from daemon.providers.base import Provider
from daemon.providers.litellm_provider import LiteLLMProvider
from daemon.providers.mock import MockProvider
from daemon.providers.openai_compat import OpenAICompatProvider, Timeouts


def upstream_key(model: ModelConfig, environ: Mapping[str, str]) -> str | None:
    if model.api_key_env is None:
        return None
    return environ.get(model.api_key_env) or None


def build_provider(
    model: ModelConfig,
    *,
    session: aiohttp.ClientSession,
    environ: Mapping[str, str],
    upstream: UpstreamConfig,
) -> Provider:
    if model.provider == "mock":
        return MockProvider(model.upstream_model, model.mock)
    api_key = upstream_key(model, environ)
    if model.provider in ("openai", "ollama"):
        assert model.api_base is not None  # the config validator requires it
        return OpenAICompatProvider(
            name=model.provider,
            api_base=model.api_base,
            api_key=api_key,
            session=session,
            timeouts=timeouts_for(model, upstream),
            responses_native=model.responses_api == "native",
            max_event_bytes=upstream.max_event_bytes,
        )
    return LiteLLMProvider(
        provider=model.provider,
        model=model.upstream_model,
        api_base=model.api_base,
        api_key=api_key,
        timeout_s=model.timeout_s or upstream.timeout_s,
    )


def timeouts_for(model: ModelConfig, upstream: UpstreamConfig) -> Timeouts:
    """A model's own timeouts, each falling back to the ``upstream`` section's."""
    return Timeouts(
        connect_s=model.connect_timeout_s or upstream.connect_timeout_s,
        first_byte_s=model.first_byte_timeout_s or upstream.first_byte_timeout_s,
        total_s=model.timeout_s or upstream.timeout_s,
    )


__all__ = ["Provider", "build_provider", "upstream_key"]
