"""Divergence 15 at the ASGI level: what one shutdown signal does to each kind of response.

A real SIGTERM is sent to this process, in front of stand-in server handlers that the fixture
installs (as uvicorn installs its own); real server processes are in ``test_shutdown.py``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from starlette.background import BackgroundTask
from starlette.types import Message

from disconnect_responses import FileResponse, Outcome, StreamingResponse, stopping
from disconnect_responses._shutdown import GRACE_VARIABLE, grace_from_environment, shutdown_watch

from .asgi import WATCHDOG, FakeServer, call, producer_of
from .servers import Recorder

pytestmark = pytest.mark.anyio

CHUNK = b"data: tick\n\n"


@pytest.fixture
def sigterm() -> Iterator[Callable[[], None]]:
    """Stand-in server handlers for SIGINT and SIGTERM, as a server installs them; yields what sends
    this process one SIGTERM. The previous handlers are back afterwards, and the watch looks at the
    handlers afresh, so each test chains its own."""
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda signum, frame: received.append(signum))
    shutdown_watch._checked_for = None
    try:
        yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutdown_watch._checked_for = None
        shutdown_watch._stopping_all = False
    assert received in ([], [signal.SIGTERM]), "the server's own handler runs once per signal"


def signal_after_first_chunk(sigterm: Callable[[], None]) -> Callable[[FakeServer, Message], Awaitable[None]]:
    async def on_body(server: FakeServer, message: Message) -> None:
        if server.body_chunks == 1 and message.get("more_body", False):
            sigterm()

    return on_body


def assert_ended_with_a_last_chunk(server: FakeServer) -> None:
    last = server.body_messages[-1]
    assert last.get("more_body", False) is False and last["body"] == b""


@pytest.mark.parametrize("shape", ["awaiting", "never-awaiting", "sync"])
async def test_divergence_15_an_open_ended_stream_ends_on_the_signal(sigterm: Callable[[], None], shape: str) -> None:
    """With the default grace (0) an endless stream is stopped at the signal, ends with a proper last
    chunk, closes its iterator, then runs its background task."""
    recorder = Recorder()
    content = producer_of(shape, iter(lambda: CHUNK, None), closed=lambda: recorder.record("iterator closed"))
    response = StreamingResponse(content, background=BackgroundTask(recorder.record, "background"))
    server = FakeServer(on_body=signal_after_first_chunk(sigterm))
    await call(response, server)
    assert response.outcome is Outcome.SHUTDOWN
    assert_ended_with_a_last_chunk(server)
    assert recorder.names() == ["iterator closed", "background"]


def cooperative(recorder: Recorder, sync: bool) -> AsyncIterator[bytes] | Iterator[bytes]:
    """An endless producer that, once ``stopping()`` is set, finishes with a last item of its own."""

    async def async_items() -> AsyncIterator[bytes]:
        stop = stopping()
        while True:
            yield CHUNK
            with anyio.move_on_after(0 if stop.is_set() else WATCHDOG):
                await stop.wait()
            if stop.is_set():
                recorder.record("saw stopping")
                yield b"data: bye\n\n"
                return

    def sync_items() -> Iterator[bytes]:
        stop = stopping()
        while True:
            yield CHUNK
            anyio.from_thread.run(stop.wait)
            recorder.record("saw stopping")
            yield b"data: bye\n\n"
            return

    return sync_items() if sync else async_items()


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("how", ["argument", "class default"])
async def test_divergence_15_a_stream_finishes_by_itself_within_its_grace(
    sigterm: Callable[[], None], monkeypatch: pytest.MonkeyPatch, sync: bool, how: str
) -> None:
    """``stopping()`` is set at the signal; a producer that then ends by itself within its grace
    completes with its own last item, whether the grace was given to the response or as the default."""
    recorder = Recorder()
    if how == "class default":
        monkeypatch.setattr(StreamingResponse, "shutdown_grace", WATCHDOG * 2)
        response = StreamingResponse(cooperative(recorder, sync))
    else:
        response = StreamingResponse(cooperative(recorder, sync), shutdown_grace=WATCHDOG * 2)
    server = FakeServer(on_body=signal_after_first_chunk(sigterm))
    await call(response, server)
    assert response.outcome is Outcome.COMPLETED
    assert recorder.names() == ["saw stopping"]
    assert server.body == CHUNK + b"data: bye\n\n"


@pytest.mark.parametrize("shape", ["awaiting", "sync"])
async def test_divergence_15_a_stream_that_runs_on_is_stopped_after_its_grace(
    sigterm: Callable[[], None], shape: str
) -> None:
    """A producer that ignores ``stopping()`` is stopped once its grace is over: ``SHUTDOWN``, with a
    proper last chunk; ``stopping()`` was set before its iterator was closed."""
    recorder = Recorder()

    async def async_endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield CHUNK
                await anyio.sleep_forever()
        finally:
            recorder.record("closed", stopping().is_set())

    def sync_endless() -> Iterator[bytes]:
        try:
            yield CHUNK
            anyio.from_thread.run(stopping().wait)
            recorder.record("saw stopping")
            while True:
                yield CHUNK
        finally:
            recorder.record("closed", stopping().is_set())

    content = sync_endless() if shape == "sync" else async_endless()
    response = StreamingResponse(content, shutdown_grace=0.05)
    server = FakeServer(on_body=signal_after_first_chunk(sigterm))
    await call(response, server)
    assert response.outcome is Outcome.SHUTDOWN
    assert_ended_with_a_last_chunk(server)
    assert recorder.values("closed") == [True]


async def test_divergence_15_responses_of_known_length_are_left_to_finish(
    sigterm: Callable[[], None], tmp_path: Path
) -> None:
    """A ``FileResponse`` and a stream with a ``content-length`` in flight at the signal are left to
    finish, as under Starlette; their ``stopping()`` is never set. An open-ended stream beside them
    shows the signal was handled: they go on only once it has ended."""
    data = os.urandom(3 * 64 * 1024)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    all_in_flight = anyio.Event()
    signalled = anyio.Event()
    recorder = Recorder()

    async def in_flight(server: FakeServer, message: Message) -> None:
        if server.body_chunks == 1 and message.get("more_body", False):
            recorder.record("in flight")
            if recorder.count("in flight") == 3:
                all_in_flight.set()
            if server is not endless_server:
                await signalled.wait()

    async def sized() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]
        recorder.record("sized saw stopping", stopping().is_set())

    file = FileResponse(path)
    stream = StreamingResponse(sized(), headers={"content-length": str(len(data))})
    endless = StreamingResponse(producer_of("awaiting", iter(lambda: CHUNK, None), closed=lambda: None))
    file_server = FakeServer(on_body=in_flight)
    stream_server = FakeServer(on_body=in_flight)
    endless_server = FakeServer(on_body=in_flight)

    async def endless_then_signalled() -> None:
        await call(endless, endless_server)
        signalled.set()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(endless_then_signalled)
        task_group.start_soon(call, file, file_server)
        task_group.start_soon(call, stream, stream_server)
        await all_in_flight.wait()
        sigterm()
    assert endless.outcome is Outcome.SHUTDOWN
    assert (file.outcome, stream.outcome) == (Outcome.COMPLETED, Outcome.COMPLETED)
    assert file_server.body == data and stream_server.body == data
    assert recorder.values("sized saw stopping") == [False]


async def test_divergence_15_a_stream_that_starts_during_the_shutdown_ends_too(sigterm: Callable[[], None]) -> None:
    first = StreamingResponse(producer_of("awaiting", iter(lambda: CHUNK, None), closed=lambda: None))
    await call(first, FakeServer(on_body=signal_after_first_chunk(sigterm)))
    later = StreamingResponse(producer_of("awaiting", iter(lambda: CHUNK, None), closed=lambda: None))
    await call(later, FakeServer())
    assert (first.outcome, later.outcome) == (Outcome.SHUTDOWN, Outcome.SHUTDOWN)


def test_the_default_grace_comes_from_the_environment() -> None:
    assert grace_from_environment({}) == 0.0
    assert grace_from_environment({GRACE_VARIABLE: " 2.5 "}) == 2.5
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=GRACE_VARIABLE):
            grace_from_environment({GRACE_VARIABLE: bad})


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="shutdown_grace"):
        StreamingResponse(iter([b""]), shutdown_grace=-1)
