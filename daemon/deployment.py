"""A deployment: one entry of config.yaml's ``models``, with its provider and price.

Several entries may share a public ``name``: one model served by several deployments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from daemon.config import ModelConfig, Settings
from daemon.forwarding import FORWARD_ALL, FieldPolicy
from daemon.pricing import Price, litellm_cost_map, needs_cost_map, price_for
from daemon.providers import build_provider, upstream_key
from daemon.providers.base import Provider

log = logging.getLogger("chatvault.deployment")


@dataclass(eq=False, slots=True)
class Deployment:
    index: int  # position in config.yaml's models list
    config: ModelConfig
    provider: Provider
    price: Price
    problem: str | None = None  # why it cannot serve at all (e.g. its key is not set)
    fields: FieldPolicy = FORWARD_ALL  # the request fields its upstream may receive

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def provider_name(self) -> str:
        return self.config.provider

    @property
    def upstream_model(self) -> str:
        return self.config.upstream_model


def build_deployments(
    settings: Settings, session: aiohttp.ClientSession, environ: Mapping[str, str]
) -> list[Deployment]:
    cost_map = litellm_cost_map() if any(needs_cost_map(m) for m in settings.models) else {}
    out = []
    for index, model in enumerate(settings.models):
        provider = build_provider(
            model,
            session=session,
            environ=environ,
            upstream=settings.upstream,
        )
        problem = None
        if model.api_key_env and not upstream_key(model, environ):
            problem = f"{model.api_key_env} is not set"
            log.warning("models[%d] (%s): %s", index, model.name, problem)
        price = price_for(model, cost_map)
        out.append(
            Deployment(index, model, provider, price, problem, FieldPolicy.from_config(model))
        )
    return out
