"""Hostile clients against the real daemon (``chatvault serve``, uvicorn): slow and idle
connections, trickled bodies, and the worst requests one client can send while
another measures how fast ``/livez`` answers."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.helpers import ADMIN_KEY, base_config, client_for, ledger_rows, running, wait_for

AUTH = f"Authorization: Bearer {ADMIN_KEY}\r\n".encode()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_by_peer(sock: socket.socket, within_s: float) -> float | None:
    """Seconds until the daemon closed ``sock`` (reading what it sent first), or None."""
    started = time.monotonic()
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def read_response(sock: socket.socket, within_s: float) -> bytes:
    sock.settimeout(within_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_slow_headers_and_slow_bodies_are_cut_off(tmp_path: Path) -> None:
    server = {"header_timeout_s": 1.5, "body_timeout_s": 2.0}
    with running(tmp_path, base_config(server=server)) as daemon:
        silent = connect(daemon.port)  # connects, says nothing
        trickle = connect(daemon.port)  # headers a byte at a time
        started = time.monotonic()
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"[:6]:
            trickle.send(bytes([byte]))
            time.sleep(0.3)
        assert closed_by_peer(silent, 5) is not None
        assert closed_by_peer(trickle, 5) is not None
        assert 1.4 < time.monotonic() - started < 5

        # Headers on time, then the body a byte every half second.
        body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
        slow = connect(daemon.port)
        slow.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + AUTH
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        started = time.monotonic()
        stop = threading.Event()

        def dribble() -> None:
            for byte in body:
                if stop.wait(0.5):
                    return
                with contextlib.suppress(OSError):
                    slow.send(bytes([byte]))

        feeder = threading.Thread(target=dribble)
        feeder.start()
        try:
            answer = read_response(slow, 8)
        finally:
            stop.set()
            feeder.join()
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        error = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and "server.body_timeout_s" in error["message"]
        assert 1.9 < took < 5  # cut off after the deadline, the connection closed
        # The request's ledger row says so too.
        rows = wait_for(lambda: ledger_rows(daemon.ledger_path, "status_code = 408"))
        assert rows[0]["error_type"] == "request_timeout"

        # Refused at once (no key), then the body trickles on: cut off all the same.
        refused = connect(daemon.port)
        refused.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        )
        started = time.monotonic()
        answer = b""
        refused.settimeout(5)
        while b"\r\n\r\n" not in answer:
            answer += refused.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401")
        for _ in range(20):
            try:
                refused.send(b"x")
            except OSError:
                break
            time.sleep(0.3)
        assert closed_by_peer(refused, 5) is not None
        assert time.monotonic() - started < 5

        # A normal client is unaffected.
        reply = client_for(daemon.url).chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content


@contextlib.contextmanager
def open_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(connect(port))
        yield socks
    finally:
        for s in socks:
            s.close()


def enough_file_descriptors(needed: int) -> None:
    """This process and the daemon (which inherits the limit) each hold a socket per
    connection: raise the soft limit (often 1024) toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"ulimit -Hn is {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def test_a_thousand_idle_or_slow_sockets_do_not_stop_a_normal_client(tmp_path: Path) -> None:
    enough_file_descriptors(4096)
    server = {"header_timeout_s": 4.0}
    with (
        running(tmp_path, base_config(server=server)) as daemon,
        open_sockets(daemon.port, 1000) as socks,
    ):
        opened = time.monotonic()
        slow = socks[::2]  # half of them send a header byte now and then; half say nothing
        for s in slow:
            s.send(b"P")
        client = client_for(daemon.url)
        for _ in range(5):
            started = time.monotonic()
            reply = client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "still served?"}]
            )
            assert reply.choices[0].message.content
            assert time.monotonic() - started < 2.0
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"O")
        assert httpx.get(daemon.url + "/livez", timeout=2).status_code == 200
        # They were all still open while the client was served...
        assert time.monotonic() - opened < 4.0
        # ...and the daemon closes every one of them at the header deadline.
        for s in socks:
            s.setblocking(False)

        closed: set[int] = set()

        def all_closed() -> bool:
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    if s.recv(65536) == b"":  # a 400 for the slow ones' garbage first
                        closed.add(i)
                except BlockingIOError:
                    continue
                except OSError:
                    closed.add(i)
            return len(closed) == len(socks)

        wait_for(all_closed, timeout=15, interval=0.2)
        assert time.monotonic() - opened > 3.5


