"""What a Server-Sent Events user gains: FastAPI's own SSE and sse-starlette against this library's
``EventSourceResponse``, on the same endpoints, when the client leaves.

    python -m benchmarks.sse_benchmark [--runs 5]

uvicorn (httptools) serves each app in a thread on 127.0.0.1, in a process per run (a producer
that runs away after the close must not slow the next run down); a raw client reads 256 KiB of a
stream (one event of an idle one) and closes. The app's records give, per producer: the bytes the
producer yielded after the close (counted until 50 ms after its ``finally`` and the background task
both ran, or until ``WAIT`` seconds), and the milliseconds from the close to the producer's
``finally`` and to the background task ("never" when it did not happen within ``WAIT``). Medians
over ``--runs`` runs, with the range. FastAPI rows need FastAPI 0.135+, sse-starlette rows
sse-starlette 3.7+ (Python 3.11+).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import uvicorn
from fastapi import BackgroundTasks
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp

from disconnect_responses import EventSourceResponse

EVENT = "x" * 1000
READ = 256 * 1024
WAIT = 10.0


class Records:
    """One request's timeline, written by the app and read by the client's thread."""

    def __init__(self) -> None:
        self.closed_at: float | None = None
        self.after_close = 0
        self.finally_at: float | None = None
        self.background_at: float | None = None

    def produced(self, size: int) -> None:
        if self.closed_at is not None:
            self.after_close += size

    def ended(self) -> None:
        self.finally_at = time.monotonic()

    def background(self) -> None:
        self.background_at = time.monotonic()


current: list[Records] = []


async def awaiting() -> AsyncIterator[str]:
    records = current[-1]
    try:
        while True:
            await anyio.lowlevel.checkpoint()
            records.produced(len(EVENT))
            yield EVENT
    finally:
        records.ended()


async def never_awaiting() -> AsyncIterator[str]:
    records = current[-1]
    try:
        while True:
            records.produced(len(EVENT))
            yield EVENT
    finally:
        records.ended()


def sync() -> Iterator[str]:
    records = current[-1]
    try:
        while True:
            records.produced(len(EVENT))
            yield EVENT
    finally:
        records.ended()


async def idle() -> AsyncIterator[str]:
    records = current[-1]
    try:
        yield EVENT
        await anyio.sleep_forever()
    finally:
        records.ended()


# Each is the endpoint itself under FastAPI (a generator endpoint), and the content under Starlette.
PRODUCERS: dict[str, Callable[[], AsyncIterator[str] | Iterator[str]]] = {
    "awaiting": awaiting,
    "never-awaiting": never_awaiting,
    "sync": sync,
    "idle": idle,
}


def starlette_app(response_class: Callable[..., Any]) -> ASGIApp:
    async def stream(request: Request) -> Any:
        records = current[-1]
        content = PRODUCERS[request.path_params["kind"]]()
        return response_class(content, background=BackgroundTask(records.background))

    return Starlette(routes=[Route("/{kind}", stream)])


def note_background(background_tasks: BackgroundTasks) -> None:
    background_tasks.add_task(current[-1].background)


def fastapi_app(response_class: type) -> ASGIApp:
    from fastapi import Depends, FastAPI

    app = FastAPI()
    for kind, endpoint in PRODUCERS.items():
        app.get(f"/{kind}", response_class=response_class, dependencies=[Depends(note_background)])(endpoint)
    return app


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http="httptools", log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def leave_once(port: int, kind: str) -> dict[str, float]:
    records = Records()
    current.append(records)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(f"GET /{kind} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        received, wanted = 0, len(EVENT) if kind == "idle" else READ
        while received < wanted:
            received += len(client.recv(65536))
        records.closed_at = time.monotonic()
    closed_at = records.closed_at
    deadline = closed_at + WAIT
    while (records.finally_at is None or records.background_at is None) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # let a runaway producer show what it does after the background task

    def ms(at: float | None) -> float:
        return (at - closed_at) * 1000 if at is not None else float("inf")

    return {"bytes": records.after_close, "finally": ms(records.finally_at), "background": ms(records.background_at)}


def summary(values: list[float], unit: str) -> str:
    finite = [value for value in values if value != float("inf")]
    if not finite:
        return f"never (> {WAIT:.0f} s)"
    text = f"{statistics.median(finite):.1f}{unit} [{min(finite):.1f}-{max(finite):.1f}]"
    if len(finite) < len(values):
        text += f", never in {len(values) - len(finite)}/{len(values)}"
    return text


def contenders() -> dict[str, Callable[[], ASGIApp]]:
    found: dict[str, Callable[[], ASGIApp]] = {}
    with contextlib.suppress(ImportError):
        from fastapi.sse import EventSourceResponse as FastAPIEventSourceResponse

        found["FastAPI fastapi.sse"] = lambda: fastapi_app(FastAPIEventSourceResponse)
        found["FastAPI + ours"] = lambda: fastapi_app(EventSourceResponse)
    with contextlib.suppress(ImportError):
        import sse_starlette

        found["sse-starlette"] = lambda: starlette_app(sse_starlette.EventSourceResponse)
        found["Starlette + ours"] = lambda: starlette_app(EventSourceResponse)
    return found


def run_in_child(name: str, kind: str) -> dict[str, float]:
    """One run in a process of its own: a producer that runs away after the close (it never lets
    the event loop run) must not slow the next run down."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.sse_benchmark", "--child", name, kind],
        capture_output=True,
        text=True,
        timeout=WAIT + 30,
        check=True,
    )
    result: dict[str, float] = json.loads(child.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("APP", "PRODUCER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child is not None:
        name, kind = arguments.child
        with serving(contenders()[name]()) as port:
            print(json.dumps(leave_once(port, kind)), flush=True)
        os._exit(0)  # without waiting for a server thread that a runaway producer holds
    print(f"{'app':<22} {'producer':<15} {'bytes after close':<36} {'close to finally':<30} {'close to background'}")
    for name in contenders():
        for kind in PRODUCERS:
            results = [run_in_child(name, kind) for _ in range(arguments.runs)]
            columns = [
                summary([result["bytes"] / 1024 for result in results], " KiB"),
                summary([result["finally"] for result in results], " ms"),
                summary([result["background"] for result in results], " ms"),
            ]
            print(f"{name:<22} {kind:<15} {columns[0]:<36} {columns[1]:<30} {columns[2]}", flush=True)


if __name__ == "__main__":
    main()
