"""The app the shutdown tests run on real servers, in child processes.

Each response appends what happened to the file named by ``$EVENTS`` (one line per event), so the
test can read it after the server process has exited. ``$FILE`` names the file that ``/file`` and
``/sized`` serve.

- ``/async``, ``/sync``: endless event streams (an async producer, and a sync one blocked in
  ``next()`` between events, as a database cursor would be).
- ``/events``: an endless ``EventSourceResponse`` (pinging every 10 ms between its events).
- ``/cooperative``: an endless event stream that, once ``stopping()`` is set, sends a last event of
  its own and returns.
- ``/file``: a ``FileResponse``; ``/sized``: a ``StreamingResponse`` with a ``content-length``.
- ``/ready``: 204, for the test's readiness probe.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from disconnect_responses import EventSourceResponse, FileResponse, StreamingResponse, stopping

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

TICK = b"data: tick\n\n"
BYE = b"data: bye\n\n"


def note(event: str) -> None:
    with open(os.environ["EVENTS"], "a") as file:
        file.write(event + "\n")


async def ticks(path: str) -> AsyncIterator[bytes]:
    try:
        while True:
            yield TICK
            await anyio.sleep(0.05)
    finally:
        note(f"closed {path}")


def sync_ticks(path: str) -> Iterator[bytes]:
    try:
        while True:
            yield TICK
            time.sleep(0.05)
    finally:
        note(f"closed {path}")


async def cooperative(path: str) -> AsyncIterator[bytes]:
    try:
        stop = stopping()
        while not stop.is_set():
            yield TICK
            with anyio.move_on_after(0.05):
                await stop.wait()
        yield BYE
    finally:
        note(f"closed {path}")


async def sized(path: str) -> AsyncIterator[bytes]:
    try:
        async with await anyio.open_file(os.environ["FILE"], "rb") as file:
            while chunk := await file.read(64 * 1024):
                yield chunk
    finally:
        note(f"closed {path}")


async def tick_items(path: str) -> AsyncIterator[str]:
    try:
        while True:
            yield "tick"
            await anyio.sleep(0.05)
    finally:
        note(f"closed {path}")


def respond(path: str) -> Response:
    response: StreamingResponse | FileResponse
    if path == "/events":
        response = EventSourceResponse(tick_items(path), ping=0.01)
    elif path == "/file":
        response = FileResponse(os.environ["FILE"])
    elif path == "/sized":
        length = str(os.path.getsize(os.environ["FILE"]))
        response = StreamingResponse(sized(path), headers={"content-length": length})
    else:
        content = sync_ticks(path) if path == "/sync" else cooperative(path) if path == "/cooperative" else ticks(path)
        response = StreamingResponse(content, media_type="text/event-stream")
    # The outcome is noted by the background task, which runs whatever ended the response (a server
    # that cancels its requests, or ends its worker once the response is complete, may never let
    # the app's own code after the call run).
    response.background = BackgroundTask(lambda: note(f"background {path} {getattr(response.outcome, 'value', None)}"))
    return response


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/ready":
        await Response(status_code=204)(scope, receive, send)
        return
    await respond(scope["path"])(scope, receive, send)