# -- the event loop stays responsive under the worst requests ---------------------------


# Another client, in its own process (this one's GIL is busy building and sending the
# big requests): /livez every 20 ms on a kept-alive connection until stdin closes,
# then every latency, one per line.
PROBE = """
import sys, threading, time, httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies = []
with httpx.Client(timeout=10) as http:
    while not stop.is_set():
        started = time.perf_counter()
        assert http.get(sys.argv[1] + "/livez").status_code == 200
        latencies.append(time.perf_counter() - started)
        print("tick", flush=True) if len(latencies) == 10 else None
        stop.wait(0.02)
print("\\n".join(map(str, latencies)))
"""


@contextlib.contextmanager
def livez_probe(url: str) -> Iterator[list[float]]:
    latencies: list[float] = []
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdin is not None and probe.stdout is not None
    try:
        assert probe.stdout.readline().strip() == "tick"  # it is measuring
        yield latencies
    finally:
        out, _ = probe.communicate("", timeout=30)
    latencies.extend(float(line) for line in out.split())


def worst_requests() -> list[tuple[str, bytes]]:
    """What one client can send that costs the most, each within the default limits."""
    chat = "/v1/chat/completions"
    # Just under 4 MiB of prose for the mock to count (a comma every 40 characters).
    big_prompt = "lorem ipsum dolor sit amet consectetur, " * 100_000
    # JSON values just under requests.max_json_values: the costliest to parse and free.
    lists = b"[" + b",".join([b"[]"] * 99_000) + b"]"
    floats = b"[" + b",".join([b"0.5"] * 199_000) + b"]"
    return [
        (
            "/v1/embeddings",
            orjson.dumps({"model": "mock", "input": ["x"] * 2048, "dimensions": 512}),
        ),
        (
            "/v1/embeddings",
            orjson.dumps({"model": "mock", "input": ["x"] * 341, "dimensions": 3072}),
        ),
        (
            "/v1/embeddings",
            orjson.dumps({"model": "mock", "input": [""] * 5000, "dimensions": 16384}),
        ),
        (
            chat,
            orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": big_prompt}]}),
        ),
        (
            chat,
            orjson.dumps(
                {
                    "model": "mock",
                    "stream": True,
                    "messages": [{"role": "user", "content": big_prompt}],
                }
            ),
        ),
        (chat, b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"x":' + lists + b"}"),
        (chat, b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"x":' + floats + b"}"),
        (chat, b'{"model":"mock","x":[' + b",".join([b"[]"] * 1_300_000) + b"]}"),
        (
            chat,
            orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "a"}] * 4096}),
        ),
    ]


def test_the_worst_requests_do_not_hold_up_livez(tmp_path: Path) -> None:
    requests = worst_requests()
    with running(tmp_path, base_config()) as daemon:
        daemon.wait_ready()
        statuses = []
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        with livez_probe(daemon.url) as latencies, httpx.Client(timeout=120) as http:
            for path, body in requests:
                response = http.post(daemon.url + path, content=body, headers=headers)
                statuses.append(response.status_code)
        health = httpx.get(
            daemon.url + "/health", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        ).json()
    # The big ones were served, the ones past a limit refused: none was left undone.
    assert statuses == [200, 200, 400, 200, 200, 200, 200, 400, 200], statuses
    worst = max(latencies)
    lag: dict[str, Any] = health["performance"]["event_loop_lag"]
    print(f"/livez: {len(latencies)} answers, worst {worst * 1000:.1f} ms; daemon's lag: {lag}")
    # About 50 ms, with room for a 2-core machine shared with other test runs (measured
    # there: 20-47 ms worst /livez, 8-49 ms worst lag; before the limits: 20 s).
    assert worst < 0.1, sorted(latencies)[-10:]
    assert lag["max_ms"] is not None and lag["max_ms"] < 100


def test_past_limit_concurrency_new_requests_get_503_until_connections_free_up(
    tmp_path: Path,
) -> None:
    server = {"limit_concurrency": 20, "header_timeout_s": 2.0}
    with running(tmp_path, base_config(server=server)) as daemon, open_sockets(daemon.port, 25):
        # 25 idle connections hold every slot: a new request is turned away, not queued.
        wait_for(lambda: httpx.get(daemon.url + "/livez", timeout=2).status_code == 503)
        # The header deadline closes them, and the slots come back.
        wait_for(lambda: httpx.get(daemon.url + "/livez", timeout=2).status_code == 200, 10)
