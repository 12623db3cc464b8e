"""Relay a slow upstream HTTP stream to the client with httpx, and stop the upstream when the client leaves.

Run the slow upstream and the relay in two shells, from the repository root, then read a little and
stop (Ctrl+C in curl): the upstream's log shows its stream ending within milliseconds::

    uvicorn examples.http_relay:upstream --port 8001
    UPSTREAM_URL=http://127.0.0.1:8001/ uvicorn examples.http_relay:app --port 8000
    curl -N http://127.0.0.1:8000/relay

The upstream connection is opened inside the generator, so a client that is gone before the body
starts costs no upstream request at all, and one that leaves mid-stream gets the generator closed:
``async with client.stream(...)`` then closes the upstream response, and httpx closes a connection
whose response was not read to its end instead of returning it to the pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from disconnect_responses import StreamingResponse

logger = logging.getLogger("examples.http_relay")


def create_app(upstream_url: str) -> Starlette:
    """The relay: ``GET /relay`` streams ``upstream_url``'s body, chunk by chunk, as it arrives."""

    async def relay(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
                async with client.stream("GET", upstream_url) as upstream:
                    async for chunk in upstream.aiter_raw():
                        yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/relay", relay)])


def create_upstream(chunk_size: int = 16 * 1024, interval: float = 0.05) -> Starlette:
    """A slow upstream: an endless body of ``chunk_size`` bytes every ``interval`` seconds."""

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                while True:
                    yield b"u" * chunk_size
                    sent += chunk_size
                    await anyio.sleep(interval)
            finally:
                logger.warning("upstream stream ended after %d bytes", sent)

        return StreamingResponse(body(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/", stream)])


app = create_app(os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8001/"))
upstream = create_upstream()
