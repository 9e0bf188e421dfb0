"""Structured logs: one JSON object per line on stderr, for people and for log shippers.

Fields passed as ``extra={"fields": {...}}`` become top-level keys, so the access log
line of a request carries its request id, trace id, key id, model and status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def logging_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the daemon, uvicorn's loggers included."""
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JSONFormatter}},
        "handlers": {"stderr": handler},
        "loggers": {
            "chatvault": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "LiteLLM": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "opentelemetry": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
        },
    }


def now_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
