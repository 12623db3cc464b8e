"""The apps in ``examples/``, each run by a real server and driven by a client that leaves early.

- ``http_relay``: a real upstream on loopback streams slowly through the relay; after the client
  closes, the upstream sees its own client (the relay's httpx connection) go within a bounded time,
  and produces at most one more chunk.
- ``token_stream``: bursts of tokens with idle gaps; a client that leaves during a gap stops the
  generator as promptly as one that leaves during a burst (well before the gap would have ended).
- ``file_download``: the background task deletes the temporary file after a complete download and
  after an interrupted one.

The measured numbers are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
import types
from collections.abc import AsyncIterator

import anyio
import fastapi
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from disconnect_responses import StreamingResponse
from examples import file_download, http_relay

from .asgi import WAIT, noting_disconnect
from .servers import Recorder, client_fetch, open_response, partial_read, serve

KINDS = ("uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio")


# ---------------------------------------------------------------------------------------------
# http_relay

UPSTREAM_CHUNK = 16 * 1024
UPSTREAM_INTERVAL = 0.05
RELAY_READ = 3 * UPSTREAM_CHUNK


def instrumented_upstream(recorder: Recorder) -> ASGIApp:
    """A slow upstream like ``http_relay.create_upstream`` that records each chunk it produces and when
    its client (the relay) went away."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tapped_receive = noting_disconnect(receive, functools.partial(recorder.record, "upstream saw the relay leave"))

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    recorder.record("upstream produced", UPSTREAM_CHUNK)
                    yield b"u" * UPSTREAM_CHUNK
                    await anyio.sleep(UPSTREAM_INTERVAL)
            finally:
                recorder.record("upstream closed")

        await StreamingResponse(body(), media_type="application/octet-stream")(scope, tapped_receive, send)

    return app


@pytest.mark.parametrize("kind", KINDS)
def test_http_relay_stops_the_upstream(kind: str) -> None:
    """The client reads three upstream chunks through the relay and closes: the upstream sees the relay's
    connection go within a bounded time, having produced at most one chunk after the client closed."""
    recorder = Recorder()
    with serve(instrumented_upstream(recorder), "uvicorn-h11") as upstream:
        relay_app = http_relay.create_app(f"http://127.0.0.1:{upstream.port}/")
        with serve(relay_app, kind) as relay:
            with open_response(relay.port, "/relay") as (head, sock, rest):
                assert head.status == 200
                received = len(rest)
                while received < RELAY_READ:
                    data = sock.recv(65536)
                    assert data, "the relay closed early"
                    received += len(data)
                closed_at = time.monotonic()
            events = recorder.wait_for("upstream closed", timeout=WAIT)
        relay.assert_no_errors()
    upstream.assert_no_errors()
    seen = next(event.time for event in events if event.name == "upstream saw the relay leave")
    after_close = sum(
        int(str(event.value)) for event in events if event.name == "upstream produced" and event.time > closed_at
    )
    print(
        f"\nrelay on {kind}: upstream saw the close after {(seen - closed_at) * 1000:.1f} ms, {after_close} bytes after"
    )
    assert seen - closed_at < 2.0
    assert after_close <= UPSTREAM_CHUNK


def test_http_relay_delivers_the_whole_upstream_body() -> None:
    """A finite upstream body reaches the client whole, byte for byte."""
    body = bytes(range(256)) * 1024

    async def finite(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(iter([body[:100_000], body[100_000:]]))(scope, receive, send)

    with serve(finite, "uvicorn-h11") as upstream:
        with serve(http_relay.create_app(f"http://127.0.0.1:{upstream.port}/"), "hypercorn-trio") as relay:
            result = client_fetch(relay, "/relay")
        relay.assert_no_errors()
    assert result.status == 200
    assert result.body == body


# ---------------------------------------------------------------------------------------------
# token_stream

TOKEN_GAP = 1.0


def token_stream_example() -> types.ModuleType:
    """The example, which needs FastAPI's generator endpoints (0.134+)."""
    if tuple(int(part) for part in fastapi.__version__.split(".")[:2]) < (0, 134):
        pytest.skip(f"FastAPI {fastapi.__version__} has no generator endpoints (added in 0.134)")
    return importlib.import_module("examples.token_stream")


@pytest.mark.parametrize("moment", ["burst", "idle"])
@pytest.mark.parametrize("kind", KINDS)
def test_token_stream_stops_as_promptly_in_a_gap_as_in_a_burst(kind: str, moment: str) -> None:
    """The client leaves in the middle of a burst, or at the start of an idle gap: either way the
    generator's ``finally`` runs within a fraction of the gap after the close, then the background task
    records usage."""
    recorder = Recorder()
    app = token_stream_example().create_app(burst=50, token_interval=0.005, gap=TOKEN_GAP, observe=recorder.record)
    with serve(app, kind) as server:
        with open_response(server.port, "/tokens") as (head, _, _):
            assert head.status == 200
            if moment == "burst":
                recorder.wait_for("token", count=10, timeout=WAIT)
            else:
                recorder.wait_for("idle", timeout=WAIT)
            closed_at = time.monotonic()
        events = recorder.wait_for("usage recorded", timeout=WAIT)
    server.assert_no_errors()
    names = [event.name for event in events]
    assert names.count("closed") == 1
    assert names.index("closed") < names.index("usage recorded")
    generator_closed = next(event.time for event in events if event.name == "closed")
    if moment == "idle":
        # Still inside the first gap: no token of a second burst was produced.
        assert names.count("token") == 50
    print(
        f"\ntoken stream on {kind}, client left during {moment}: closed {(generator_closed - closed_at) * 1000:.1f} ms"
    )
    assert generator_closed - closed_at < TOKEN_GAP / 4


# ---------------------------------------------------------------------------------------------
# file_download

EXPORT_SIZE = 32 * 1024 * 1024


@pytest.mark.parametrize("ending", ["complete", "disconnect"])
@pytest.mark.parametrize("kind", KINDS)
def test_file_download_deletes_its_temporary_file(kind: str, ending: str) -> None:
    """The background task deletes the temporary file once, after a complete download and after a client
    that read 1 MiB and left."""
    recorder = Recorder()
    app = file_download.create_app(size=EXPORT_SIZE, observe=recorder.record)
    with serve(app, kind) as server:
        if ending == "complete":
            result = client_fetch(server, "/export")
            assert result.status == 200
            assert len(result.body) == EXPORT_SIZE
            assert result.body[:512] == bytes(range(256)) * 2
            assert result.header("content-disposition") == 'attachment; filename="export.bin"'
        else:
            with partial_read(server, "/export", 1 << 20) as received:
                assert received >= 1 << 20
        recorder.wait_for("deleted", timeout=WAIT)
    server.assert_no_errors()
    [created] = recorder.values("created")
    assert recorder.values("deleted") == [created]
    assert isinstance(created, str)
    assert not os.path.exists(created)
