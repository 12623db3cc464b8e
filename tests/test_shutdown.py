"""One signal to a real server process ends every endless stream: iterators closed, background
tasks run, and the process exits without a second signal.

Each test starts the server as a child process (a signal must reach the process that runs the
app), opens endless event streams, waits until each has delivered its first event, signals the
server once, and waits (bounded) for it to exit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
RUNNING = re.compile(r"running on http://127\.0\.0\.1:(\d+)", re.IGNORECASE)
# uvicorn exits as soon as the streams have ended; hypercorn's CLI worker never sees the signal
# and cancels its requests after graceful_timeout (3 s by default), then cleanup runs shielded.
EXIT_BOUND = {
    "uvicorn-cli": 2.0,
    "uvicorn-run": 2.0,
    "hypercorn-serve": 2.0,
    "hypercorn-cli": 3.0 + 2.0,
    "hypercorn-trio-cli": 3.0 + 2.0,
}


def command(kind: str, port: int) -> list[str]:
    app = "tests.shutdown_app:app"
    if kind == "uvicorn-cli":
        return [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "info"]
    if kind == "uvicorn-run":
        code = f"import uvicorn; uvicorn.run({app!r}, port={port}, log_level='info')"
        return [sys.executable, "-c", code]
    if kind == "hypercorn-serve":
        code = (
            "import asyncio, hypercorn.asyncio, hypercorn.config; from tests.shutdown_app import app;"
            f"config = hypercorn.config.Config(); config.bind = ['127.0.0.1:{port}'];"
            "asyncio.run(hypercorn.asyncio.serve(app, config))"
        )
        return [sys.executable, "-c", code]
    worker = ["-k", "trio"] if kind == "hypercorn-trio-cli" else []
    return [sys.executable, "-m", "hypercorn", *worker, app, "--bind", f"127.0.0.1:{port}"]


@contextmanager
def server_process(kind: str, events: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start the server on port 0; its "Running on" line tells the port it bound."""
    env = {**os.environ, "EVENTS": str(events), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command(kind, 0), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    output: list[str] = []
    ports: list[int] = []
    ready = threading.Event()

    def read_output() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            output.append(line)
            running = RUNNING.search(line)
            if running and not ready.is_set():
                ports.append(int(running.group(1)))
                ready.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        assert ready.wait(START_TIMEOUT), f"{kind} did not start:\n{''.join(output)}"
        yield process, ports[0]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(START_TIMEOUT)
        reader.join(START_TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()
        print("".join(output))  # shown by pytest when the test fails


@contextmanager
def open_stream(port: int, path: str) -> Iterator[socket.socket]:
    """A client that has received the stream's head and first event, and keeps reading nothing more."""
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        received = b""
        while b"data: tick" not in received:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed before the first event: {received!r}"
            received += chunk
        yield sock


@pytest.mark.parametrize("kind", list(EXIT_BOUND))
def test_one_signal_ends_endless_streams(kind: str, tmp_path: Path) -> None:
    events = tmp_path / "events.txt"
    paths = ["/async", "/sync", "/async"]
    with server_process(kind, events) as (process, port), ExitStack() as streams:
        for path in paths:
            streams.enter_context(open_stream(port, path))
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(EXIT_BOUND[kind] + 5.0)
        took = time.monotonic() - signalled
    lines = events.read_text().splitlines()
    assert lines.count("closed") == len(paths), lines
    assert lines.count("background") == len(paths), lines
    if not kind.endswith("-cli") or kind == "uvicorn-cli":
        # The signal reached the app's process: the streams ended as a shutdown, not a cancellation.
        assert lines.count("outcome shutdown") == len(paths), lines
    assert took < EXIT_BOUND[kind], f"{kind} took {took:.2f} s to exit after one SIGTERM"
