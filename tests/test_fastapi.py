"""FastAPI: the classes as returned responses and as ``response_class=``, on real servers.

Each endpoint's producer records "iterator closed" in its ``finally`` and a background task records
"background ran"; an outer ASGI wrapper records "response done" once FastAPI's app returned. The core
guarantees are checked as elsewhere: a disconnect stops the body, the iterator is closed once before
the background task, which runs once (FastAPI's ``BackgroundTasks`` included), and nothing escapes.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import fastapi
import pytest
from fastapi import BackgroundTasks, FastAPI
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from disconnect_responses import FileResponse, Outcome, StreamingResponse

from .asgi import WAIT, assert_closed_then_background, finished, producer_of
from .servers import Recorder, RunningServer, client_fetch, partial_read, serve

pytestmark = pytest.mark.usefixtures("library_log")
KINDS = ("uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio")
CHUNK_SIZE = 64 * 1024
CHUNK = b"f" * CHUNK_SIZE
COMPLETE_CHUNKS = 16
READ_BEFORE_LEAVING = 1 << 20
SENT_BOUND = 16 << 20
FILE_SIZE = 64 << 20

# FastAPI streams a generator endpoint through ``response_class`` since 0.134.
FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
needs_generator_endpoints = pytest.mark.skipif(
    FASTAPI_VERSION < (0, 134), reason=f"FastAPI {fastapi.__version__} has no generator endpoints (added in 0.134)"
)


def chunks(length: str) -> Iterator[bytes]:
    return itertools.repeat(CHUNK, COMPLETE_CHUNKS) if length == "complete" else itertools.repeat(CHUNK)


def make_app(recorder: Recorder, file_path: Path | None = None) -> ASGIApp:
    app = FastAPI()

    def note_background() -> None:
        recorder.record("background ran")

    def content(producer: str, length: str) -> AsyncIterator[bytes] | Iterator[bytes]:
        shape = "awaiting" if producer == "async" else "sync"
        return producer_of(shape, chunks(length), functools.partial(recorder.record, "iterator closed"))

    @app.get("/returned/{producer}/{length}")
    async def returned(producer: str, length: str) -> StreamingResponse:
        response = StreamingResponse(
            content(producer, length), media_type="application/octet-stream", background=BackgroundTask(note_background)
        )
        recorder.record("response", response)
        return response

    @app.get("/returned-with-tasks/{producer}/{length}")
    def returned_with_tasks(producer: str, length: str, background_tasks: BackgroundTasks) -> StreamingResponse:
        # FastAPI hands its BackgroundTasks to a returned response that has no background of its own.
        background_tasks.add_task(note_background)
        response = StreamingResponse(content(producer, length), media_type="application/octet-stream")
        recorder.record("response", response)
        return response

    if FASTAPI_VERSION >= (0, 134):  # older FastAPI rejects a generator endpoint

        @app.get("/generator/sync/{length}", response_class=StreamingResponse)
        def sync_generator(length: str, background_tasks: BackgroundTasks) -> Iterator[bytes]:
            background_tasks.add_task(note_background)
            try:
                yield from chunks(length)
            finally:
                recorder.record("iterator closed")

        @app.get("/generator/async/{length}", response_class=StreamingResponse)
        async def async_generator(length: str, background_tasks: BackgroundTasks) -> AsyncIterator[bytes]:
            background_tasks.add_task(note_background)
            try:
                for chunk in chunks(length):
                    await anyio.lowlevel.checkpoint()
                    yield chunk
            finally:
                recorder.record("iterator closed")

    @app.get("/file/returned")
    async def file_returned() -> FileResponse:
        assert file_path is not None
        response = FileResponse(file_path, background=BackgroundTask(note_background))
        recorder.record("response", response)
        return response

    @app.get("/file/class", response_class=FileResponse)
    async def file_class(background_tasks: BackgroundTasks) -> str:
        assert file_path is not None
        background_tasks.add_task(note_background)
        return str(file_path)

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                recorder.record("response done")

    return recorded


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fastapi") / "big.bin"
    with path.open("wb") as file:
        for _ in range(FILE_SIZE // (1 << 20)):
            file.write(os.urandom(1 << 20))
    return path


def done(recorder: Recorder) -> None:
    recorder.wait_for("response done", timeout=WAIT)
    recorder.wait_for("background ran", timeout=WAIT)


def leave_after_a_part(server: RunningServer, recorder: Recorder, path: str) -> None:
    """Read 1 MiB of ``path``, leave, and wait (bounded) until the app and its background task are done."""
    with partial_read(server, path, READ_BEFORE_LEAVING) as received:
        done(recorder)
    assert received >= READ_BEFORE_LEAVING


# ---------------------------------------------------------------------------------------------
# Returned responses


@pytest.mark.parametrize("route", ["returned", "returned-with-tasks"])
@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_returned_streaming_response_completes(kind: str, producer: str, route: str, recorder: Recorder) -> None:
    with serve(make_app(recorder), kind) as server:
        result = client_fetch(server, f"/{route}/{producer}/complete")
        done(recorder)
    assert result.status == 200
    assert result.header("content-type") == "application/octet-stream"
    assert result.body == CHUNK * COMPLETE_CHUNKS
    response = finished(recorder)
    assert response.outcome is Outcome.COMPLETED
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@pytest.mark.parametrize("route", ["returned", "returned-with-tasks"])
@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_returned_streaming_response_client_leaves(kind: str, producer: str, route: str, recorder: Recorder) -> None:
    """An endless body returned from an endpoint: after the client leaves, the response stops within a
    few MiB, closes the iterator, then runs the background task (its own or FastAPI's)."""
    with serve(make_app(recorder), kind) as server:
        leave_after_a_part(server, recorder, f"/{route}/{producer}/endless")
    response = finished(recorder)
    assert response.outcome is Outcome.DISCONNECTED
    assert 0 < response.bytes_sent < SENT_BOUND
    assert_closed_then_background(recorder)
    server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# response_class= with a generator endpoint


@needs_generator_endpoints
@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_response_class_generator_completes(kind: str, producer: str, recorder: Recorder) -> None:
    with serve(make_app(recorder), kind) as server:
        result = client_fetch(server, f"/generator/{producer}/complete")
        done(recorder)
    assert result.status == 200
    assert result.body == CHUNK * COMPLETE_CHUNKS
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@needs_generator_endpoints
@pytest.mark.parametrize("kind", KINDS)
def test_response_class_sync_generator_client_leaves(kind: str, recorder: Recorder) -> None:
    """``response_class=StreamingResponse`` on a sync generator endpoint: FastAPI hands the generator itself
    to our response, so a disconnect stops it, closes it in a worker thread, and runs FastAPI's
    background tasks after it."""
    with serve(make_app(recorder), kind) as server:
        leave_after_a_part(server, recorder, "/generator/sync/endless")
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@needs_generator_endpoints
@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "hypercorn-trio"])
def test_response_class_async_generator_client_leaves(kind: str, recorder: Recorder) -> None:
    """An async generator endpoint is relayed by FastAPI through a wrapper generator of its own (an
    ``async for`` without ``aclosing``), and our response closes that wrapper. The endpoint's ``finally``
    runs at once when the cancellation lands inside it, else when asyncio finalizes it, just after: it
    always runs, but not necessarily before the background task. Return ``StreamingResponse(gen())``
    for the ordered close. (On trio the finalization comes with a ``ResourceWarning``; not tested.)"""
    with serve(make_app(recorder), kind) as server:
        leave_after_a_part(server, recorder, "/generator/async/endless")
        recorder.wait_for("iterator closed", timeout=WAIT)
    assert recorder.count("iterator closed") == 1
    assert recorder.count("background ran") == 1
    server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# FileResponse


