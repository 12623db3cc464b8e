"""Producer shapes on real servers: each keeps the core guarantees when the client leaves.

The guarantees: the response stops promptly, the body iterator is closed once and before the
background task, the background task runs per ``background_policy``, and nothing escapes to the
server for a client that went away. Each app records what happened in a ``Recorder``: "iterator
closed" (the producer's ``finally``), "background ran", "disconnect seen" (the server's
``receive()`` returned ``http.disconnect``) and, once the response returned, "response".

Servers: uvicorn (asyncio), hypercorn on asyncio and on trio. A case no server can produce (a
``send()`` that raises on the very first message) runs as a raw ASGI call on asyncio and trio.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType

import anyio
import pytest
from starlette.background import BackgroundTask
from starlette.responses import ContentStream
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disconnect_responses import Outcome, StreamingResponse
from disconnect_responses._race import YIELD_EVERY_BYTES, BackgroundPolicy

from .asgi import (
    Body,
    FakeServer,
    assert_closed_then_background,
    assert_exhausted,
    blocked_in_next,
    call,
    finished,
    noting_disconnect,
    producer_of,
    run_recorded,
)
from .servers import Event, Recorder, leave_when, partial_read, request_then_leave, serve

pytestmark = pytest.mark.usefixtures("library_log")
KINDS = ("uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio")
CHUNK_SIZE = 64 * 1024
CHUNK = b"p" * CHUNK_SIZE
READ_BEFORE_LEAVING = 4 * CHUNK_SIZE
POLICIES: tuple[BackgroundPolicy, ...] = ("always", "completed")

Producer = Callable[[Recorder], ContentStream]


class QuickCleanup(StreamingResponse):
    """Gives up on a close that does not finish within 0.2 s, so a test can see the bound."""

    cleanup_timeout = 0.2


def make_app(
    recorder: Recorder,
    producer: Producer,
    *,
    policy: BackgroundPolicy = "always",
    response_class: type[StreamingResponse] = StreamingResponse,
    after_disconnect: bool = False,
) -> ASGIApp:
    """An app that streams ``producer(recorder)`` and records what happened.

    With ``after_disconnect`` the app first reads ``receive()`` until the client has gone (a slow app
    that learned of the departure while it prepared the response), and only then calls the response,
    with a ``receive()`` that reports the disconnect again, as uvicorn's does.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tapped_receive = noting_disconnect(receive, functools.partial(recorder.record, "disconnect seen"))

        async def replay_disconnect() -> Message:
            return {"type": "http.disconnect"}

        if after_disconnect:
            while (await tapped_receive())["type"] != "http.disconnect":
                pass

        async def background() -> None:
            recorder.record("background ran")

        response = response_class(
            producer(recorder),
            media_type="application/octet-stream",
            background=BackgroundTask(background),
            background_policy=policy,
        )
        await run_recorded(response, recorder, scope, replay_disconnect if after_disconnect else tapped_receive, send)

    return app


def assert_held_for_cleanup_timeout(events: Sequence[Event], since: str) -> None:
    """The background task started ``QuickCleanup.cleanup_timeout`` after ``since``, give or take the
    server's pace: the cleanup was waited for that long, and no longer."""
    times = {event.name: event.time for event in events}
    held = times["background ran"] - times[since]
    assert QuickCleanup.cleanup_timeout * 0.9 <= held < QuickCleanup.cleanup_timeout + 2.0


def library_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "disconnect_responses" and record.levelno == level]


# ---------------------------------------------------------------------------------------------
# The client leaves before the first item is pulled


