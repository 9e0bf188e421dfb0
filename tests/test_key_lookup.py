"""Key lookup and revocation (``daemon/auth.py``) against a real SQLite key store: which
keys get in, what each attempt is recorded as, the negative cache, revocations picked
up by the refresh, and a store that cannot be reached (a 503, never a 401)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.auth import ADMIN, Authenticator, Principal, bearer_token, credentials
from daemon.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from daemon.keys import create_key, hash_key
from daemon.ledger.sqlite import SQLiteStore
from tests.fakes import Failing
from tests.helpers import eventually

ADMIN_SECRET = "cv-admin-secret-for-tests"
# What a client reads: the key is never echoed, the fix is said.
MESSAGES = {
    "missing_api_key": "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
    "invalid_api_key": "Incorrect API key provided.",
}
KEY_CALLS = frozenset({"keys_generation", "list_keys", "key_spend", "find_key"})


class World:
    """An authenticator over a real store, with a clock the test moves."""

    def __init__(self, path: Path, refresh_interval_s: float = 3600.0) -> None:
        self.now = 1000.0
        self.store = Failing(
            SQLiteStore(path), KEY_CALLS, lambda: sqlite3.OperationalError("unable to open")
        )
        self.attempts: list[str] = []
        self.spend: list[dict[str, float]] = []
        self.revoked: list[str] = []
        self.auth = Authenticator(
            self.store,  # type: ignore[arg-type]
            admin_key_hash=hash_key(ADMIN_SECRET),
            clock=lambda: self.now,
            on_committed_spend=self.spend.append,
            on_revoked=self.revoked.append,
            refresh_interval_s=refresh_interval_s,
            on_attempt=self.attempts.append,
        )

    async def key(self, **kwargs: Any) -> tuple[str, str]:
        made = create_key(name=kwargs.pop("name", f"k{len(self.attempts)}"), now=1.0, **kwargs)
        await self.store.insert_key(made.record)
        return made.record.id, made.secret

    async def outcome(self, secret: str | None) -> str:
        header = None if secret is None else f"Bearer {secret}"
        try:
            principal = await self.auth.authenticate(header)
        except AuthenticationFailed as exc:
            assert exc.message == MESSAGES[exc.code]
            return f"401 {exc.code}"
        except ServiceUnavailable as exc:
            assert exc.message == "The key store cannot be reached; try again shortly."
            return f"503 {exc.headers}"
        return principal.key_id


def scenario(tmp_path: Path, body: Callable[[World], Awaitable[None]], **kw: Any) -> None:
    async def run() -> None:
        world = World(tmp_path / "ledger.db", **kw)
        await world.store.open()
        try:
            await body(world)
        finally:
            await world.auth.aclose()
            await world.store.close()

    asyncio.run(run())


def test_keys_in_memory_new_keys_from_the_store_and_each_attempt_recorded(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        early_id, early = await w.key(rpm=5, tpm=6, budget_usd=2.0, models=("m",))
        await w.auth.start()
        assert w.auth.active_keys == 2  # the key and the admin key
        assert w.spend[-1] == {early_id: 0.0}
        principal = await w.auth.authenticate(f"Bearer {early}")
        assert principal.key_id == early_id and principal.budget_usd == 2.0
        assert (principal.limits.rpm, principal.limits.tpm) == (5, 6)
        assert principal.models == frozenset({"m"}) and not principal.is_admin
        assert await w.auth.authenticate(f"Bearer {ADMIN_SECRET}") is ADMIN
        late_id, late = await w.key()  # created after start: found by one lookup
        assert await w.outcome(late) == late_id
        assert w.spend[-1] == {late_id: 0.0}
        assert await w.outcome(None) == "401 missing_api_key"
        assert await w.outcome("cv-wrong") == "401 invalid_api_key"
        assert w.attempts == ["success", "success", "success", "missing", "invalid"]
        w.attempts.clear()
        w.store.down = True  # found in memory, the store is not asked
        assert await w.outcome(late) == late_id and w.attempts == ["success"]

    scenario(tmp_path, body)


def test_unknown_keys_are_remembered_for_a_few_seconds(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.auth.start()
        made = create_key(name="soon", now=1.0)
        assert await w.outcome(made.secret) == "401 invalid_api_key"
        await w.store.insert_key(made.record)
        w.now = 1004.5  # still remembered as unknown: the store is not asked again
        assert await w.outcome(made.secret) == "401 invalid_api_key"
        w.now = 1005.0  # exactly five seconds on: forgotten
        assert await w.outcome(made.secret) == made.record.id
        assert w.attempts == ["invalid", "invalid", "success"]

    scenario(tmp_path, body)


def test_a_flood_of_unknown_keys_cannot_flood_the_store(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.auth.start()
        for i in range(3000):  # a minute's worth of lookups, all at once
            assert await w.outcome(f"cv-random-{i}") == "401 invalid_api_key"
        w.store.down = True  # a lookup now would be a 503: none is made
        made = create_key(name="new", now=1.0)
        assert await w.outcome(made.secret) == "401 invalid_api_key"
        assert set(w.attempts) == {"invalid"}
        w.store.down = False
        await w.store.insert_key(made.record)
        w.now += 0.02  # one lookup's worth (3000 a minute) has come back
        assert await w.outcome(made.secret) == made.record.id

    scenario(tmp_path, body)


def test_a_full_negative_cache_forgets_its_oldest_keys_not_the_newest(tmp_path: Path) -> None:
    """The negative cache is bounded (10,000 keys, expired ones included); once full, a
    new unknown key still shields the store for its five seconds: the oldest goes."""

    async def body(w: World) -> None:
        await w.auth.start()
        for i in range(10_000):  # the bound, a minute's allowance (3,000) at a time
            if i % 3000 == 0:
                w.now += 60.0
            assert await w.outcome(f"cv-random-{i}") == "401 invalid_api_key"
        w.now += 60.0  # this lookup is allowed: the store is asked, and says unknown
        made = create_key(name="late", now=1.0)
        assert await w.outcome(made.secret) == "401 invalid_api_key"
        w.store.down = True  # a lookup now would be a 503
        w.now += 1.0
        assert await w.outcome(made.secret) == "401 invalid_api_key"

    scenario(tmp_path, body)


class ReloadDuringLookup:
    """A real store whose ``find_key`` answers only after the authenticator has reloaded
    the keys meanwhile (``change`` runs first: a revocation, a new key)."""

    def __init__(self, world: World, change: Callable[[], Awaitable[None]]) -> None:
        self.world, self.change = world, change
        self.inner = world.store

    async def find_key(self, key_hash: str) -> Any:
        found = await self.inner.find_key(key_hash)
        await self.change()
        await self.world.auth.refresh()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_reload_during_a_lookup_wins_over_the_lookups_answer(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.auth.start()
        _, revoked = await w.key(name="revoked-meanwhile")
        w.auth.store = ReloadDuringLookup(w, lambda: w.store.revoke_key("revoked-meanwhile", 2.0))  # type: ignore[assignment]
        assert await w.outcome(revoked) == "401 invalid_api_key"
        assert w.attempts[-1] == "revoked"
        kept_id, kept = await w.key(name="kept")

        async def nothing() -> None:
            return None

        w.auth.store = ReloadDuringLookup(w, nothing)  # type: ignore[assignment]
        await w.store.insert_key(create_key(name="bump", now=1.0).record)  # a new generation
        principal = await w.auth.authenticate(f"Bearer {kept}")
        assert principal.key_id == kept_id and w.attempts[-1] == "success"

    scenario(tmp_path, body)


def test_a_revoked_key_is_refused_and_reported_as_revoked(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        kept_id, kept = await w.key(name="kept")
        gone_id, gone = await w.key(name="gone")
        await w.auth.start()
        assert await w.outcome(gone) == gone_id
        await w.store.revoke_key("gone", now=2.0)
        await w.auth.refresh()
        assert w.revoked == [gone_id]
        assert await w.outcome(gone) == "401 invalid_api_key"
        assert w.attempts[-1] == "revoked"
        assert await w.outcome(kept) == kept_id
        # Revoked before this process ever saw it: the lookup says so too.
        late_id, late = await w.key(name="late")
        await w.store.revoke_key(late_id, now=3.0)
        assert await w.outcome(late) == "401 invalid_api_key" and w.attempts[-1] == "revoked"

    scenario(tmp_path, body)


def test_an_unreachable_store_is_a_503_for_unknown_keys_only(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        known_id, known = await w.key(name="known")
        await w.auth.start()
        _, other = await w.key(name="other")
        w.store.down = True
        assert await w.outcome(other) == "503 {'Retry-After': '1'}"
        assert w.attempts == ["error"]
        assert await w.outcome(known) == known_id
        w.store.down = False
        assert await w.outcome(other) != "503 {'Retry-After': '1'}"  # not remembered as bad

    scenario(tmp_path, body)


def test_the_refresh_loop_reports_the_store_and_recovers(tmp_path: Path) -> None:
    async def body(w: World) -> None:
        await w.auth.start()
        assert w.auth.store_reachable and w.auth.last_refresh_error is None
        w.store.down = True
        await eventually(lambda: not w.auth.store_reachable)
        assert w.auth.last_refresh_error == "OperationalError: unable to open"
        w.store.down = False
        await eventually(lambda: w.auth.store_reachable)
        assert w.auth.last_refresh_error is None
        # Between generations the loop still brings other replicas' committed spend.
        key_id, _ = await w.key(name="spender")
        await eventually(lambda: any(key_id in s for s in w.spend))
        assert "chatvault-key-refresh" in {t.get_name() for t in asyncio.all_tasks()}
        await w.auth.aclose()  # the refresh stops with it
        assert "chatvault-key-refresh" not in {t.get_name() for t in asyncio.all_tasks()}

    scenario(tmp_path, body, refresh_interval_s=0.01)


def test_bearer_tokens_and_alternative_credentials() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer\tabc ") == "abc"
    assert bearer_token("BEARER   abc") == "abc"
    assert bearer_token("Bearer two words") == "two words"  # the rest, whatever it is
    for bad in (None, "", "Basic abc", "Bearer", "Bearer   ", "abc"):
        assert bearer_token(bad) is None
    assert credentials("Bearer a", "b") == "Bearer a"
    assert credentials(None, " b ") == "Bearer b"
    assert credentials(None, "   ") is None and credentials(None, None) is None


def test_admin_check_and_model_permissions() -> None:
    async def body() -> None:
        store = SQLiteStore(":memory:")
        auth = Authenticator(store, admin_key_hash=hash_key(ADMIN_SECRET), clock=lambda: 0.0)
        assert auth.is_admin(f"Bearer {ADMIN_SECRET}")
        assert not auth.is_admin("Bearer cv-other") and not auth.is_admin(None)

    asyncio.run(body())
    record = create_key(name="n", models=("a",), now=1.0).record
    principal = Principal.from_record(record)
    assert principal.may_use("a") and not principal.may_use("b")
    principal.require_model("a")
    with pytest.raises(PermissionDenied) as denied:
        principal.require_model("b")
    assert denied.value.param == "model" and "'b'" in str(denied.value.message)
    assert Principal.from_record(create_key(name="any", now=1.0).record).may_use("anything")
