"""``chatvault db``: the ledger's schema version and migrations.

The daemon applies pending migrations when it starts (``ledger.migrate_on_start``);
these commands are for operators who migrate before deploying, and for seeing where
a database stands. Exit codes: 0 done, 1 the database cannot be used or migrated,
2 a bad config.
"""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from chatvault_cli import render
from chatvault_cli.common import ConfigOption, JsonOption, err, load_settings, out, print_json

db_app = typer.Typer(help="The ledger database's schema: version and migrations.")


def _run(settings: Any, migrate: bool) -> dict[str, Any]:
    from daemon.ledger import open_store, redact_url

    async def go() -> dict[str, Any]:
        store = open_store(settings.ledger.url, migrate="none")
        await store.open()
        try:
            applied = await store.migrate() if migrate else []
            status = await store.schema_status()
        finally:
            await store.close()
        return {
            "backend": store.kind,
            "location": store.description,
            "version": status.version,
            "latest": status.latest,
            "legacy": status.legacy,
            "applied": [{"version": v, "name": n, "applied_at": at} for v, n, at in status.applied],
            "pending": [{"version": v, "name": n} for v, n in status.pending],
            "applied_now": [{"version": v, "name": n} for v, n in applied],
        }

    try:
        return asyncio.run(go())
    except Exception as exc:  # the database's own errors: one line, no credentials
        from daemon.ledger.base import redact_text

        url = settings.ledger.url
        message = redact_text(f"{type(exc).__name__}: {exc}", url)
        render.error(err, f"ledger {redact_url(url)}: {message}")
        raise typer.Exit(1) from None


def _print(result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(result)
        return
    out.print(f"ledger: {result['backend']} {result['location']}", soft_wrap=True, markup=False)
    for m in result["applied_now"]:
        render.success(out, f"applied migration {m['version']}: {m['name']}")
    version = result["version"]
    shown = f"schema version {version} (this release: {result['latest']})"
    if result["legacy"]:
        shown = f"schema from before versions existed (this release: {result['latest']})"
    elif version == 0:
        shown = f"no ChatVault tables yet (this release: {result['latest']})"
    out.print(shown, markup=False)
    for m in result["pending"]:
        out.print(f"  pending {m['version']}: {m['name']}", markup=False, soft_wrap=True)
    if result["pending"]:
        out.print("run `chatvault db migrate` to apply them", markup=False)
    elif version > result["latest"]:
        render.warning(out, "the database is newer than this release: upgrade ChatVault")
    else:
        out.print("up to date", markup=False)


@db_app.command("status")
def status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """The schema version and the migrations still pending (changes nothing)."""
    _print(_run(load_settings(config), migrate=False), json_out)


@db_app.command("migrate")
def migrate(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Apply pending migrations, under a lock (safe while daemons start or run)."""
    _print(_run(load_settings(config), migrate=True), json_out)