def endless(shape: str, recorder: Recorder) -> Body:
    """An endless producer of ``shape`` that records "started" as its body starts and "iterator
    closed" in its ``finally``."""
    return producer_of(
        shape,
        itertools.repeat(CHUNK),
        functools.partial(recorder.record, "iterator closed"),
        started=functools.partial(recorder.record, "started"),
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", KINDS)
def test_gone_before_the_first_item_a_sync_producer_never_starts(
    kind: str, policy: BackgroundPolicy, recorder: Recorder
) -> None:
    """A sync generator is pulled in a worker thread, which gives the listener its turn first: the
    generator never starts, so its ``finally`` never runs (Python semantics: there is nothing to run).
    It is closed all the same and can never start later; the background task runs per the policy."""
    contents: list[Body] = []

    def producer(recorder: Recorder) -> Body:
        contents.append(endless("sync", recorder))
        return contents[0]

    with serve(make_app(recorder, producer, policy=policy, after_disconnect=True), kind) as server:
        request_then_leave(server.port, "/")
        response = finished(recorder)
        if policy == "always":
            recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert response.bytes_sent == 0
    assert "started" not in recorder.names()
    assert "iterator closed" not in recorder.names()
    assert recorder.count("background ran") == (1 if policy == "always" else 0)
    anyio.run(assert_exhausted, contents[0])
    server.assert_no_errors()


@pytest.mark.parametrize("kind", KINDS)
def test_gone_before_the_first_item_an_async_producer_never_starts(kind: str, recorder: Recorder) -> None:
    """The server reported the disconnect before the response was called: no producer is started for a
    client that has gone, and no body byte is handed to the server (the listener hears it before the
    body starts)."""

    def producer(recorder: Recorder) -> Body:
        return endless("never-awaiting", recorder)

    with serve(make_app(recorder, producer, after_disconnect=True), kind) as server:
        request_then_leave(server.port, "/")
        response = finished(recorder)
        recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert "started" not in recorder.names()
    assert response.bytes_sent == 0


@pytest.mark.parametrize("producer_kind", ["async", "sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_gone_before_the_first_item_resources_acquired_inside_are_released(
    kind: str, producer_kind: str, recorder: Recorder
) -> None:
    """The safe pattern: a generator that acquires its upstream inside its body releases whatever it
    acquired, whether or not it ever started. Either it never started (nothing acquired, nothing to
    release) or it started and its ``finally`` ran, before the background task."""

    def release() -> None:
        recorder.record("released")
        recorder.record("iterator closed")

    def producer(recorder: Recorder) -> Body:
        shape = "awaiting" if producer_kind == "async" else "sync"
        return producer_of(
            shape, itertools.repeat(CHUNK), release, started=functools.partial(recorder.record, "acquired")
        )

    with serve(make_app(recorder, producer, after_disconnect=True), kind) as server:
        request_then_leave(server.port, "/")
        response = finished(recorder)
        recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.count("acquired") == recorder.count("released") <= 1
    if recorder.count("acquired"):
        assert_closed_then_background(recorder)
    assert response.bytes_sent <= 2 * YIELD_EVERY_BYTES
    server.assert_no_errors()


@pytest.mark.anyio
@pytest.mark.parametrize("producer_kind", ["async", "sync"])
async def test_a_never_started_generator_has_no_finally_to_run(producer_kind: str) -> None:
    """Why resources belong inside the generator: a generator that never started is closed (it can never
    start later) without running its ``finally``, so a resource opened *outside* it and released in
    that ``finally`` stays open. The background task still runs."""
    opened_outside: list[str] = ["upstream connection"]
    events: list[str] = []
    shape = "never-awaiting" if producer_kind == "async" else "sync"
    # The relay releases the connection in its finally.
    content = producer_of(shape, itertools.repeat(CHUNK), opened_outside.clear)
    # A spec 2.4 server whose client left before the response started, which receive() has not
    # reported yet: send() refuses the headers already.
    server = FakeServer("2.4", silent=True)
    server.leave()
    response = StreamingResponse(content, background=BackgroundTask(events.append, "background"))
    await call(response, server)
    assert response.outcome is Outcome.DISCONNECTED
    assert [message["type"] for message in server.messages + server.refused] == ["http.response.start"]
    assert events == ["background"]
    assert opened_outside == ["upstream connection"], "the finally of a never-started generator ran"
    await assert_exhausted(content)


# ---------------------------------------------------------------------------------------------
# Generators that resist being closed


def yields_after_generator_exit_async(recorder: Recorder) -> AsyncIterator[bytes]:
    async def produce() -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    yield CHUNK
                except GeneratorExit:
                    recorder.record("caught GeneratorExit")
                    yield CHUNK
        finally:
            recorder.record("iterator closed")

    return produce()


def yields_after_generator_exit_sync(recorder: Recorder) -> Iterator[bytes]:
    def produce() -> Iterator[bytes]:
        try:
            while True:
                try:
                    yield CHUNK
                except GeneratorExit:
                    recorder.record("caught GeneratorExit")
                    yield CHUNK
        finally:
            recorder.record("iterator closed")

    return produce()


def swallows_generator_exit(recorder: Recorder) -> AsyncIterator[bytes]:
    async def produce() -> AsyncIterator[bytes]:
        while True:
            try:
                yield CHUNK
            except GeneratorExit:
                recorder.record("caught GeneratorExit")
                recorder.record("iterator closed")
                return

    return produce()


def waits_upstream_then(on_cancel: str) -> Producer:
    """Sends a chunk, then waits on an upstream that never answers; the cancellation that stops the
    response lands at that await, and the producer swallows it and then yields again, or returns."""

    def producer(recorder: Recorder) -> AsyncIterator[bytes]:
        async def produce() -> AsyncIterator[bytes]:
            try:
                yield CHUNK
                try:
                    recorder.record("waiting on upstream")
                    await anyio.sleep_forever()
                except anyio.get_cancelled_exc_class():
                    recorder.record("swallowed cancellation")
                if on_cancel == "yield":
                    yield CHUNK
            finally:
                recorder.record("iterator closed")

        return produce()

    return producer


STUBBORN: dict[str, Producer] = {
    "async-yields-after-GeneratorExit": yields_after_generator_exit_async,
    "sync-yields-after-GeneratorExit": yields_after_generator_exit_sync,
    "async-returns-on-GeneratorExit": swallows_generator_exit,
    "swallows-cancellation-then-yields": waits_upstream_then("yield"),
    "swallows-cancellation-then-returns": waits_upstream_then("return"),
}


LOOP_FINALIZATION_ERRORS = (
    "an error occurred during closing of asynchronous generator",
    "Exception ignored during finalization of async generator",
)


@pytest.mark.parametrize("producer", STUBBORN)
@pytest.mark.parametrize("kind", KINDS)
def test_a_generator_that_resists_closing_is_ended_and_logged(
    kind: str, producer: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator that swallows ``GeneratorExit`` or the cancellation never hangs the response: it ends,
    the background task runs once, and nothing reaches the server as an error of the app.

    Swallowing and returning is legal Python and ends quietly. Yielding again after ``GeneratorExit``
    makes ``close()`` raise ``RuntimeError``: the library logs it as an error and moves on. Python leaves
    such a sync generator suspended until it is garbage collected, and an async one until its event loop
    finalizes it, where asyncio or trio log their own error as well (CPython 3.11 cannot close it twice).
    """
    with serve(make_app(recorder, STUBBORN[producer]), kind) as server:
        if producer.startswith("swallows-cancellation"):
            leave_when(server, recorder, "waiting on upstream")
        else:
            with partial_read(server, "/", READ_BEFORE_LEAVING):
                pass
        response = finished(recorder)
        recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.count("background ran") == 1
    if "GeneratorExit" in producer:
        assert recorder.index("caught GeneratorExit") < recorder.index("background ran")
    else:
        assert recorder.index("swallowed cancellation") < recorder.index("background ran")
    errors = library_records(caplog, logging.ERROR)
    if "yields-after-GeneratorExit" in producer:
        assert "iterator closed" not in recorder.names()[: recorder.index("background ran")]
        [error] = errors
        assert "closing the body iterator" in error.getMessage()
        assert error.exc_info is not None and isinstance(error.exc_info[1], RuntimeError)
        assert "ignored GeneratorExit" in str(error.exc_info[1])
        assert server.app_errors == []
        assert all(any(text in found for text in LOOP_FINALIZATION_ERRORS) for found in server.errors())
    else:
        assert_closed_then_background(recorder)
        assert errors == []
        server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# Nested generators


def inner_async(recorder: Recorder) -> AsyncGenerator[bytes, None]:
    async def inner() -> AsyncGenerator[bytes, None]:
        try:
            while True:
                yield CHUNK
        finally:
            recorder.record("inner closed")

    return inner()


def inner_sync(recorder: Recorder) -> Iterator[bytes]:
    try:
        while True:
            yield CHUNK
    finally:
        recorder.record("inner closed")


def yield_from(recorder: Recorder) -> Iterator[bytes]:
    def outer() -> Iterator[bytes]:
        try:
            yield from inner_sync(recorder)
        finally:
            recorder.record("iterator closed")

    return outer()


def async_for_aclosing(recorder: Recorder) -> AsyncIterator[bytes]:
    async def outer() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(inner_async(recorder)) as inner:
                async for chunk in inner:
                    yield chunk
        finally:
            recorder.record("iterator closed")

    return outer()


def async_for_bare(recorder: Recorder) -> AsyncIterator[bytes]:
    async def outer() -> AsyncIterator[bytes]:
        try:
            async for chunk in inner_async(recorder):
                yield chunk
        finally:
            recorder.record("iterator closed")

    return outer()


@pytest.mark.parametrize("producer", ["yield-from", "async-for-aclosing"])
@pytest.mark.parametrize("kind", KINDS)
def test_nested_generators_inner_finally_runs_first(kind: str, producer: str, recorder: Recorder) -> None:
    """Closing the outer generator closes the inner one: ``yield from`` forwards the close, and
    ``contextlib.aclosing`` around an ``async for`` does it for async generators. The inner ``finally``
    runs, then the outer one, then the background task."""
    factory: Producer = yield_from if producer == "yield-from" else async_for_aclosing
    with serve(make_app(recorder, factory), kind) as server:
        with partial_read(server, "/", READ_BEFORE_LEAVING):
            response = finished(recorder)
            recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert_closed_then_background(recorder)
    assert recorder.count("inner closed") == 1
    assert recorder.index("inner closed") < recorder.index("iterator closed")
    server.assert_no_errors()


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind != "hypercorn-trio"])
def test_nested_async_for_without_aclosing_is_finalized_by_asyncio(kind: str, recorder: Recorder) -> None:
    """A bare ``async for`` over an inner async generator does not close it: only the outer generator
    gets ``aclose()``. On asyncio the inner one is closed by the event loop's async generator finalizer
    once the outer one is gone, so its ``finally`` does run, but in a task of its own with no order
    relative to the background task. (trio finalizes it too, with a ``ResourceWarning`` telling to use
    ``aclosing``.) Use ``contextlib.aclosing`` for a prompt, ordered close."""
    with serve(make_app(recorder, async_for_bare), kind) as server:
        with partial_read(server, "/", READ_BEFORE_LEAVING):
            response = finished(recorder)
            recorder.wait_for("background ran")
            recorder.wait_for("inner closed")
    assert response.outcome is Outcome.DISCONNECTED
    assert_closed_then_background(recorder)
    assert recorder.count("inner closed") == 1
    server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# An ``async with`` whose ``__aexit__`` awaits


class Upstream:
    """An async context manager whose ``__aexit__`` awaits, as closing an HTTP client or releasing a lock
    does. With ``shield`` its exit runs in a shielded scope; with ``hang`` it never finishes."""

    def __init__(self, recorder: Recorder, *, shield: bool = False, hang: bool = False) -> None:
        self.recorder = recorder
        self.shield = shield
        self.hang = hang

    async def __aenter__(self) -> Upstream:
        self.recorder.record("upstream opened")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.recorder.record("exit started", exc_type)
        if self.hang:
            await anyio.sleep_forever()
        with anyio.CancelScope(shield=self.shield):
            await anyio.sleep(0.01)
        self.recorder.record("exit finished")


def upstream_at_a_yield(recorder: Recorder, *, hang: bool = False) -> AsyncIterator[bytes]:
    """Never awaits between chunks: when the client leaves, the generator is suspended at a ``yield``."""

    async def produce() -> AsyncIterator[bytes]:
        try:
            async with Upstream(recorder, hang=hang):
                while True:
                    yield CHUNK
        finally:
            recorder.record("iterator closed")

    return produce()


@pytest.mark.parametrize("kind", KINDS)
def test_aexit_that_awaits_completes_when_closed_at_a_yield(kind: str, recorder: Recorder) -> None:
    """The generator sits at a ``yield`` when the client leaves: ``aclose()`` runs the ``__aexit__`` with
    ``GeneratorExit``, shielded from the cancellation that stopped the body, so its awaits complete,
    before the background task."""
    with serve(make_app(recorder, upstream_at_a_yield), kind) as server:
        with partial_read(server, "/", READ_BEFORE_LEAVING):
            response = finished(recorder)
            recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.values("exit started") == [GeneratorExit]
    assert recorder.index("exit started") < recorder.index("exit finished") < recorder.index("background ran")
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@pytest.mark.parametrize("kind", KINDS)
def test_aexit_that_never_ends_is_bounded_by_cleanup_timeout(
    kind: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``__aexit__`` that never finishes holds the response ``cleanup_timeout`` and no longer: the close
    is given up with a warning, and the background task runs."""

    def producer(recorder: Recorder) -> AsyncIterator[bytes]:
        return upstream_at_a_yield(recorder, hang=True)

    with serve(make_app(recorder, producer, response_class=QuickCleanup), kind) as server:
        with partial_read(server, "/", READ_BEFORE_LEAVING):
            response = finished(recorder)
            events = recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert_held_for_cleanup_timeout(events, "exit started")
    assert "exit finished" not in recorder.names()
    [warning] = library_records(caplog, logging.WARNING)
    assert "closing the body iterator" in warning.getMessage() and "0.2 s" in warning.getMessage()
    server.assert_no_errors()


def interrupted_at_an_upstream_await(*, shield: bool = False, hang: bool = False) -> Producer:
    def producer(recorder: Recorder) -> AsyncIterator[bytes]:
        async def produce() -> AsyncIterator[bytes]:
            try:
                async with Upstream(recorder, shield=shield, hang=hang):
                    yield CHUNK
                    recorder.record("waiting on upstream")
                    await anyio.sleep_forever()
            finally:
                recorder.record("iterator closed")

        return produce()

    return producer


@pytest.mark.parametrize("shield", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_aexit_when_interrupted_at_an_upstream_await(kind: str, shield: bool, recorder: Recorder) -> None:
    """The generator is awaiting its upstream when the client leaves: the cancellation that stops the
    body lands at that await, and from there the ``__aexit__`` runs shielded (divergence 14), so its
    awaits complete whether or not it shields itself, before the background task."""
    with serve(make_app(recorder, interrupted_at_an_upstream_await(shield=shield)), kind) as server:
        leave_when(server, recorder, "waiting on upstream")
        response = finished(recorder)
        recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    [exc_type] = recorder.values("exit started")
    assert isinstance(exc_type, type) and exc_type.__name__ in ("CancelledError", "Cancelled")
    assert recorder.index("exit finished") < recorder.index("background ran")
    assert_closed_then_background(recorder)
    server.assert_no_errors()


@pytest.mark.parametrize("kind", KINDS)
def test_aexit_interrupted_at_an_upstream_await_is_bounded_by_cleanup_timeout(
    kind: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``__aexit__`` that never finishes after the cancellation holds the response ``cleanup_timeout``
    and no longer: it is cancelled with a warning, and the background task runs."""
    app = make_app(recorder, interrupted_at_an_upstream_await(hang=True), response_class=QuickCleanup)
    with serve(app, kind) as server:
        leave_when(server, recorder, "waiting on upstream")
        response = finished(recorder)
        events = recorder.wait_for("background ran")
    assert response.outcome is Outcome.DISCONNECTED
    assert_held_for_cleanup_timeout(events, "exit started")
    assert "exit finished" not in recorder.names()
    assert_closed_then_background(recorder)
    [warning] = library_records(caplog, logging.WARNING)
    assert warning.getMessage() == "Gave up waiting for the body iterator's cleanup after 0.2 s"
    server.assert_no_errors()


class UpstreamBroke(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# A sync iterator blocked inside next()


@pytest.mark.parametrize("kind", KINDS)
def test_sync_iterator_blocked_in_next(kind: str, recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    """What waits for what: the response stops at once, abandoning the worker thread stuck in ``next()``;
    the close waits for that ``next()`` at most ``cleanup_timeout``, then the background task runs, so
    one stuck read cannot hold it longer. The iterator is closed in that worker thread as soon as
    ``next()`` returns, and its ``finally`` runs there."""
    release = threading.Event()

    def in_this_thread(name: str) -> Callable[[], None]:
        """Records ``name`` with the thread it is called in."""
        return lambda: recorder.record(name, threading.current_thread().name)

    def producer(recorder: Recorder) -> Iterator[bytes]:
        return blocked_in_next(
            CHUNK, release, blocked=in_this_thread("blocked in next"), closed=in_this_thread("iterator closed")
        )

    try:
        with serve(make_app(recorder, producer, response_class=QuickCleanup), kind) as server:
            leave_when(server, recorder, "blocked in next")
            response = finished(recorder)
            events = recorder.wait_for("background ran")
            assert "iterator closed" not in recorder.names()
            release.set()
            recorder.wait_for("iterator closed")
    finally:
        release.set()
    assert response.outcome is Outcome.DISCONNECTED
    assert_held_for_cleanup_timeout(events, "disconnect seen")
    [blocked_thread] = recorder.values("blocked in next")
    assert recorder.values("iterator closed") == [blocked_thread]
    assert blocked_thread != f"server-{kind}"
    [warning] = library_records(caplog, logging.WARNING)
    assert "closing the body iterator" in warning.getMessage()
    server.assert_no_errors()


def test_an_error_closing_a_blocked_sync_iterator_is_logged(recorder: Recorder) -> None:
    """When the close happens in the worker thread after a stuck ``next()`` returned, an error from the
    iterator's ``close()`` is logged on the library's logger, as it is when the close runs in a thread of
    its own."""
    release = threading.Event()

    def close_fails() -> None:
        recorder.record("iterator closed")
        raise UpstreamBroke("closing the upstream failed")

    def producer(recorder: Recorder) -> Iterator[bytes]:
        return blocked_in_next(
            CHUNK, release, blocked=functools.partial(recorder.record, "blocked in next"), closed=close_fails
        )

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info is not None:
                recorder.record("library logged", record.exc_info[1])

    handler = Forward(logging.ERROR)
    logging.getLogger("disconnect_responses").addHandler(handler)
    try:
        with serve(make_app(recorder, producer, response_class=QuickCleanup), "uvicorn-httptools") as server:
            leave_when(server, recorder, "blocked in next")
            finished(recorder)
            recorder.wait_for("background ran")
            release.set()
            recorder.wait_for("library logged", timeout=2.0)
    finally:
        release.set()
        logging.getLogger("disconnect_responses").removeHandler(handler)
    [logged] = recorder.values("library logged")
    assert isinstance(logged, UpstreamBroke)


# ---------------------------------------------------------------------------------------------
# An exception after the headers were sent


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("producer_kind", ["async", "sync"])
@pytest.mark.parametrize("kind", KINDS)
def test_error_after_the_headers_reaches_the_server(
    kind: str, producer_kind: str, policy: BackgroundPolicy, recorder: Recorder
) -> None:
    """The producer's own exception, raised after the headers and a chunk went out, reaches the server
    as itself (not in an exception group) and is logged there as today; the iterator is closed first,
    and the background task runs with policy "always", not with "completed"."""

    def failing(recorder: Recorder) -> Body:
        shape = "awaiting" if producer_kind == "async" else "sync"
        closed = functools.partial(recorder.record, "iterator closed")
        return producer_of(shape, [CHUNK], closed, error=UpstreamBroke("upstream broke"))

    with serve(make_app(recorder, failing, policy=policy), kind) as server:
        # The client stays until the response has ended, so the error, not a disconnect, ends it.
        leave_when(server, recorder, "response")
        response = finished(recorder)
        if policy == "always":
            recorder.wait_for("background ran")
    assert response.outcome is Outcome.ERROR
    [error] = server.app_errors
    assert type(error) is UpstreamBroke
    logged = [record for record in server.log_records if record.exc_info is not None]
    assert any(record.exc_info is not None and record.exc_info[1] is error for record in logged), logged
    assert_closed_then_background(recorder, background=policy == "always")
