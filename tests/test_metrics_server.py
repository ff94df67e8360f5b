"""The metrics server under a flood of slow or idle clients (issue 22, case 11): its threads stay
bounded, idle clients are let go, and /healthz keeps answering a real probe."""

from __future__ import annotations

import io
import os
import signal
import socket
import time

from conftest import free_port, spout_env, wait_until
from test_metrics import healthz, metrics_env, serving

import spout

FLOOD = 300
# docs/operations.md: at most 32 clients served at once (64 threads while cut-off ones end), each let go
# after 5 s idle; plus 8 for the spout's own threads started meanwhile (kafka-python's).
THREADS_OVER_BASELINE = 2 * 32 + 8
IDLE_SECONDS = 5


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def closed_by_server(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(4096) == b""  # an answer to an incomplete request is no letting go
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_flood_of_half_sent_requests_holds_no_thread_per_client(fifo, spouts):
    port = free_port()
    process = spouts(spout_env(f"127.0.0.1:{free_port()}", "events", fifo, **metrics_env(port)))
    wait_until(lambda: serving(port) or process.process.poll() is not None, 30, "the server")
    assert process.process.poll() is None, process.log
    pid = process.process.pid
    baseline = threads(pid)
    flood = []
    try:
        for _ in range(FLOOD):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: spout\r\n")  # never ends
            flood.append(client)
        bound = baseline + THREADS_OVER_BASELINE
        wait_until(lambda: threads(pid) <= bound, 10,
                   f"at most {bound} threads (a thread per client would be {baseline + FLOOD})")
        # A probe meanwhile: answered at once, every time.
        for _ in range(5):
            started = time.monotonic()
            status, body = healthz(port)
            assert status in (200, 503) and "status" in body
            assert time.monotonic() - started < 2
        # Idle clients are let go within the connection timeout.
        wait_until(lambda: all(map(closed_by_server, flood)),
                   IDLE_SECONDS + 10, "every idle client let go")
        assert threads(pid) <= baseline + 8
    finally:
        for client in flood:
            client.close()
    assert process.process.poll() is None, process.log
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0, process.log


def test_request_heads_are_read_up_to_a_limit():
    reader = spout._HeadReader(io.BytesIO(b"GET / HTTP/1.0\r\n" + b"X: " + b"a" * 100_000),
                               1024)
    assert reader.readline(65537) == b"GET / HTTP/1.0\r\n"
    assert len(reader.readline(65537)) == 1024 - 16
    assert reader.readline(65537) == b""
