"""Providers: the upstreams a deployment can call. ``build_provider`` picks one."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from daemon.config import ModelConfig
from daemon.providers.base import Provider
from daemon.providers.litellm_provider import LiteLLMProvider
from daemon.providers.mock import MockProvider
from daemon.providers.openai_compat import OpenAICompatProvider


def upstream_key(model: ModelConfig, environ: Mapping[str, str]) -> str | None:
    if model.api_key_env is None:
        return None
    return environ.get(model.api_key_env) or None


def build_provider(
    model: ModelConfig,
    *,
    session: aiohttp.ClientSession,
    environ: Mapping[str, str],
    default_timeout_s: float,
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
            timeout_s=model.timeout_s,
            responses_native=model.responses_api == "native",
        )
    return LiteLLMProvider(
        provider=model.provider,
        model=model.upstream_model,
        api_base=model.api_base,
        api_key=api_key,
        timeout_s=model.timeout_s or default_timeout_s,
    )


__all__ = ["Provider", "build_provider", "upstream_key"]
