"""``make bench``: the gateway's own cost, measured side by side with the upstream direct.

One command starts a fast mock upstream, a live OTLP collector and ChatVault with every
feature on (auth, limits, budget, ledger, metrics, tracing), then measures in one run:
added latency at concurrency 1 (non-stream and time to first token), throughput at
concurrency 32 and 64 against the direct upstream, the gateway's CPU time per request
from its own counters, RSS after warm-up and after a long run, start-up time to ready,
the cost of each feature (variants with tracing and metrics off), and two workers.
It prints a table, writes JSON, is bounded in time, and stops every process it started.

    python -m bench [--quick] [--out bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench import load

ADMIN_KEY = "cv-bench-admin-key"
REPO = Path(__file__).resolve().parent.parent
PROMPT = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


class Processes:
    """Every process the benchmark starts, stopped on exit whatever happens."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        out = log.open("ab") if log else subprocess.DEVNULL
        process = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.running:
            self.running.remove(process)
        return process.returncode

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process, timeout=10)


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    key: str
    startup_s: float

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        children = root.children(recursive=True)
        return children or [root]  # workers when there are any; else the process itself

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> list[float]:
        return [round(p.memory_info().rss / 1_048_576, 1) for p in self.tree()]


def gateway_config(
    directory: Path,
    upstream_port: int,
    otlp_port: int,
    *,
    tracing: bool,
    metrics: bool,
    workers: int = 1,
    extra: dict[str, Any] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": free_port(),
            "workers": workers,
            "access_log": False,
        },
        "data_dir": "data",
        "ledger": {"url": "sqlite:///data/ledger.db"},
        "models": [
            {
                "name": "bench",
                "provider": "openai",
                "model": "bench-model",
                "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
            }
        ],
        "monitoring": {
            "metrics": {"enabled": metrics},
            "tracing": {"enabled": tracing, "endpoint": f"http://127.0.0.1:{otlp_port}"},
            "health": {"probe_interval_s": 30},
        },
    }
    config.update(extra or {})  # e.g. a shared limit store and ledger (bench/compare.py)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(
    procs: Processes, config: Path, python: str = sys.executable, repo: Path = REPO
) -> Gateway:
    """``python`` and ``repo``: another checkout's interpreter and tree, whose code then
    runs (``-m`` imports from the working directory first; bench/compare.py checks)."""
    port = int(yaml.safe_load(config.read_text())["server"]["port"])
    env = {"CHATVAULT_ADMIN_KEY": ADMIN_KEY}
    created = subprocess.run(
        [
            python,
            "-m",
            "chatvault_cli",
            "keys",
            "create",
            "--name",
            f"bench-{time.time_ns()}",
            "--rpm",
            "100000000",
            "--tpm",
            "10000000000",
            "--budget-usd",
            "1000000",
            "--json",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        cwd=repo,
    )
    key = json.loads(created.stdout)["key"]
    started = time.perf_counter()
    process = procs.start(
        [python, "-m", "chatvault_cli", "serve", "--config", str(config)],
        env=env,
        log=config.parent / "gateway.log",
        cwd=repo,
    )
    ready_s = wait_ready(port, started)
    return Gateway(process, port, key, ready_s)


def wait_ready(port: int, started: float, path: str = "/readyz", timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=0.5).status_code == 200:
                return time.perf_counter() - started
        time.sleep(0.005)
    raise RuntimeError(f"port {port} not ready in {timeout}s")


def request_bytes(port: int, path: str, key: str | None, stream: bool) -> bytes:
    body = dict(PROMPT, stream=True) if stream else PROMPT
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return load.build_request("127.0.0.1", port, path, json.dumps(body).encode(), headers)


def run_load(
    port: int,
    request: bytes,
    concurrency: int,
    *,
    count: int | None = None,
    duration: float | None = None,
) -> load.Result:
    async def go() -> load.Result:
        return await load.run(
            "127.0.0.1", port, request, concurrency=concurrency, count=count, duration=duration
        )

    try:
        import uvloop

        return uvloop.run(go())
    except ImportError:
        return asyncio.run(go())


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def latency_pair(direct: load.Result, gateway: load.Result, ttft: bool = False) -> dict[str, float]:
    d = direct.ttfts if ttft else direct.latencies
    g = gateway.ttfts if ttft else gateway.latencies
    out = {}
    for q in (50, 99):
        out[f"direct_p{q}_ms"] = ms(load.percentile(d, q))
        out[f"gateway_p{q}_ms"] = ms(load.percentile(g, q))
        out[f"added_p{q}_ms"] = round(out[f"gateway_p{q}_ms"] - out[f"direct_p{q}_ms"], 3)
    return out


def cpu_per_request(
    gw: Gateway, request: bytes, count: int, concurrency: int = 32
) -> tuple[float, int]:
    before = gw.cpu_seconds()
    result = run_load(gw.port, request, concurrency, count=count)
    time.sleep(0.3)  # let the ledger writer and span exporter catch up: their CPU counts too
    used = gw.cpu_seconds() - before
    return ms(used / max(result.requests, 1)), result.errors


def interleaved_cpu(
    targets: dict[str, tuple[Gateway, bytes]], rounds: int, count: int
) -> tuple[dict[str, float], dict[str, float], int]:
    """CPU per request of each named (gateway, request), in interleaved rounds so that a
    noisy neighbour affects them alike: the median per name, its ratio to the first
    name's, and the errors seen."""
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    errors = 0
    for _ in range(rounds):
        for name, (gw, request) in targets.items():
            used, e = cpu_per_request(gw, request, count)
            cpu[name].append(used)
            errors += e
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    base = next(iter(medians.values()))
    return medians, {name: m / base for name, m in medians.items()}, errors


def startup_times(procs: Processes, directory: Path, runs: int) -> dict[str, float]:
    """`chatvault serve` on a copy of the shipped config: spawn to /livez and to /readyz."""
    live, ready = [], []
    for i in range(runs):
        d = directory / f"startup-{i}"
        d.mkdir(parents=True)
        config = yaml.safe_load((REPO / "config.yaml").read_text())
        config["server"]["port"] = port = free_port()
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        started = time.perf_counter()
        process = procs.start(
            [sys.executable, "-m", "chatvault_cli", "serve", "--config", str(d / "config.yaml")],
            env={"CHATVAULT_ADMIN_KEY": ADMIN_KEY},
        )
        live.append(wait_ready(port, started, "/livez"))
        ready.append(wait_ready(port, started, "/readyz"))
        procs.stop(process)
    return {"to_live_s": round(min(live), 3), "to_ready_s": round(min(ready), 3), "runs": runs}


VARIANTS = (
    ("all-on", True, True),
    ("tracing-off", False, True),
    ("metrics-off", True, False),
    ("tracing-and-metrics-off", False, False),
)


def measure_variants(
    procs: Processes, directory: Path, upstream: int, otlp: int, sizes: dict[str, Any]
) -> list[dict[str, Any]]:
    """All variants run side by side and are measured in interleaved rounds, so that
    a noisy neighbour affects them alike; the median round is reported."""
    gateways = {
        name: start_gateway(
            procs, gateway_config(directory / name, upstream, otlp, tracing=t, metrics=m)
        )
        for name, t, m in VARIANTS
    }
    requests = {
        name: request_bytes(gw.port, "/v1/chat/completions", gw.key, stream=False)
        for name, gw in gateways.items()
    }
    for name, gw in gateways.items():
        run_load(gw.port, requests[name], 8, count=sizes["warmup"])
    cpu: dict[str, list[float]] = {name: [] for name in gateways}
    p50: dict[str, list[float]] = {name: [] for name in gateways}
    errors = 0
    for _ in range(sizes["rounds"]):
        for name, gw in gateways.items():
            used, e = cpu_per_request(gw, requests[name], sizes["cpu"])
            cpu[name].append(used)
            c1 = run_load(gw.port, requests[name], 1, count=sizes["c1"] // sizes["rounds"])
            p50[name].append(ms(load.percentile(c1.latencies, 50)))
            errors += e + c1.errors
    for gw in gateways.values():
        procs.stop(gw.process)
    base = statistics.median(cpu["all-on"])
    return [
        {
            "variant": name,
            "cpu_ms_per_request": round(statistics.median(cpu[name]), 3),
            "cpu_ratio_to_all_on": round(statistics.median(cpu[name]) / base, 3),
            "c1_p50_ms": round(statistics.median(p50[name]), 3),
            "rounds": sizes["rounds"],
            "errors": errors,
        }
        for name in gateways
    ]


def routing_config(
    directory: Path, upstream: int, otlp: int, deployments: int, cache: bool
) -> Path:
    """All features on; ``deployments`` entries of the model ``bench`` (weighted, the
    default strategy), and the memory response cache on or off."""
    models = [
        {
            "name": "bench",
            "provider": "openai",
            "model": f"bench-model-{i}",
            "api_base": f"http://127.0.0.1:{upstream}/v1",
            "pricing": {"input_per_million": 0.15, "output_per_million": 0.60},
        }
        for i in range(deployments)
    ]
    extra: dict[str, Any] = {"models": models}
    if cache:
        extra["cache"] = {"enabled": True, "backend": "memory"}
    return gateway_config(directory, upstream, otlp, tracing=True, metrics=True, extra=extra)


# name, deployments, cache on, the client's Cache-Control (no-cache: a proxied miss that
# is hashed and stored, as every miss is, without the lookup that would hit)
ROUTING_VARIANTS = (
    ("one-deployment", 1, False, None),
    ("three-deployments", 3, False, None),
    ("cache-miss", 1, True, "no-cache"),
    ("cache-hit", 1, True, None),
)


def measure_routing(
    procs: Processes, directory: Path, upstream: int, otlp: int, sizes: dict[str, Any]
) -> list[dict[str, Any]]:
    """CPU per request of a cache hit against a proxied miss, and of the routing
    decision (three deployments against one), side by side in interleaved rounds."""
    body = json.dumps({**PROMPT, "temperature": 0}).encode()  # cacheable
    gateways: dict[str, Gateway] = {}
    requests: dict[str, bytes] = {}
    for name, deployments, cache, control in ROUTING_VARIANTS:
        gw = gateways[name] = start_gateway(
            procs, routing_config(directory / name, upstream, otlp, deployments, cache)
        )
        headers = {"authorization": f"Bearer {gw.key}"}
        if control:
            headers["cache-control"] = control
        requests[name] = load.build_request(
            "127.0.0.1", gw.port, "/v1/chat/completions", body, headers
        )
        run_load(gw.port, requests[name], 8, count=sizes["warmup"])
    targets = {name: (gw, requests[name]) for name, gw in gateways.items()}
    cpu, ratio, errors = interleaved_cpu(targets, sizes["rounds"], sizes["cpu"])
    for gw in gateways.values():
        procs.stop(gw.process)
    return [
        {
            "variant": name,
            "cpu_ms_per_request": round(cpu[name], 3),
            "cpu_ratio_to_one_deployment": round(ratio[name], 3),
            "rounds": sizes["rounds"],
            "errors": errors,
        }
        for name in gateways
    ]


SURFACES = {
    "chat completions": ("/v1/chat/completions", PROMPT),
    "responses (translated)": (
        "/v1/responses",
        {"model": "bench", "input": "Say something short."},
    ),
    "legacy completions": ("/v1/completions", {"model": "bench", "prompt": "Say something short."}),
}


def measure_surfaces(gw: Gateway, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """CPU per request of each API surface on one gateway, in interleaved rounds: what
    translating the Responses API and legacy completions to chat costs."""
    requests = {
        name: load.build_request(
            "127.0.0.1",
            gw.port,
            path,
            json.dumps(body).encode(),
            {"authorization": f"Bearer {gw.key}"},
        )
        for name, (path, body) in SURFACES.items()
    }
    targets = {name: (gw, request) for name, request in requests.items()}
    cpu, ratio, errors = interleaved_cpu(targets, sizes["rounds"], sizes["cpu"] // 2)
    return [
        {
            "surface": name,
            "cpu_ms_per_request": round(cpu[name], 3),
            "ratio_to_chat": round(ratio[name], 3),
            "errors": errors,
        }
        for name in requests
    ]


def ledger_cpu_per_row(directory: Path, rows: int, postgres_url: str | None = None) -> float:
    """CPU of writing ledger rows in batches of 500, measured on its own (in the daemon
    it runs on the writer thread, off the request path). For PostgreSQL this is the
    gateway's side only: the server's own CPU is in its processes, not counted here."""
    from daemon.ledger.sqlite import SQLiteStore
    from daemon.usage import TokenCounts, Usage

    async def go() -> float:
        if postgres_url:
            from daemon.ledger.postgres import PostgresStore

            store: Any = PostgresStore(postgres_url)
        else:
            store = SQLiteStore(directory / "ledger-cpu.db")
        await store.open()
        # A fresh batch per write: rows are idempotent by row_id, so writing one batch
        # again would measure skipped duplicates, not inserts.
        batches = [
            [
                Usage(
                    request_id=f"r{b}-{i}",
                    started_at=time.time(),
                    key_id="k",
                    user_type="standard",
                    operation="chat",
                    model="bench",
                    provider="openai",
                    upstream_model="bench-model",
                    tokens=TokenCounts(12, 16),
                    cost_usd=1e-5,
                    latency_s=0.001,
                    upstream_latency_s=0.0008,
                    trace_id="0" * 32,
                )
                for i in range(500)
            ]
            for b in range(rows // 500)
        ]
        started = time.process_time()
        for batch in batches:
            await store.write_requests(batch)
        used = time.process_time() - started
        await store.close()
        return used / rows * 1e6

    return round(asyncio.run(go()), 2)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sizes: dict[str, Any] = (
        {
            "warmup": 300,
            "c1": 300,
            "cpu": 1000,
            "long": 2000,
            "duration": 1.5,
            "rounds": 2,
            "ledger_rows": 2000,
        }
        if args.quick
        else {
            "warmup": 2000,
            "c1": 2000,
            "cpu": 6000,
            "long": 50_000,
            "duration": 5.0,
            "rounds": 3,
            "ledger_rows": 20_000,
        }
    )
    procs = Processes()
    directory = Path(tempfile.mkdtemp(prefix="chatvault-bench-"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "quick": args.quick,
    }
    try:
        upstream_port, otlp_port = free_port(), free_port()
        procs.start(
            [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port), "--chunks", "16"]
        )
        procs.start([sys.executable, "-m", "bench.otlp", "--port", str(otlp_port)])
        wait_port(upstream_port)
        wait_port(otlp_port)
        results["startup"] = startup_times(procs, directory, 1 if args.quick else 3)

        gw = start_gateway(
            procs,
            gateway_config(
                directory / "all-on", upstream_port, otlp_port, tracing=True, metrics=True
            ),
        )
        direct = {
            s: request_bytes(upstream_port, "/v1/chat/completions", None, stream=s)
            for s in (False, True)
        }
        via = {
            s: request_bytes(gw.port, "/v1/chat/completions", gw.key, stream=s)
            for s in (False, True)
        }
        run_load(gw.port, via[False], 8, count=sizes["warmup"])
        run_load(gw.port, via[True], 8, count=sizes["warmup"] // 4)
        run_load(upstream_port, direct[False], 8, count=sizes["warmup"])
        rss_warm = gw.rss_mb()

        # Added latency at concurrency 1, direct and gateway interleaved in halves.
        c1 = {k: load.Result() for k in ("direct", "gateway", "direct_s", "gateway_s")}
        for _ in range(2):
            for key, port, req in (
                ("direct", upstream_port, direct[False]),
                ("gateway", gw.port, via[False]),
                ("direct_s", upstream_port, direct[True]),
                ("gateway_s", gw.port, via[True]),
            ):
                part = run_load(port, req, 1, count=sizes["c1"] // 2)
                c1[key].latencies += part.latencies
                c1[key].ttfts += part.ttfts
                c1[key].errors += part.errors
        results["latency_c1_non_stream"] = latency_pair(c1["direct"], c1["gateway"])
        results["ttft_c1_stream"] = latency_pair(c1["direct_s"], c1["gateway_s"], ttft=True)

        # CPU per request, from the gateway's own counters.
        cpu_ns, e1 = cpu_per_request(gw, via[False], sizes["cpu"])
        cpu_s, e2 = cpu_per_request(gw, via[True], sizes["cpu"] // 2)
        results["cpu_ms_per_request"] = {"non_stream": cpu_ns, "stream_16_chunks": cpu_s}

        # Throughput.
        throughput = {}
        for c in (32, 64):
            d = run_load(upstream_port, direct[False], c, duration=sizes["duration"])
            g = run_load(gw.port, via[False], c, duration=sizes["duration"])
            throughput[f"c{c}"] = {
                "direct_rps": round(d.rate),
                "gateway_rps": round(g.rate),
                "ratio": round(g.rate / d.rate, 3) if d.rate else None,
                "gateway_errors": g.errors,
                "gateway_p50_ms": ms(load.percentile(g.latencies, 50)),
                "gateway_p99_ms": ms(load.percentile(g.latencies, 99)),
            }
        results["throughput_1_worker"] = throughput

        # A long run: RSS must stay flat.
        long = run_load(gw.port, via[False], 64, count=sizes["long"])
        results["memory"] = {
            "rss_after_warmup_mb": rss_warm,
            "rss_after_long_run_mb": gw.rss_mb(),
            "long_run_requests": long.requests,
            "long_run_errors": long.errors,
        }
        results["errors_c1_and_cpu_runs"] = sum(r.errors for r in c1.values()) + e1 + e2
        results["surfaces"] = measure_surfaces(gw, sizes)
        procs.stop(gw.process)

        # What each feature costs: the same measurements with features off.
        results["features"] = variants = measure_variants(
            procs, directory, upstream_port, otlp_port, sizes
        )
        results["routing"] = measure_routing(procs, directory, upstream_port, otlp_port, sizes)
        ledger_us = ledger_cpu_per_row(directory, sizes["ledger_rows"])
        results["ledger"] = {
            "cpu_us_per_row": ledger_us,
            "share_of_all_on_request": round(
                ledger_us / 1000 / variants[0]["cpu_ms_per_request"], 4
            ),
        }

        # Two workers.
        gw2 = start_gateway(
            procs,
            gateway_config(
                directory / "two-workers",
                upstream_port,
                otlp_port,
                tracing=True,
                metrics=True,
                workers=2,
                # Workers share limits through Redis (serve refuses memory limits with N
                # workers: each would give a key its full limits again).
                extra={
                    "limits": {
                        "backend": "redis",
                        "redis_url": args.redis_url,
                        "key_prefix": f"cvbench-{os.getpid()}",
                    }
                },
            ),
        )
        via2 = request_bytes(gw2.port, "/v1/chat/completions", gw2.key, stream=False)
        run_load(gw2.port, via2, 16, count=sizes["warmup"])
        d = run_load(upstream_port, direct[False], 64, duration=sizes["duration"])
        g = run_load(gw2.port, via2, 64, duration=sizes["duration"])
        results["throughput_2_workers_c64"] = {
            "direct_rps": round(d.rate),
            "gateway_rps": round(g.rate),
            "ratio": round(g.rate / d.rate, 3) if d.rate else None,
            "gateway_errors": g.errors,
            "rss_mb": gw2.rss_mb(),
        }
        procs.stop(gw2.process)
    finally:
        procs.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    return results


def table(r: dict[str, Any]) -> str:
    lat, ttft, cpu = r["latency_c1_non_stream"], r["ttft_c1_stream"], r["cpu_ms_per_request"]
    lines = [
        f"ChatVault benchmark · {r['date']} · commit {r['commit']} · {r['machine']['cpus']} cpus · Python {r['machine']['python']}"
        + (" · QUICK" if r["quick"] else ""),
        "",
        f"{'measure':44} {'direct':>10} {'gateway':>10} {'added / ratio':>14}",
        f"{'latency c=1 non-stream p50 (ms)':44} {lat['direct_p50_ms']:>10} {lat['gateway_p50_ms']:>10} {lat['added_p50_ms']:>14}",
        f"{'latency c=1 non-stream p99 (ms)':44} {lat['direct_p99_ms']:>10} {lat['gateway_p99_ms']:>10} {lat['added_p99_ms']:>14}",
        f"{'time to first token c=1 p50 (ms)':44} {ttft['direct_p50_ms']:>10} {ttft['gateway_p50_ms']:>10} {ttft['added_p50_ms']:>14}",
        f"{'time to first token c=1 p99 (ms)':44} {ttft['direct_p99_ms']:>10} {ttft['gateway_p99_ms']:>10} {ttft['added_p99_ms']:>14}",
    ]
    for c, t in r["throughput_1_worker"].items():
        lines.append(
            f"{'throughput 1 worker ' + c + ' (req/s)':44} {t['direct_rps']:>10} {t['gateway_rps']:>10} {t['ratio']:>14}"
        )
    t2 = r["throughput_2_workers_c64"]
    lines.append(
        f"{'throughput 2 workers c64 (req/s)':44} {t2['direct_rps']:>10} {t2['gateway_rps']:>10} {t2['ratio']:>14}"
    )
    lines += [
        "",
        f"gateway CPU per request: non-stream {cpu['non_stream']} ms, 16-chunk stream {cpu['stream_16_chunks']} ms",
        f"RSS (MB): after warm-up {r['memory']['rss_after_warmup_mb']}, after {r['memory']['long_run_requests']:,} more requests {r['memory']['rss_after_long_run_mb']}; 2 workers {t2['rss_mb']}",
        f"start-up (shipped config): live {r['startup']['to_live_s']} s, ready {r['startup']['to_ready_s']} s",
        f"ledger: {r['ledger']['cpu_us_per_row']} µs CPU per row written ({r['ledger']['share_of_all_on_request']:.1%} of an all-on request; writer thread, off the request path)",
        f"errors: c1/cpu runs {r['errors_c1_and_cpu_runs']}, long run {r['memory']['long_run_errors']}, 2 workers {t2['gateway_errors']}",
        "",
        f"{'feature variant (median of rounds)':36} {'CPU ms/req':>11} {'ratio':>7} {'c=1 p50 ms':>11}",
    ]
    for v in r["features"]:
        lines.append(
            f"{v['variant']:36} {v['cpu_ms_per_request']:>11} {v['cpu_ratio_to_all_on']:>7} {v['c1_p50_ms']:>11}"
        )
    if r.get("routing"):
        lines += [
            "",
            f"{'routing and cache (median of rounds)':36} {'CPU ms/req':>11} {'ratio':>7}",
        ]
        for v in r["routing"]:
            lines.append(
                f"{v['variant']:36} {v['cpu_ms_per_request']:>11} {v['cpu_ratio_to_one_deployment']:>7}"
            )
    lines += ["", f"{'API surface, all on (median of rounds)':36} {'CPU ms/req':>11} {'ratio':>7}"]
    for v in r.get("surfaces", []):
        lines.append(f"{v['surface']:36} {v['cpu_ms_per_request']:>11} {v['ratio_to_chat']:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: checks the harness, not the gateway"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--timeout", type=float, default=900, help="give up after this many seconds"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="only the side by side of bench/compare.py: --before's code, this code, "
        "and this code with Redis limits and the PostgreSQL ledger",
    )
    parser.add_argument("--before", help="another checkout to run beside this one")
    parser.add_argument("--rounds", type=int, default=5, help="--compare: interleaved rounds")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--pg-admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="--compare creates a database for the run through this, and drops it",
    )
    args = parser.parse_args()

    def give_up(signum: int, frame: Any) -> None:
        raise TimeoutError(f"benchmark exceeded {args.timeout:g}s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(int(args.timeout))
    if args.compare:
        from bench import compare

        results = compare.compare(args)
        text = compare.table(results)
    else:
        results = measure(args)
        text = table(results)
    signal.alarm(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
