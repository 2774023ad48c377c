"""Slow and stalled clients over raw sockets: none can hold the server.

A server with ``--read-timeout 2`` (torch engine, tiny model, the default 64 MiB
body limit):

- a body declared at 70 MB (over the limit) of which 1 MB is sent gets its 413
  within the bound (the over-limit drain stops after at most the read timeout),
  and the connection is closed;
- a body declared within the limit that stops after 1 MB, or a chunked one that
  stops, gets a 408 within the bound, and the connection is closed;
- 200 stalled bodies at once, and 200 connections sending their headers one byte
  at a time: ``/health`` keeps answering within 1 s, a rollout request is served,
  and every one of those connections is answered or closed within the bound.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _ops import own_server

READ_TIMEOUT_S = 2.0
BOUND_S = READ_TIMEOUT_S + 4.0  # the timeout, plus slack for a loaded 2-core machine
HEALTH_BOUND_S = 1.0
DECLARED_OVER = 70_000_000  # over the default 64 MiB limit
DECLARED_UNDER = 10_000_000
SENT = 1 << 20
ROLLOUT = {"prompts": [[1, 2, 3]], "n": 2, "sampling": {"max_tokens": 4, "seed": 0}}


@pytest.fixture(scope="module")
def base(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("slow-clients")
    with own_server(tiny_dir, log_dir, "--read-timeout", str(READ_TIMEOUT_S)) as server:
        yield server.base_url


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def _stalled_body(base: str, declared: int | None, sent: int = SENT) -> socket.socket:
    """A connection that sends the headers and ``sent`` bytes of its body, then stops."""
    sock = socket.create_connection(_address(base), timeout=30)
    length = f"content-length: {declared}\r\n" if declared is not None else ""
    chunked = "" if declared is not None else "transfer-encoding: chunked\r\n"
    head = (
        f"POST /v1/rollouts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"{length}{chunked}\r\n"
    ).encode()
    body = b" " * sent
    if declared is None:
        body = f"{sent:x}\r\n".encode() + body + b"\r\n"
    sock.sendall(head + body)
    return sock


def _answer(sock: socket.socket, timeout: float) -> tuple[int | None, bool, float]:
    """(status or None, whether the server closed the connection, seconds waited)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    closed = False
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                closed = True
                break
            data += part
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, closed, time.monotonic() - t0


def _health_latencies(base: str, stop: threading.Event, ready: threading.Event) -> list[float]:
    """``GET /health`` latencies over one kept-alive connection, measured from when
    ``ready`` is set (after a first request opens the connection) until ``stop`` is."""
    out: list[float] = []
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{base}/health").status_code == 200
        ready.set()
        while not stop.is_set():
            t0 = time.monotonic()
            assert client.get(f"{base}/health").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.1)
    return out


@pytest.mark.parametrize(
    ("declared", "status"), [(DECLARED_OVER, 413), (DECLARED_UNDER, 408), (None, 408)]
)
def test_a_stalled_body_is_answered_within_the_bound(
    base: str, declared: int | None, status: int
) -> None:
    sock = _stalled_body(base, declared)
    got, closed, waited = _answer(sock, BOUND_S + 5)
    assert got == status
    assert closed, "the connection must be closed after the refusal"
    assert waited < BOUND_S


def test_many_stalled_bodies_leave_the_server_serving(base: str) -> None:
    stop, ready = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as watch, ThreadPoolExecutor(16) as pool:
        health = watch.submit(_health_latencies, base, stop, ready)
        assert ready.wait(30)
        t0 = time.monotonic()
        socks = list(pool.map(lambda _: _stalled_body(base, DECLARED_OVER), range(200)))
        rollout = httpx.post(f"{base}/v1/rollouts", json=ROLLOUT, timeout=60)
        answers = list(pool.map(lambda s: _answer(s, BOUND_S + 10), socks))
        elapsed = time.monotonic() - t0
        stop.set()
        latencies = health.result()
    assert rollout.status_code == 200, rollout.text
    assert [a[0] for a in answers] == [413] * 200
    assert all(closed for _, closed, _ in answers)
    assert elapsed < BOUND_S + 20, f"200 stalled bodies took {elapsed:.1f} s to answer"
    assert latencies and max(latencies) < HEALTH_BOUND_S, f"/health took {max(latencies):.2f} s"


def test_headers_sent_byte_by_byte_cannot_hold_connections(base: str) -> None:
    head = b"POST /v1/rollouts HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    socks = [socket.create_connection(_address(base), timeout=30) for _ in range(200)]
    stop, ready = threading.Event(), threading.Event()
    closed_at: dict[int, float] = {}
    with ThreadPoolExecutor(1) as watch:
        health = watch.submit(_health_latencies, base, stop, ready)
        assert ready.wait(30)
        t0 = time.monotonic()
        for i in range(len(head)):  # one byte per connection per round, never the end
            for n, sock in enumerate(socks):
                if n in closed_at:
                    continue
                try:
                    sock.send(head[i : i + 1])
                except OSError:
                    closed_at[n] = time.monotonic() - t0
            if len(closed_at) == len(socks) or time.monotonic() - t0 > BOUND_S + 10:
                break
            time.sleep(0.1)
        rollout = httpx.post(f"{base}/v1/rollouts", json=ROLLOUT, timeout=60)
        stop.set()
        latencies = health.result()
    for n, sock in enumerate(socks):  # the rest must be closed by now: recv sees the end
        if n not in closed_at:
            status, closed, _ = _answer(sock, 1.0)
            assert closed and status is None, f"connection {n} still open"
        else:
            sock.close()
    assert rollout.status_code == 200, rollout.text
    assert max(latencies) < HEALTH_BOUND_S, f"/health took {max(latencies):.2f} s"
    assert time.monotonic() - t0 < BOUND_S + 15
