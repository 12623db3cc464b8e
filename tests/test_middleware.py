"""Middleware stacks and the stop signal: the guarantees hold whatever wraps the response.

The stacks: one and four ``BaseHTTPMiddleware`` layers (each hands messages on through a zero-buffer
stream, so the cancellation lands in ``send()`` while the producer sits at a ``yield``),
``GZipMiddleware`` (compresses each chunk; the client asks for gzip) and a pure-ASGI middleware that
wraps ``receive``. Each app records in a ``Recorder`` "iterator closed" (the producer's ``finally``),
"background ran" and, once the response returned, "response".

``disconnect_responses.stopping()`` is the producer's stop signal: set when the client leaves, before
the iterator is closed, readable from an async producer and from a sync one in its worker thread.
"""

from __future__ import annotations

import functools
import itertools
import queue
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import ContentStream, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disconnect_responses import Outcome, StreamingResponse, stopping

from .asgi import SHAPES, WAIT, FakeServer, assert_closed_then_background, call, finished, producer_of, run_recorded
from .servers import Recorder, leave_when, read_then_close, serve

# Older Starlette's BaseHTTPMiddleware (0.40, 0.41) iterates Request.stream() without closing it; trio warns
# when that generator is collected. Not this library's generator, and nothing leaks.
pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <async_generator object Request\.stream:pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.usefixtures("library_log"),
]

KINDS = ("uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio")
CHUNK_SIZE = 64 * 1024
# Incompressible, so that gzip output grows with the input and a partial read means a partial body.
CHUNK = random.Random(7).randbytes(CHUNK_SIZE)
READ_BEFORE_LEAVING = 1 << 20
# Socket buffers on loopback hold a few MiB; anything near this means the stop failed.
SENT_BOUND = 16 << 20

Producer = Callable[[Recorder], ContentStream]


async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


