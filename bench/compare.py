"""``python -m bench --compare [--before PATH]``: one code base against another, and the
default state backends against the shared ones, side by side in one run.

Gateways, all with every feature on and a key with rpm, tpm and budget limits (so the
limiter and the budget reservation run on every request):

- ``before``: another checkout (``--before``), run by its own ``.venv/bin/python`` from
  its own tree, with memory limits and the SQLite ledger;
- ``after``: this checkout, memory limits and the SQLite ledger (the default);
- ``shared``: this checkout, limits in Redis and the ledger in PostgreSQL (a database
  created for the run and dropped after it, a key prefix of its own in Redis).

They run at the same time and are measured in interleaved rounds (the order rotates each
round), so a noisy neighbour hits them alike: CPU per request from the gateway's own
counters and req/s at concurrency 32, then added latency at concurrency 1 against the
upstream direct, measured just before. Medians of the rounds are reported with their
range. Redis commands per request come from ``INFO commandstats`` deltas over the shared
gateway's rounds, less the background seen over the other gateways' rounds of the same
size (the Redis is shared with other users), and from ``MONITOR`` filtered to the shared
gateway's own connections, which tells what it sent itself from what its scripts ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis

from bench import load
from bench.__main__ import (
    REPO,
    Gateway,
    Processes,
    free_port,
    gateway_config,
    ledger_cpu_per_row,
    ms,
    request_bytes,
    run_load,
    start_gateway,
    wait_port,
)

# Which commands are the gateway's own round trips: the rest are run by its scripts.
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


@dataclass
class Contender:
    name: str
    python: str
    repo: Path
    extra: dict[str, Any] = field(default_factory=dict)
    gateway: Gateway | None = None
    request: bytes = b""
    cpu_ms: list[float] = field(default_factory=list)
    rps_c32: list[float] = field(default_factory=list)
    added_p50: list[float] = field(default_factory=list)
    added_p99: list[float] = field(default_factory=list)
    redis_cmds: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    errors: int = 0


def checkout_python(repo: Path) -> str:
    own = repo / ".venv" / "bin" / "python"
    return str(own) if own.exists() else sys.executable


def code_origin(python: str, repo: Path) -> str:
    """Where ``python -m`` run from ``repo`` imports the daemon from; it must be ``repo``,
    or the comparison would measure one code base twice."""
    probe = (
        "import sys, daemon.app, chatvault_cli.main\n"
        "for name, m in sorted(sys.modules.items()):\n"
        "    if name.split('.')[0] in ('daemon', 'chatvault_cli') and getattr(m, '__file__', None):\n"
        "        print(m.__file__)\n"
    )
    files = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=True, cwd=repo
    ).stdout.split()
    strays = [f for f in files if not Path(f).resolve().is_relative_to(repo.resolve())]
    if strays:
        raise RuntimeError(f"{python} in {repo} imports modules from elsewhere: {strays[:3]}")
    return str(Path(files[0]).parent)


def describe(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=repo
        ).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "daemon", "chatvault_cli")
    return {
        "path": str(repo),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_daemon_or_cli_files": len(changed.splitlines()),
    }


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def monitor_gateway(client_url: str, gw: Gateway, request: bytes, count: int) -> dict[str, Any]:
    """What the gateway sends Redis over ``count`` requests at concurrency 8, counted
    on its own connections (MONITOR), and what its scripts run in Redis."""
    redis_port = urlsplit(client_url).port or 6379
    ports: set[int] = set()
    for p in gw.tree():
        with contextlib.suppress(psutil.Error):
            ports |= {
                c.laddr.port
                for c in p.net_connections("tcp")
                if c.raddr and c.raddr.port == redis_port
            }
    marker = f"cvbench-stop-{time.time_ns()}"
    sent: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    ready = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(client_url).monitor() as m:  # type: ignore[no-untyped-call]
            ready.set()
            for event in m.listen():
                command = str(event.get("command", ""))
                if marker in command:
                    return
                name = command.split(" ", 1)[0].lower()
                if event.get("client_type") == "lua":
                    scripted[name] += 1
                elif int(event.get("client_port") or 0) in ports:
                    sent[name] += 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    result = run_load(gw.port, request, 8, count=count)
    time.sleep(0.5)  # settlements are sent by a background task
    redis.Redis.from_url(client_url).echo(marker)
    thread.join(10)
    n = max(result.requests, 1)
    return {
        "requests": result.requests,
        "gateway_connections": len(ports),
        "sent_per_request": {k: round(v / n, 3) for k, v in sent.most_common()},
        "sent_total_per_request": round(sum(sent.values()) / n, 3),
        "script_calls_per_request": round(sum(sent[c] for c in SCRIPT_CALLS) / n, 3),
        "run_by_scripts_per_request": {k: round(v / n, 3) for k, v in scripted.most_common()},
    }


async def _admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def compare(args: argparse.Namespace) -> dict[str, Any]:
    sizes = (
        {"warmup": 300, "cpu": 800, "c1": 100, "rounds": 2, "monitor": 200, "ledger_rows": 2000}
        if args.quick
        else {
            "warmup": 1500,
            "cpu": 3000,
            "c1": 400,
            "rounds": args.rounds,
            "monitor": 1000,
            "ledger_rows": 10_000,
        }
    )
    stamp = time.time_ns()
    database = f"cvbench_{os.getpid()}_{stamp}"
    prefix = f"cvbench-{stamp}"
    admin_url = args.pg_admin_url
    pg_url = admin_url.rsplit("/", 1)[0] + "/" + database
    shared = {
        "limits": {"backend": "redis", "redis_url": args.redis_url, "key_prefix": prefix},
        "ledger": {"url": pg_url},
    }
    contenders = []
    if args.before:
        before = Path(args.before).resolve()
        contenders.append(Contender("before", checkout_python(before), before))
    contenders += [
        Contender("after", sys.executable, REPO),
        Contender("shared", sys.executable, REPO, shared),
    ]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "sizes": sizes,
        "checkouts": {c.name: {**describe(c.repo), "python": c.python} for c in contenders},
    }
    for c in contenders:
        results["checkouts"][c.name]["imports_daemon_from"] = code_origin(c.python, c.repo)
    r = redis.Redis.from_url(args.redis_url)
    procs = Processes()
    directory = Path(tempfile.mkdtemp(prefix="chatvault-compare-"))
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{database}"'))
    try:
        upstream, otlp = free_port(), free_port()
        procs.start(
            [sys.executable, "-m", "bench.upstream", "--port", str(upstream), "--chunks", "16"]
        )
        procs.start([sys.executable, "-m", "bench.otlp", "--port", str(otlp)])
        wait_port(upstream)
        wait_port(otlp)
        direct = request_bytes(upstream, "/v1/chat/completions", None, stream=False)
        for c in contenders:
            config = gateway_config(
                directory / c.name, upstream, otlp, tracing=True, metrics=True, extra=c.extra
            )
            c.gateway = start_gateway(procs, config, python=c.python, repo=c.repo)
            c.request = request_bytes(c.gateway.port, "/v1/chat/completions", c.gateway.key, False)
            run_load(c.gateway.port, c.request, 8, count=sizes["warmup"])
        run_load(upstream, direct, 8, count=sizes["warmup"])

        for i in range(sizes["rounds"]):
            order = contenders[i % len(contenders) :] + contenders[: i % len(contenders)]
            for c in order:
                assert c.gateway is not None
                gw = c.gateway
                before_cmds = commandstats(r)
                cpu_before = gw.cpu_seconds()
                res = run_load(gw.port, c.request, 32, count=sizes["cpu"])
                time.sleep(0.3)  # the ledger writer and span exporter's CPU counts too
                used = gw.cpu_seconds() - cpu_before
                c.redis_cmds += commandstats(r) - before_cmds
                c.requests += res.requests
                c.cpu_ms.append(ms(used / max(res.requests, 1)))
                c.rps_c32.append(res.rate)
                d = run_load(upstream, direct, 1, count=sizes["c1"])
                g = run_load(gw.port, c.request, 1, count=sizes["c1"])
                c.added_p50.append(
                    ms(load.percentile(g.latencies, 50) - load.percentile(d.latencies, 50))
                )
                c.added_p99.append(
                    ms(load.percentile(g.latencies, 99) - load.percentile(d.latencies, 99))
                )
                c.errors += res.errors + g.errors
        shared_gw = contenders[-1].gateway
        assert shared_gw is not None
        results["redis_monitor_shared"] = monitor_gateway(
            args.redis_url, shared_gw, contenders[-1].request, sizes["monitor"]
        )
        for c in contenders:
            assert c.gateway is not None
            procs.stop(c.gateway.process)

        # Background Redis traffic (other users of the server): the rounds of the gateways
        # that do not use Redis, per request they served in the same time.
        others = [c for c in contenders if c.name != "shared"]
        background = sum((c.redis_cmds for c in others), Counter())
        other_requests = max(sum(c.requests for c in others), 1)
        sh = contenders[-1]
        per_req = {
            k: round(v / max(sh.requests, 1) - background[k] / other_requests, 3)
            for k, v in sh.redis_cmds.most_common()
        }
        results["redis_commandstats_shared"] = {
            "per_request_less_background": {k: v for k, v in per_req.items() if abs(v) >= 0.005},
            "background_per_request": round(sum(background.values()) / other_requests, 3),
        }
        results["contenders"] = {
            c.name: {
                "cpu_ms_per_request": spread(c.cpu_ms),
                "rps_c32": spread(c.rps_c32),
                "added_p50_ms_c1": spread(c.added_p50),
                "added_p99_ms_c1": spread(c.added_p99),
                "rounds": len(c.cpu_ms),
                "errors": c.errors,
                "cpu_ms_by_round": c.cpu_ms,
            }
            for c in contenders
        }
        results["ledger_cpu_us_per_row"] = {
            "sqlite": ledger_cpu_per_row(directory, sizes["ledger_rows"]),
            "postgresql_gateway_side": ledger_cpu_per_row(
                directory, sizes["ledger_rows"], postgres_url=pg_url
            ),
        }
    finally:
        procs.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(Exception):
            asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        with contextlib.suppress(Exception):
            for key in r.scan_iter(match=f"{prefix}*", count=1000):
                r.delete(key)
    cpu = {n: v["cpu_ms_per_request"]["median"] for n, v in results["contenders"].items()}
    results["ratios"] = {"shared_to_after_cpu": round(cpu["shared"] / cpu["after"], 3)}
    if "before" in cpu:
        results["ratios"]["after_to_before_cpu"] = round(cpu["after"] / cpu["before"], 3)
    # Ratios within each round (the gateways ran minutes apart at most): less noisy than
    # the ratio of medians when the machine's load drifts over the run.
    by_name = {c.name: c.cpu_ms for c in contenders}
    pairs = [("shared", "after")] + ([("after", "before")] if "before" in by_name else [])
    for a, b in pairs:
        paired = [x / y for x, y in zip(by_name[a], by_name[b], strict=True)]
        results["ratios"][f"{a}_to_{b}_cpu_by_round"] = spread(paired)
    return results


def table(r: dict[str, Any]) -> str:
    lines = [f"ChatVault side by side · {r['date']}"]
    for name, c in r["checkouts"].items():
        lines.append(
            f"  {name:7} {c['commit']} ({c['path']}, {c['uncommitted_daemon_or_cli_files']} "
            f"uncommitted daemon/CLI files) python {c['python']}"
        )
    lines += [
        "",
        f"{'gateway':8} {'CPU ms/req':>22} {'req/s c=32':>20} {'added p50 ms c=1':>22} {'added p99 ms c=1':>22}",
    ]

    def cell(s: dict[str, float]) -> str:
        return f"{s['median']} [{s['min']}..{s['max']}]"

    for name, c in r["contenders"].items():
        lines.append(
            f"{name:8} {cell(c['cpu_ms_per_request']):>22} {cell(c['rps_c32']):>20} "
            f"{cell(c['added_p50_ms_c1']):>22} {cell(c['added_p99_ms_c1']):>22}  errors {c['errors']}"
        )
    mon = r["redis_monitor_shared"]
    lines += [
        "",
        f"ratios: {r['ratios']}",
        f"Redis, shared gateway: sent {mon['sent_total_per_request']} commands/request "
        f"({mon['script_calls_per_request']} script calls) {mon['sent_per_request']}; "
        f"run by scripts {mon['run_by_scripts_per_request']}",
        f"Redis commandstats per request less background: "
        f"{r['redis_commandstats_shared']['per_request_less_background']}",
        f"ledger CPU µs/row: {r['ledger_cpu_us_per_row']}",
    ]
    return "\n".join(lines)
