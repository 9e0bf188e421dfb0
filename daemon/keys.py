"""API keys: how they look, how they are stored, and what a stored key allows.

A key is 32 random bytes, so a plain SHA-256 of it is a safe stored form (slow
password hashes exist for guessable secrets; these are not guessable) and hashing
costs a microsecond on the request path. Only the hash and a short display prefix
are ever stored; the key itself is printed once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from daemon.config import USER_TYPES

KEY_PREFIX = "cv-"
ADMIN_KEY_ID = "admin"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    """Enough of a key to recognise it in a list, far too little to use it."""
    return key[: len(KEY_PREFIX) + 4] + "…"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    key_hash: str
    prefix: str
    user_type: str = "standard"
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    models: tuple[str, ...] | None = None  # None: every configured model
    created_at: float = 0.0
    revoked_at: float | None = None
    spend_usd: float = 0.0

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def validate_new_key(
    name: str,
    user_type: str,
    rpm: int | None,
    tpm: int | None,
    budget_usd: float | None,
) -> None:
    """Raise ValueError with a message for an operator."""
    if not name.strip():
        raise ValueError("--name must not be empty")
    if user_type not in USER_TYPES:
        raise ValueError(f"--user-type must be one of {', '.join(USER_TYPES)}")
    for flag, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive number")
    if budget_usd is not None and budget_usd < 0:
        raise ValueError("--budget-usd must not be negative")


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly created key: the record to store and the secret to show once."""

    record: KeyRecord
    secret: str = field(repr=False)


def create_key(
    *,
    name: str,
    user_type: str = "standard",
    rpm: int | None = None,
    tpm: int | None = None,
    budget_usd: float | None = None,
    models: tuple[str, ...] | None = None,
    now: float,
) -> NewKey:
    validate_new_key(name, user_type, rpm, tpm, budget_usd)
    secret = new_key()
    record = KeyRecord(
        id=new_key_id(),
        name=name.strip(),
        key_hash=hash_key(secret),
        prefix=display_prefix(secret),
        user_type=user_type,
        rpm=rpm,
        tpm=tpm,
        budget_usd=budget_usd,
        models=models,
        created_at=now,
    )
    return NewKey(record, secret)
