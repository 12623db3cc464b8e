"""An app with endless streams for the shutdown tests; run by a real server in a child process.

Each stream appends what happened to the file named by ``$EVENTS`` (one line per event), so the
test can read it after the server process has exited.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator

import anyio
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from disconnect_responses import StreamingResponse

logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def note(event: str) -> None:
    with open(os.environ["EVENTS"], "a") as file:
        file.write(event + "\n")


async def ticks() -> AsyncIterator[bytes]:
    try:
        while True:
            yield b"data: tick\n\n"
            await anyio.sleep(0.05)
    finally:
        note("closed")


def sync_ticks() -> Iterator[bytes]:
    # A sync producer blocked in next() between chunks, as a database cursor would be.
    try:
        while True:
            yield b"data: tick\n\n"
            time.sleep(0.05)
    finally:
        note("closed")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    content = sync_ticks() if scope["path"] == "/sync" else ticks()
    response = StreamingResponse(content, media_type="text/event-stream", background=BackgroundTask(note, "background"))
    await response(scope, receive, send)
    note(f"outcome {response.outcome.value if response.outcome else None}")