@pytest.mark.parametrize("route", ["returned", "class"])
@pytest.mark.parametrize("kind", KINDS)
def test_file_response_completes(kind: str, route: str, recorder: Recorder, big_file: Path) -> None:
    with serve(make_app(recorder, big_file), kind) as server:
        result = client_fetch(server, f"/file/{route}")
        done(recorder)
    assert result.status == 200
    assert result.body == big_file.read_bytes()
    assert result.header("content-type") == "application/octet-stream"
    assert recorder.count("background ran") == 1
    if route == "returned":
        assert finished(recorder).outcome is Outcome.COMPLETED
    server.assert_no_errors()


@pytest.mark.parametrize("route", ["returned", "class"])
@pytest.mark.parametrize("kind", KINDS)
def test_file_response_client_leaves(kind: str, route: str, recorder: Recorder, big_file: Path) -> None:
    """A client that reads 1 MiB of a 64 MiB file and leaves: the response stops as a disconnect well
    before the end of the file, and the background task runs once."""
    with serve(make_app(recorder, big_file), kind) as server:
        leave_after_a_part(server, recorder, f"/file/{route}")
    assert recorder.count("background ran") == 1
    if route == "returned":
        response = finished(recorder)
        assert response.outcome is Outcome.DISCONNECTED
        if not server.http2:
            assert 0 < response.bytes_sent < SENT_BOUND
    server.assert_no_errors()
