"""What a request costs, in USD: pure functions over token counts and a price.

Prices come from the model's ``pricing`` in config.yaml, or else from litellm's
bundled cost map, read as a JSON file so that litellm itself (seconds to import)
is never loaded for it and nothing goes to the network.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from daemon.config import ModelConfig
from daemon.usage import TokenCounts

_PER_MILLION = 1_000_000
# Providers whose models run on the operator's own hardware: no per-token price.
LOCAL_PROVIDERS = frozenset({"mock", "ollama"})


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # None: cached tokens cost the input price
    source: str = "config"


FREE = Price(source="free")


def cost_usd(tokens: TokenCounts, price: Price) -> float:
    cached = min(tokens.cached, tokens.input)
    cached_price = price.input if price.cached_input is None else price.cached_input
    return (
        (tokens.input - cached) * price.input + cached * cached_price + tokens.output * price.output
    )


def price_for(model: ModelConfig, cost_map: dict[str, Any] | None = None) -> Price:
    """The price of one configured deployment."""
    if model.pricing is not None:
        p = model.pricing
        return Price(
            input=p.input_per_million / _PER_MILLION,
            output=p.output_per_million / _PER_MILLION,
            cached_input=None
            if p.cached_input_per_million is None
            else p.cached_input_per_million / _PER_MILLION,
        )
    if model.provider in LOCAL_PROVIDERS:
        return FREE
    entry = _lookup(cost_map if cost_map is not None else litellm_cost_map(), model)
    if entry is None:
        return Price(source="unknown")
    return Price(
        input=float(entry.get("input_cost_per_token") or 0.0),
        output=float(entry.get("output_cost_per_token") or 0.0),
        cached_input=_float_or_none(entry.get("cache_read_input_token_cost")),
        source="litellm",
    )


def needs_cost_map(model: ModelConfig) -> bool:
    return model.pricing is None and model.provider not in LOCAL_PROVIDERS


def _lookup(cost_map: dict[str, Any], model: ModelConfig) -> dict[str, Any] | None:
    name = model.upstream_model
    for key in (name, f"{model.provider}/{name}", name.split("/", 1)[-1]):
        entry = cost_map.get(key)
        if isinstance(entry, dict):
            return entry
    return None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@cache
def litellm_cost_map() -> dict[str, Any]:
    """litellm's bundled price list, without importing litellm."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent / "model_prices_and_context_window_backup.json"
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
