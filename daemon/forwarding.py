"""Which request fields reach an OpenAI-compatible upstream: a per-model policy.

Some fields change what the upstream charges or keeps (``service_tier: priority``,
``store: true``, paid web search): a client holding a cheap key must not be able to
turn them on. A request naming a field its model does not forward is refused with a
400 that names the field and the setting, rather than silently stripped (the client
would otherwise believe it got what it asked for).

    policy = FieldPolicy.from_config(model_config)
    policy.check(body, "gpt-4o")     # raises InvalidRequest
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config import DEFAULT_DENIED_FIELDS, ModelConfig
from daemon.errors import InvalidRequest

# Set by the gateway itself on every call; always allowed.
_GATEWAY_FIELDS = frozenset({"model", "stream", "stream_options"})
_COMPATIBLE = ("openai", "ollama")


@dataclass(frozen=True, slots=True)
class FieldPolicy:
    allow: frozenset[str] | None = None  # None: every field not denied
    deny: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, model: ModelConfig) -> FieldPolicy:
        """The model's policy; providers that are not OpenAI-compatible forward nothing
        of the client's raw body, so they get the empty policy."""
        rule = model.forward_fields
        if rule is None:
            if model.provider not in _COMPATIBLE:
                return cls()
            return cls(deny=frozenset(DEFAULT_DENIED_FIELDS))
        if rule.allow is not None:
            return cls(allow=frozenset(rule.allow) | _GATEWAY_FIELDS)
        return cls(deny=frozenset(rule.deny or ()))

    def check(self, body: Mapping[str, Any], model: str) -> None:
        """Raise InvalidRequest naming the first field ``body`` may not send."""
        if self.allow is not None:
            refused = [k for k, v in body.items() if k not in self.allow and _turns_on(v)]
        elif self.deny:
            refused = [k for k, v in body.items() if k in self.deny and _turns_on(v)]
        else:
            return
        if refused:
            name = sorted(refused)[0]
            raise InvalidRequest(
                f"The field '{name}' is not forwarded to the model '{model}' by this gateway "
                "(it can change the upstream's price or what it keeps); an operator can "
                "allow it with the model's forward_fields setting.",
                param=name,
                code="field_not_allowed",
            )


FORWARD_ALL = FieldPolicy()


def _turns_on(value: Any) -> bool:
    """``null`` and ``false`` ask for nothing (``store: false`` keeps less, not more)."""
    return value is not None and value is not False
