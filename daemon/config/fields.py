"""The field types config.yaml's sections share, and their strict base class."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not a URL")
    return value.rstrip("/")


def _env_name(value: str) -> str:
    if not value or not value.replace("_", "").isalnum() or value[0].isdigit():
        raise ValueError("not an environment variable name")
    return value


def _redis_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("not a Redis URL (redis://host:port/db)")
    return value


HttpUrl = Annotated[str, AfterValidator(_url)]
EnvName = Annotated[str, AfterValidator(_env_name)]
RedisUrl = Annotated[str, AfterValidator(_redis_url)]
Positive = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them with their path.
    model_config = ConfigDict(extra="forbid", frozen=True)