def receive_wrapper(app: ASGIApp, recorder: Recorder) -> ASGIApp:
    """A pure-ASGI middleware that wraps ``receive``, as request loggers and body limiters do."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_receive() -> Message:
            message = await receive()
            recorder.record("received", message["type"])
            return message

        await app(scope, wrapped_receive, send)

    return middleware


def stack(app: ASGIApp, name: str, recorder: Recorder) -> ASGIApp:
    if name == "none":
        return app
    if name == "base-http-1":
        return BaseHTTPMiddleware(app, dispatch=passthrough)
    if name == "base-http-4":
        for _ in range(4):
            app = BaseHTTPMiddleware(app, dispatch=passthrough)
        return app
    if name == "gzip":
        return GZipMiddleware(app, minimum_size=500)
    if name == "receive-wrapper":
        return receive_wrapper(app, recorder)
    raise ValueError(name)


STACKS = ("base-http-1", "base-http-4", "gzip", "receive-wrapper")


def endless(recorder: Recorder, producer: str) -> ContentStream:
    return producer_of(producer, itertools.repeat(CHUNK), functools.partial(recorder.record, "iterator closed"))


def make_app(recorder: Recorder, producer: Producer) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def background() -> None:
            recorder.record("background ran")

        response = StreamingResponse(
            producer(recorder), media_type="application/octet-stream", background=BackgroundTask(background)
        )
        await run_recorded(response, recorder, scope, receive, send)

    return app


# ---------------------------------------------------------------------------------------------
# Item 5: middleware stacks


@pytest.mark.parametrize("producer", SHAPES)
@pytest.mark.parametrize("stack_name", STACKS)
@pytest.mark.parametrize("kind", KINDS)
def test_guarantees_hold_through_the_stack(kind: str, stack_name: str, producer: str, recorder: Recorder) -> None:
    """The client reads 1 MiB of an endless body through the stack and leaves: the response stops as a
    disconnect within a few MiB, closes its iterator once, then runs its background task once, and
    nothing reaches the server as an error."""

    def content(recorder: Recorder) -> ContentStream:
        return endless(recorder, producer)

    app = stack(make_app(recorder, content), stack_name, recorder)
    headers = [("Accept-Encoding", "gzip")] if stack_name == "gzip" else None
    with serve(app, kind) as server:
        received = read_then_close(server.port, "/", READ_BEFORE_LEAVING, headers=headers)
        response = finished(recorder, background=True)
    assert received >= READ_BEFORE_LEAVING
    assert response.outcome is Outcome.DISCONNECTED
    assert 0 < response.bytes_sent < SENT_BOUND
    assert_closed_then_background(recorder)
    if stack_name == "receive-wrapper":
        assert "http.disconnect" in recorder.values("received")
    server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# Item 3: the stop signal


def stop_watching(recorder: Recorder, producer: str) -> ContentStream:
    """Sends a chunk, then waits on an upstream that never answers; records what ``stopping()`` said."""
    upstream = anyio.Event()

    async def async_producer() -> AsyncIterator[bytes]:
        stop = stopping()
        recorder.record("stop set at start", stop.is_set())
        try:
            yield CHUNK
            recorder.record("waiting on upstream")
            await upstream.wait()
        finally:
            recorder.record("stop set at close", stop.is_set())
            recorder.record("iterator closed")

    def sync_producer() -> Iterator[bytes]:
        stop = stopping()
        recorder.record("stop set at start", stop.is_set())
        try:
            yield CHUNK
            recorder.record("waiting on upstream")
            # The upstream, in this worker thread, is the stop event itself, awaited in the event loop.
            anyio.from_thread.run(stop.wait)
            recorder.record("stop seen in worker thread")
        finally:
            recorder.record("stop set at close", stop.is_set())
            recorder.record("iterator closed")

    return async_producer() if producer == "async" else sync_producer()


@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("stack_name", ["none", "base-http-1", "base-http-4"])
@pytest.mark.parametrize("kind", KINDS)
def test_stopping_is_set_when_the_client_leaves(kind: str, stack_name: str, producer: str, recorder: Recorder) -> None:
    """``stopping()`` is unset while the client is there and set once it has left, before the iterator is
    closed: in an async producer, and in a sync one in its worker thread, whose ``next()`` then returns
    on its own (no ``cleanup_timeout`` spent); behind ``BaseHTTPMiddleware`` too."""

    def content(recorder: Recorder) -> ContentStream:
        return stop_watching(recorder, producer)

    app = stack(make_app(recorder, content), stack_name, recorder)
    with serve(app, kind) as server:
        leave_when(server, recorder, "waiting on upstream")
        response = finished(recorder, background=True)
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.values("stop set at start") == [False]
    assert recorder.values("stop set at close") == [True]
    if producer == "sync":
        assert recorder.index("stop seen in worker thread") < recorder.index("iterator closed")
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@pytest.mark.anyio
@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("stack_name", ["none", "receive-wrapper"])
async def test_stopping_on_a_spec_2_4_server(stack_name: str, producer: str) -> None:
    """On spec 2.4 (``send()`` raises ``OSError`` after the disconnect, which also arrives on ``receive()``)
    a producer waiting on its upstream never calls ``send()`` again; ``stopping()`` is still set as soon
    as the client leaves, and the response ends quietly."""
    recorder = Recorder()
    client = FakeServer("2.4")

    def content(recorder: Recorder) -> ContentStream:
        return stop_watching(recorder, producer)

    async def leave_when_waiting() -> None:
        await anyio.to_thread.run_sync(recorder.wait_for, "waiting on upstream")
        client.leave()

    app = stack(make_app(recorder, content), stack_name, recorder)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(leave_when_waiting)
        await call(app, client)
    response = finished(recorder)
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.values("stop set at start") == [False]
    assert recorder.values("stop set at close") == [True]
    assert_closed_then_background(recorder)


def cooperative_relay(recorder: Recorder, producer: str) -> ContentStream:
    """A relay whose upstream job (a worker thread producing chunks, as an LLM or a download would) runs
    outside the response: nothing cancels it when the client leaves. The producer waits on the upstream
    or on ``stopping()``, whichever comes first, and then tells the job to stop."""
    chunks: queue.Queue[bytes] = queue.Queue(maxsize=1)
    stop_upstream = threading.Event()

    def upstream_job() -> None:
        produced = 0
        while not stop_upstream.is_set():
            try:
                chunks.put(CHUNK, timeout=0.01)
            except queue.Full:
                continue
            produced += 1
            recorder.record("upstream produced", produced)
        recorder.record("upstream stopped", produced)

    threading.Thread(target=upstream_job, name="upstream-job", daemon=True).start()

    def next_chunk() -> bytes | None:
        while not stop_upstream.is_set():
            try:
                return chunks.get(timeout=0.01)
            except queue.Empty:
                continue
        return None

    async def async_relay() -> AsyncIterator[bytes]:
        stop = stopping()
        try:
            # The stop signal cancels the body at once, wherever it waits; the job is told below, in
            # the finally, where stopping() says why the body ended (an error or the end of the
            # upstream would not stop it).
            while (chunk := await anyio.to_thread.run_sync(next_chunk, abandon_on_cancel=True)) is not None:
                yield chunk
        finally:
            if stop.is_set():
                stop_upstream.set()
            recorder.record("iterator closed")

    def sync_relay() -> Iterator[bytes]:
        stop = stopping()
        try:
            while not stop.is_set():
                try:
                    yield chunks.get(timeout=0.01)
                except queue.Empty:
                    continue
            recorder.record("stop seen in worker thread")
        finally:
            stop_upstream.set()
            recorder.record("iterator closed")

    return async_relay() if producer == "async" else sync_relay()


@pytest.mark.parametrize("producer", ["async", "sync"])
@pytest.mark.parametrize("stack_name", ["none", "base-http-1"])
@pytest.mark.parametrize("kind", ["uvicorn-httptools", "hypercorn-trio"])
def test_a_cooperative_producer_stops_its_upstream(
    kind: str, stack_name: str, producer: str, recorder: Recorder
) -> None:
    """The upstream job stops producing as soon as the client has left, before the background task
    runs, and it produced at most a couple of chunks more than the client was handed."""

    def content(recorder: Recorder) -> ContentStream:
        return cooperative_relay(recorder, producer)

    app = stack(make_app(recorder, content), stack_name, recorder)
    with serve(app, kind) as server:
        read_then_close(server.port, "/", READ_BEFORE_LEAVING)
        response = finished(recorder, background=True)
        recorder.wait_for("upstream stopped", timeout=WAIT)
    assert response.outcome is Outcome.DISCONNECTED
    assert_closed_then_background(recorder)
    [produced] = recorder.values("upstream stopped")
    assert isinstance(produced, int)
    handed = response.bytes_sent // CHUNK_SIZE
    # One chunk in the queue, one in the job's hand, one pulled but refused by the stopped response.
    assert produced <= handed + 3, (produced, handed)
    server.assert_no_errors()
