"""Cost maths and where prices come from."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from daemon.config import ModelConfig
from daemon.pricing import cost_usd, price_for
from daemon.usage import TokenCounts


def test_cost_from_configured_prices() -> None:
    model = ModelConfig(
        name="m",
        provider="mock",
        pricing={
            "input_per_million": 2.0,
            "output_per_million": 8.0,
            "cached_input_per_million": 0.5,
        },
    )
    price = price_for(model, {})
    tokens = TokenCounts(input=1000, output=500, cached=400)
    assert cost_usd(tokens, price) == pytest.approx((600 * 2.0 + 400 * 0.5 + 500 * 8.0) / 1e6)


def test_cached_tokens_cost_the_input_price_when_no_cached_price() -> None:
    model = ModelConfig(
        name="m", provider="mock", pricing={"input_per_million": 1.0, "output_per_million": 1.0}
    )
    assert cost_usd(TokenCounts(input=100, cached=100), price_for(model, {})) == pytest.approx(
        100 / 1e6
    )


def test_local_models_are_free_and_unknown_hosted_ones_say_so() -> None:
    assert (
        price_for(
            ModelConfig(name="o", provider="ollama", model="llama3", api_base="http://x"), {}
        ).source
        == "free"
    )
    unknown = price_for(
        ModelConfig(name="u", provider="openai", model="my-finetune", api_base="http://x"), {}
    )
    assert unknown.source == "unknown" and unknown.input == 0


def test_hosted_model_priced_from_litellms_bundled_map_without_importing_litellm() -> None:
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    bundled = json.loads(
        (Path(spec.origin).parent / "model_prices_and_context_window_backup.json").read_text()
    )
    entry = bundled["gpt-4o-mini"]
    was_loaded = "litellm" in sys.modules
    price = price_for(
        ModelConfig(
            name="g", provider="openai", model="gpt-4o-mini", api_base="https://api.openai.com/v1"
        )
    )
    assert (price.input, price.output, price.source) == (
        entry["input_cost_per_token"],
        entry["output_cost_per_token"],
        "litellm",
    )
    assert ("litellm" in sys.modules) == was_loaded
