"""Who is calling: ``Authorization: Bearer <key>`` to a ``Principal``, from memory.

Active keys are held in a dict by hash, so authenticating costs one SHA-256 and one
lookup. A key not in memory is looked up once in the store (it may have been created
a moment ago by ``chatvault keys create``); unknown hashes are remembered briefly so
a client hammering with a bad key cannot hammer the database. A background refresh
reloads the keys whenever the store's key generation changes, which is how keys
created or revoked by the CLI take effect without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import AuthenticationFailed, ModelNotFound, PermissionDenied, ServiceUnavailable
from daemon.keys import ADMIN_KEY_ID, KeyRecord, hash_key
from daemon.ledger.base import Store
from daemon.limits import KeyLimits, take

log = logging.getLogger("chatvault.auth")

_NEGATIVE_TTL_S = 5.0
_NEGATIVE_MAX = 10_000
_LOOKUPS_PER_MINUTE = 3000


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    user_type: str
    limits: KeyLimits
    budget_usd: float | None = None
    models: frozenset[str] | None = None  # None: every model
    is_admin: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def require_model(self, model: str, *, as_unknown: bool = False) -> None:
        """``as_unknown``: refuse exactly as for a model that does not exist (the
        router's 404), so a key cannot learn which models exist by probing names."""
        if self.may_use(model):
            return
        if as_unknown:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        raise PermissionDenied(
            f"This key is not allowed to use the model '{model}'.", param="model"
        )

    @classmethod
    def from_record(cls, record: KeyRecord) -> Principal:
        return cls(
            key_id=record.id,
            name=record.name,
            user_type=record.user_type,
            limits=KeyLimits(record.id, record.rpm, record.tpm),
            budget_usd=record.budget_usd,
            models=frozenset(record.models) if record.models is not None else None,
        )


ADMIN = Principal(
    key_id=ADMIN_KEY_ID,
    name="admin",
    user_type="admin",
    limits=KeyLimits(ADMIN_KEY_ID),
    is_admin=True,
)


def bearer_token(header: str | None) -> str | None:
    """The key in ``Bearer <key>``; tabs or several spaces after the scheme are fine."""
    if not header:
        return None
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def credentials(authorization: str | None, api_key: str | None) -> str | None:
    """The Authorization header, or one built from ``x-api-key`` (what clients of other
    APIs send), so that either reaches ``bearer_token``."""
    if authorization:
        return authorization
    if api_key and api_key.strip():
        return "Bearer " + api_key.strip()
    return None


class Authenticator:
    """Keys in memory, refreshed from the store.

    ``auth = Authenticator(store, admin_key_hash=hash_key(admin_key), clock=time.monotonic)``
    """

    def __init__(
        self,
        store: Store,
        *,
        admin_key_hash: str,
        clock: Callable[[], float],
        on_committed_spend: Callable[[dict[str, float]], None] = lambda totals: None,
        on_revoked: Callable[[str], None] = lambda key_id: None,
        refresh_interval_s: float = 1.0,
        on_attempt: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.admin_key_hash = admin_key_hash
        self.clock = clock
        self.on_committed_spend = on_committed_spend  # each key's spend the ledger has
        self.on_revoked = on_revoked  # a key that was active is gone
        self.refresh_interval_s = refresh_interval_s
        self.on_attempt = on_attempt  # result: success | invalid | missing | revoked | error
        self._by_hash: dict[str, Principal] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._generation = -1
        self._lookup_tat = 0.0
        self._task: asyncio.Task[None] | None = None
        self.last_refresh_error: str | None = None
        self.store_reachable = True

    @property
    def active_keys(self) -> int:
        return len(self._by_hash)

    async def start(self) -> None:
        await self.refresh(force=True)
        self._task = asyncio.create_task(self._refresh_loop(), name="chatvault-key-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self, force: bool = False) -> None:
        generation = await self.store.keys_generation()
        if force or generation != self._generation:
            records = await self.store.list_keys()
            by_hash = {r.key_hash: Principal.from_record(r) for r in records}
            by_hash[self.admin_key_hash] = ADMIN
            gone = {p.key_id for p in self._by_hash.values()} - {p.key_id for p in by_hash.values()}
            self._by_hash = by_hash
            self._unknown.clear()
            self._generation = generation
            self.on_committed_spend({r.id: r.spend_usd for r in records})
            for key_id in gone:
                self.on_revoked(key_id)
        else:
            # Other workers' and replicas' committed spend.
            self.on_committed_spend(await self.store.key_spend())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
                self.store_reachable, self.last_refresh_error = True, None
            except Exception as exc:  # keep serving from memory; health shows it
                self.store_reachable = False
                self.last_refresh_error = f"{type(exc).__name__}: {exc}"
                log.warning("key refresh failed: %s", self.last_refresh_error)

    def _record(self, result: str) -> None:
        if self.on_attempt is not None:
            self.on_attempt(result)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            self._record("missing")
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        key_hash = hash_key(token)
        principal = self._by_hash.get(key_hash)
        if principal is not None:
            self._record("success")
            return principal
        principal, result = await self._lookup(key_hash)
        self._record(result)
        if result == "error":
            raise ServiceUnavailable(
                "The key store cannot be reached; try again shortly.", headers={"Retry-After": "1"}
            )
        if principal is None:
            # Never echo the key, not even a part of it.
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal

    async def _lookup(self, key_hash: str) -> tuple[Principal | None, str]:
        now = self.clock()
        expires = self._unknown.get(key_hash)
        if expires is not None and expires > now:
            return None, "invalid"
        # Lookups of unknown keys are rate-limited, so a flood of random keys cannot
        # flood the database; past the limit, new keys wait for the next refresh.
        check = take(self._lookup_tat, now, _LOOKUPS_PER_MINUTE)
        if not check.allowed:
            return None, "invalid"
        self._lookup_tat = check.tat
        generation = self._generation
        try:
            record = await self.store.find_key(key_hash)
        except Exception as exc:
            log.warning("key lookup failed: %s: %s", type(exc).__name__, exc)
            return None, "error"
        if record is None or not record.active:
            self._unknown[key_hash] = now + _NEGATIVE_TTL_S
            self._unknown.move_to_end(key_hash)
            while len(self._unknown) > _NEGATIVE_MAX:
                self._unknown.popitem(last=False)
            return None, "invalid" if record is None else "revoked"
        if self._generation != generation:
            # Keys were reloaded meanwhile (a revocation, perhaps): trust the reload.
            fresh = self._by_hash.get(key_hash)
            return fresh, "success" if fresh is not None else "revoked"
        principal = Principal.from_record(record)
        self._by_hash[key_hash] = principal
        self.on_committed_spend({record.id: record.spend_usd})
        return principal, "success"

    def is_admin(self, authorization: str | None) -> bool:
        token = bearer_token(authorization)
        return token is not None and hash_key(token) == self.admin_key_hash
