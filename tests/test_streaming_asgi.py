"""StreamingResponse called as a raw ASGI app, with a hand-written server (``FakeServer``) around it.

The fake decides exactly what a server would report and when: the client leaves after a given
number of body chunks, ``send()`` raises ``OSError`` once the client is gone (ASGI spec 2.4), or
blocks forever (a stalled client). Every test runs on asyncio and trio, under ``anyio.fail_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import itertools
import logging
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import Message

from disconnect_responses import Outcome, StreamingResponse, stopping
from disconnect_responses._race import YIELD_EVERY_BYTES, BackgroundPolicy

from .asgi import (
    SHAPES,
    WATCHDOG,
    Body,
    FakeServer,
    assert_exhausted,
    blocked_in_next,
    call,
    call_then_cancel,
    producer_of,
)

pytestmark = pytest.mark.anyio

CHUNK = b"x" * (64 * 1024)
SPEC_VERSIONS = [None, "2.3", "2.4"]
POLICIES: list[BackgroundPolicy] = ["always", "completed"]


class Log:
    """What the producer and the background task did, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def append(self, event: str) -> None:
        self.events.append(event)

    def closed(self) -> None:
        """The producer's ``finally`` ran."""
        self.events.append("closed")

    async def background(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.events.append("background")

    def task(self) -> BackgroundTask:
        return BackgroundTask(self.background)


def endless(shape: str, log: Log) -> Body:
    """An endless producer of ``shape`` that logs "closed" in its ``finally``."""
    return producer_of(shape, itertools.repeat(CHUNK), log.closed)


def waiting_on_upstream(log: Log) -> AsyncIterator[bytes]:
    """Yields one chunk, then waits for an upstream that never sends anything more."""

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            await anyio.sleep_forever()
        finally:
            log.closed()

    return produce()


async def assert_stops_promptly(content: AsyncIterator[bytes], log: Log, client: FakeServer) -> None:
    """Streams ``content`` to ``client``, whose client leaves: the response ends as a disconnect. Its
    ``cleanup_timeout`` is ten times the watchdog's bound, so a producer let go only by that timeout
    fails the test (``TimeoutError``) instead of passing late."""
    response = StreamingResponse(content, background=log.task())
    response.cleanup_timeout = WATCHDOG * 10
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED


@pytest.fixture
def asyncio_only(anyio_backend: str) -> None:
    """Skips the trio run of a test of asyncio's own cancellation (``task.cancel()``, ``asyncio.timeout``)."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio's own cancellation")


def stopped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "disconnect_responses" and "stopped:" in record.getMessage()
    ]


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
@pytest.mark.parametrize("producer", SHAPES)
async def test_client_leaves_mid_stream(
    spec_version: str | None, producer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The response stops, closes the iterator, then runs the background task once; nothing escapes."""
    caplog.set_level(logging.INFO, logger="disconnect_responses")
    log = Log()
    client = FakeServer(spec_version, leave_after=3)
    response = StreamingResponse(endless(producer, log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["closed", "background"]
    assert response.bytes_sent == len(client.body) >= 3 * len(CHUNK)
    assert client.sent_after_disconnect_received == []
    [line] = stopped_lines(caplog)
    assert line.startswith(f'"GET /stream" stopped: disconnected after {response.bytes_sent} body bytes in ')


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
@pytest.mark.parametrize("producer", ["awaiting", "never-awaiting"])
async def test_divergence_3_no_chunk_after_the_listener_saw_the_disconnect(
    spec_version: str | None, producer: str
) -> None:
    """Once ``receive()`` returned ``http.disconnect``, not one more message reaches ``send()``.

    A producer that never awaits, behind a ``send()`` that never yields (uvicorn), gets the event loop
    turn it needs from the guarded send every ``YIELD_EVERY_BYTES``: the bytes handed over after the
    client left stay within two such turns, however long the body.
    """
    log = Log()
    client = FakeServer(spec_version, leave_after=5)
    response = StreamingResponse(endless(producer, log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert client.sent_after_disconnect_received == []
    assert client.bytes_after_leaving <= 2 * YIELD_EVERY_BYTES
    if producer == "awaiting":
        assert client.bytes_after_leaving <= len(CHUNK)


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
async def test_divergence_1_listener_runs_on_every_spec_version(spec_version: str | None) -> None:
    """A producer waiting on its upstream never calls ``send()`` again; the listener still stops it.

    Starlette skips its listener on spec 2.4 and would wait for the upstream forever.
    """
    log = Log()
    client = FakeServer(spec_version, leave_after=1)
    response = StreamingResponse(waiting_on_upstream(log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert client.disconnect_received
    assert log.events == ["closed", "background"]


async def test_divergence_2_oserror_from_send_on_spec_2_4_ends_quietly() -> None:
    """On 2.4, ``send()`` raises ``OSError`` once the client is gone, and ``http.disconnect`` still arrives.

    Whichever the response notices first, it ends as a disconnect: no ``OSError``, no
    ``ClientDisconnect``, no exception group escapes, and the background task runs.
    """
    log = Log()
    client = FakeServer("2.4", leave_after=2)
    response = StreamingResponse(endless("never-awaiting", log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["closed", "background"]
    assert client.sent_after_disconnect_received == []


async def test_divergence_2_oserror_from_send_before_any_disconnect_message() -> None:
    """``OSError`` from ``send()`` alone, with no ``http.disconnect`` ever received, ends as a disconnect."""
    log = Log()
    client = FakeServer("2.4", send_error=OSError(errno.ECONNRESET, "Connection reset by peer"))
    response = StreamingResponse(endless("awaiting", log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert not client.disconnect_received
    assert response.bytes_sent == 0
    assert log.events == ["closed", "background"]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_divergence_2_a_disconnect_after_every_declared_byte_is_completed(spec_version: str) -> None:
    """The client goes once the last declared byte is out, before the empty last message (granian
    reports that at once): the response was delivered, so it is ``COMPLETED``, whether the
    disconnect arrives first (2.3) or the last message is refused with ``OSError`` (2.4)."""
    log = Log()
    client = FakeServer(spec_version)

    async def sized() -> AsyncIterator[bytes]:
        try:
            yield b"a" * 10
            yield b"b" * 10
            client.leave()
            await anyio.wait_all_tasks_blocked()  # the listener has seen the disconnect
        finally:
            log.events.append("closed")

    response = StreamingResponse(sized(), headers={"content-length": "20"}, background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.COMPLETED and response.bytes_sent == 20
    assert log.events == ["closed", "background"]


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
async def test_divergence_2_client_disconnect_from_send_ends_quietly(spec_version: str | None) -> None:
    """A ``send()`` that raises Starlette's ``ClientDisconnect`` (a wrapping middleware) is a disconnect too."""
    log = Log()
    client = FakeServer(spec_version, send_error=ClientDisconnect())
    response = StreamingResponse(endless("sync", log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["closed", "background"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_producer_error_is_reraised_unwrapped(producer: str, policy: BackgroundPolicy) -> None:
    """The producer's own exception reaches the server as itself, not inside an exception group.

    The iterator is closed first; the background task runs with policy "always", not "completed".
    """
    log = Log()
    shape = "never-awaiting" if producer == "async" else "sync"
    content = producer_of(shape, [CHUNK], log.closed, error=ValueError("upstream broke"))
    response = StreamingResponse(content, background=log.task(), background_policy=policy)
    client = FakeServer()
    with pytest.raises(ValueError, match="upstream broke") as caught:
        await call(response, client)
    assert type(caught.value) is ValueError
    assert response.outcome is Outcome.ERROR
    assert log.events == (["closed", "background"] if policy == "always" else ["closed"])


async def test_a_reraised_error_keeps_no_cycle_with_the_producers_frames() -> None:
    """Once the error has reached the server and been dropped, the producer's frames (and what their
    locals hold, an upstream client say) are freed at once, not when the garbage collector runs."""
    freed = anyio.Event()

    class Upstream:
        def __del__(self) -> None:
            freed.set()

    async def failing() -> AsyncIterator[bytes]:
        upstream = Upstream()  # noqa: F841 - held by the frame until it is freed
        yield CHUNK
        raise ValueError("upstream broke")

    gc.disable()
    try:
        with pytest.raises(ValueError, match="upstream broke"):
            await call(StreamingResponse(failing()), FakeServer())
        assert freed.is_set()
    finally:
        gc.enable()


@pytest.mark.parametrize("policy", POLICIES)
async def test_divergence_6_background_after_disconnect_follows_the_policy(policy: BackgroundPolicy) -> None:
    """Policy "always" (default) runs the background task after a disconnect; "completed" does not."""
    log = Log()
    client = FakeServer(leave_after=2)
    response = StreamingResponse(endless("awaiting", log), background=log.task(), background_policy=policy)
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == (["closed", "background"] if policy == "always" else ["closed"])


async def test_divergence_6_completed_policy_runs_background_after_completion() -> None:
    log = Log()
    client = FakeServer()
    response = StreamingResponse(iter([b"a", b"b"]), background=log.task(), background_policy="completed")
    await call(response, client)
    assert response.outcome is Outcome.COMPLETED
    assert client.body == b"ab"
    assert log.events == ["background"]


@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_divergence_6_external_cancellation_closes_and_runs_background_shielded(producer: str) -> None:
    """A cancellation of the whole call (a server shutting down) still closes the iterator and runs the
    background task, even one that awaits, and then propagates."""
    log = Log()
    upstream_waiting = threading.Event()
    release_upstream = threading.Event()
    if producer == "async":
        content: Body = waiting_on_upstream(log)
    else:
        content = blocked_in_next(CHUNK, release_upstream, blocked=upstream_waiting.set, closed=log.closed)
    response = StreamingResponse(content, background=log.task())
    client = FakeServer()
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(response, client.scope(), client.receive, client.send)
            if producer == "sync":
                await anyio.to_thread.run_sync(upstream_waiting.wait, WATCHDOG)
            await anyio.wait_all_tasks_blocked()
            task_group.cancel_scope.cancel()
            if producer == "sync":
                # The abandoned next() returns once the upstream answers; the close happens then.
                release_upstream.set()
    assert response.outcome is Outcome.CANCELLED
    assert log.events == ["closed", "background"]


async def test_divergence_6_cleanup_after_cancellation_is_bounded_by_cleanup_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A close and a background task that never end cannot hold a cancelled call beyond ``cleanup_timeout``
    each; both are logged."""
    caplog.set_level(logging.WARNING, logger="disconnect_responses")
    hung = Log()

    async def stubborn() -> AsyncIterator[bytes]:
        try:
            while True:
                yield CHUNK
        finally:
            hung.append("closing")
            await anyio.sleep_forever()

    async def endless_background() -> None:
        hung.append("background")
        await anyio.sleep_forever()

    response = StreamingResponse(stubborn(), background=BackgroundTask(endless_background))
    response.cleanup_timeout = 0.05
    # The server's send() never returns, so the cancellation lands there, not inside the generator.
    client = FakeServer(block_after=1)
    await call_then_cancel(response, client, when=anyio.wait_all_tasks_blocked)
    assert response.outcome is Outcome.CANCELLED
    assert hung.events == ["closing", "background"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("iterator" in message and "0.05 s" in message for message in warnings), warnings
    assert any("background" in message and "0.05 s" in message for message in warnings), warnings


@pytest.mark.parametrize("producer", SHAPES)
async def test_send_timeout_lets_a_stalled_client_go(producer: str, caplog: pytest.LogCaptureFixture) -> None:
    """A ``send()`` that blocks forever is abandoned after ``send_timeout``; cleanup runs as usual."""
    caplog.set_level(logging.INFO, logger="disconnect_responses")
    log = Log()
    client = FakeServer(block_after=3)
    response = StreamingResponse(endless(producer, log), background=log.task(), send_timeout=0.05)
    await call(response, client)
    assert response.outcome is Outcome.SEND_TIMEOUT
    assert response.bytes_sent == 2 * len(CHUNK)
    assert log.events == ["closed", "background"]
    [line] = stopped_lines(caplog)
    assert f"stopped: send_timeout after {2 * len(CHUNK)} body bytes" in line


def unstarted(log: Log, producer: str) -> Body:
    """An endless producer that records when its body starts running and when its ``finally`` runs."""
    return producer_of(
        "awaiting" if producer == "async" else "sync",
        itertools.repeat(CHUNK),
        log.closed,
        started=functools.partial(log.append, "started"),
    )


@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_disconnect_before_the_response_starts(producer: str) -> None:
    """The client left before the app called the response: the response stops, the iterator ends up closed
    so it can never start later, and the background task runs. (A generator that never started has no
    ``finally`` to run.)"""
    log = Log()
    content = unstarted(log, producer)
    client = FakeServer()
    client.leave()
    response = StreamingResponse(content, background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events in (["background"], ["started", "closed", "background"])
    await assert_exhausted(content)


@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_disconnect_during_the_headers_send_never_starts_the_producer(producer: str) -> None:
    """The disconnect is heard while the server's ``send()`` of the headers is in progress: the producer is
    never pulled, so a generator that would acquire upstream resources never starts."""
    log = Log()
    content = unstarted(log, producer)
    client = FakeServer()
    client.leave()

    async def slow_send(message: Message) -> None:
        # The server's send() of the headers returns only once the listener heard the disconnect.
        await client.disconnect_delivered.wait()
        await client.send(message)

    response = StreamingResponse(content, background=log.task())
    with anyio.fail_after(WATCHDOG):
        await response(client.scope(), client.receive, slow_send)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["background"]
    await assert_exhausted(content)


async def test_http_request_messages_before_the_disconnect_are_skipped() -> None:
    log = Log()
    requests: list[Message] = [
        {"type": "http.request", "body": b"part", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": False},
    ]
    client = FakeServer(leave_after=2, requests=requests)
    response = StreamingResponse(endless("awaiting", log), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert client.receive_calls == 3
    assert log.events == ["closed", "background"]


async def test_websocket_denial_response() -> None:
    """Denying a websocket with a streamed response sends the ``websocket.http.*`` messages, no listener."""
    log = Log()
    client = FakeServer()
    response = StreamingResponse(iter([b"denied"]), status_code=403, background=log.task())
    await call(response, client, client.scope("websocket"))
    assert [message["type"] for message in client.messages] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
        "websocket.http.response.body",
    ]
    assert client.messages[0]["status"] == 403
    assert client.body == b"denied"
    assert client.receive_calls == 0
    assert response.outcome is Outcome.COMPLETED
    assert log.events == ["background"]


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_completed_run(spec_version: str | None, producer: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="disconnect_responses")
    log = Log()
    shape = "never-awaiting" if producer == "async" else "sync"
    content = producer_of(shape, [b"one", b"two", b"three"], log.closed)
    client = FakeServer(spec_version)
    response = StreamingResponse(content, background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.COMPLETED
    assert response.bytes_sent == len(b"onetwothree")
    assert client.body == b"onetwothree"
    assert log.events == ["closed", "background"]
    assert stopped_lines(caplog) == []


class ClosableIterator:
    """A sync iterator object (not a generator) with a ``close()`` that records its calls and thread."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = iter(chunks)
        self.closes: list[str] = []

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.chunks)

    def close(self) -> None:
        self.closes.append(threading.current_thread().name)


class AsyncClosableIterator:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = iter(chunks)
        self.acloses = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self.chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.acloses += 1


@pytest.mark.parametrize("leave", [False, True])
async def test_divergence_4_iterator_objects_are_closed_once_in_a_worker_thread(leave: bool) -> None:
    """A sync iterator's ``close()`` runs once, off the event loop thread, on completion and on disconnect.

    Starlette never closes a sync iterator."""
    iterator = ClosableIterator([CHUNK] * (1000 if leave else 10))
    client = FakeServer(leave_after=2 if leave else None)
    response = StreamingResponse(iterator)
    await call(response, client)
    assert response.outcome is (Outcome.DISCONNECTED if leave else Outcome.COMPLETED)
    assert len(iterator.closes) == 1
    assert iterator.closes[0] != threading.current_thread().name


@pytest.mark.parametrize("leave", [False, True])
async def test_divergence_4_async_iterator_objects_get_aclose(leave: bool) -> None:
    iterator = AsyncClosableIterator([CHUNK] * (1000 if leave else 10))
    client = FakeServer(leave_after=2 if leave else None)
    response = StreamingResponse(iterator)
    await call(response, client)
    assert response.outcome is (Outcome.DISCONNECTED if leave else Outcome.COMPLETED)
    assert iterator.acloses == 1


async def test_divergence_5_a_blocked_next_is_abandoned_and_closed_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync ``next()`` stuck on its upstream holds the call at most ``cleanup_timeout``; the iterator is
    closed in that worker thread as soon as ``next()`` returns."""
    caplog.set_level(logging.WARNING, logger="disconnect_responses")
    log = Log()
    in_next = threading.Event()
    release = threading.Event()
    closed = threading.Event()

    def close() -> None:
        log.closed()
        closed.set()

    client = FakeServer()
    response = StreamingResponse(
        blocked_in_next(CHUNK, release, blocked=in_next.set, closed=close), background=log.task()
    )
    response.cleanup_timeout = 0.05
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(response, client.scope(), client.receive, client.send)
            await anyio.to_thread.run_sync(in_next.wait, WATCHDOG)
            client.leave()
        assert response.outcome is Outcome.DISCONNECTED
        assert log.events == ["background"]
        release.set()
        assert await anyio.to_thread.run_sync(closed.wait, WATCHDOG)
    assert log.events == ["background", "closed"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("iterator" in message and "0.05 s" in message for message in warnings), warnings


def interrupted_at_an_upstream_await(
    log: Log, waiting: Callable[[], object], cleanup: Callable[[], Awaitable[None]]
) -> StreamingResponse:
    """A response whose producer yields one chunk, then calls ``waiting`` (the client leaves, say) as it
    waits for an upstream that never answers; its ``finally`` runs ``cleanup``, between two log entries."""

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            waiting()
            await anyio.sleep_forever()
        finally:
            log.append("cleanup started")
            await cleanup()
            log.append("cleanup finished")

    return StreamingResponse(produce(), background=log.task())


async def awaits_twice() -> None:
    # Under a level-triggered cancellation the first of these would already raise.
    await anyio.lowlevel.checkpoint()
    await anyio.sleep(0.01)


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
async def test_divergence_14_cleanup_interrupted_at_an_upstream_await_can_await(spec_version: str | None) -> None:
    """The cancellation lands where the producer waits for its upstream; its cleanup there (a
    ``finally``, an ``__aexit__``) then awaits to its end, before the background task."""
    log = Log()
    client = FakeServer(spec_version)
    response = interrupted_at_an_upstream_await(log, client.leave, awaits_twice)
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["cleanup started", "cleanup finished", "background"]


async def test_divergence_14_cleanup_that_never_ends_is_bounded_by_cleanup_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cleanup that waits forever is cancelled after ``cleanup_timeout``, with a warning; the background
    task still runs."""
    caplog.set_level(logging.WARNING, logger="disconnect_responses")
    log = Log()
    client = FakeServer()
    response = interrupted_at_an_upstream_await(log, client.leave, anyio.sleep_forever)
    response.cleanup_timeout = 0.05
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["cleanup started", "background"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["Gave up waiting for the body iterator's cleanup after 0.05 s"]


async def test_divergence_14_a_producers_own_timeout_leaves_it_cancellable() -> None:
    """A timeout inside the producer cancels only what it wraps: a later disconnect still stops the
    producer at once, not after ``cleanup_timeout``."""
    log = Log()
    client = FakeServer()

    async def produce() -> AsyncIterator[bytes]:
        try:
            with anyio.move_on_after(0.01):
                await anyio.sleep_forever()
            yield CHUNK
            client.leave()
            await anyio.sleep_forever()
        finally:
            log.closed()

    await assert_stops_promptly(produce(), log, client)
    assert log.events == ["closed", "background"]


class Departing(FakeServer):
    """Also tells worker threads when the disconnect has been handed to the listener, which stops the
    response before the loop runs anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.departed = threading.Event()

    async def receive(self) -> Message:
        message = await super().receive()
        if message["type"] == "http.disconnect":
            self.departed.set()
        return message


@pytest.mark.parametrize("where", ["worker-thread", "shielded"])
async def test_divergence_14_a_producer_that_cannot_take_the_stop_takes_it_at_its_next_await(where: str) -> None:
    """The stop comes while the producer waits where no cancellation reaches (a worker thread that is
    not abandoned, a shielded scope): it resumes without it, so nothing is shielded, and the stop lands
    at its next await, not after ``cleanup_timeout``."""
    log = Log()
    client = Departing()

    def leave_and_wait() -> None:
        anyio.from_thread.run_sync(client.leave)
        assert client.departed.wait(WATCHDOG)

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            if where == "worker-thread":
                await anyio.to_thread.run_sync(leave_and_wait)
            else:
                with anyio.CancelScope(shield=True):
                    client.leave()
                    await stopping().wait()
            log.append("resumed")
            await anyio.sleep_forever()
        finally:
            log.closed()

    await assert_stops_promptly(produce(), log, client)
    assert log.events == ["resumed", "closed", "background"]


async def test_divergence_14_a_busy_producer_is_cancelled_at_its_next_checkpoint() -> None:
    """A producer that computes between checkpoints, rather than waiting, when the stop comes takes it at
    its next checkpoint (on trio through a scope of trio's own), not after ``cleanup_timeout``."""
    log = Log()
    client = FakeServer()

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            client.leave()
            while True:
                await anyio.lowlevel.checkpoint()
        finally:
            log.closed()

    await assert_stops_promptly(produce(), log, client)
    assert log.events == ["closed", "background"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
@pytest.mark.usefixtures("asyncio_only")
async def test_divergence_14_an_asyncio_timeout_is_not_taken_for_the_stop() -> None:
    """asyncio's own timeouts cancel natively: one that fires after the stop, while the producer sat where
    the stop could not reach it, is not the stop's cancellation, so nothing is shielded, and the stop
    lands at the producer's next await."""
    log = Log()
    client = FakeServer()

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            try:
                async with asyncio.timeout(None) as own_timeout:  # type: ignore[attr-defined,unused-ignore]
                    with anyio.CancelScope(shield=True):
                        client.leave()
                        await stopping().wait()
                        own_timeout.reschedule(asyncio.get_running_loop().time())
                        await anyio.sleep_forever()
            except TimeoutError:
                log.append("own timeout")
            await anyio.sleep_forever()
        finally:
            log.closed()

    await assert_stops_promptly(produce(), log, client)
    assert log.events == ["own timeout", "closed", "background"]


@pytest.mark.usefixtures("asyncio_only")
async def test_divergence_14_a_native_cancellation_of_the_request_shields_the_cleanup_too() -> None:
    """A server cancelling the request's task natively (asyncio's ``task.cancel()``, as hypercorn and
    ``asyncio.run`` do) while the producer waits for its upstream: the producer's cleanup awaits to its
    end, the background task runs, and the cancellation still reaches the server."""
    log = Log()
    client = FakeServer()
    waiting = anyio.Event()
    response = interrupted_at_an_upstream_await(log, waiting.set, awaits_twice)
    with anyio.fail_after(WATCHDOG):
        task = asyncio.ensure_future(response(client.scope(), client.receive, client.send))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert response.outcome is Outcome.CANCELLED
    assert log.events == ["cleanup started", "cleanup finished", "background"]


async def test_divergence_14_a_cancelled_scope_around_the_response_shields_the_cleanup_too(anyio_backend: str) -> None:
    """A server cancelling a scope around the response (hypercorn on trio cancels its request nursery)
    while the producer waits for its upstream: the cancellation may reach the body before the listener,
    and either way the producer's cleanup awaits to its end and the background task runs."""
    for _ in range(20 if anyio_backend == "trio" else 1):  # which task trio wakes first varies
        log = Log()
        client = FakeServer()
        waiting = anyio.Event()
        response = interrupted_at_an_upstream_await(log, waiting.set, awaits_twice)
        await call_then_cancel(response, client, when=waiting.wait)
        assert response.outcome is Outcome.CANCELLED
        assert log.events == ["cleanup started", "cleanup finished", "background"]


async def test_a_cancelled_scope_around_the_response_sets_stopping_for_a_producer_out_of_its_reach() -> None:
    """The server cancels a scope around the response while the producer waits in a worker thread,
    where no cancellation reaches: ``stopping()`` is set all the same, which lets the producer stop
    (here a watcher outside the server releases the thread when it is set)."""
    stops: list[anyio.Event] = []
    waiting = anyio.Event()
    released = threading.Event()

    def blocked_upstream() -> None:
        anyio.from_thread.run_sync(waiting.set)
        released.wait(WATCHDOG)

    async def produce() -> AsyncIterator[bytes]:
        stops.append(stopping())
        yield CHUNK
        await anyio.to_thread.run_sync(blocked_upstream)

    async def release_when_stopping() -> None:
        await waiting.wait()
        await stops[0].wait()
        released.set()

    client = FakeServer()
    response = StreamingResponse(produce())
    with anyio.fail_after(WATCHDOG * 2):
        async with anyio.create_task_group() as test:
            test.start_soon(release_when_stopping)
            async with anyio.create_task_group() as server:
                server.start_soon(response, client.scope(), client.receive, client.send)
                await waiting.wait()
                server.cancel_scope.cancel()
    assert released.is_set()
    assert response.outcome is Outcome.CANCELLED


@pytest.mark.usefixtures("asyncio_only")
async def test_a_cancellation_raised_by_the_producer_itself_ends_the_response() -> None:
    """A producer that awaits a task someone else cancelled raises a ``CancelledError`` that no scope sent:
    the response ends as after an outside cancellation, quietly, instead of waiting for the client."""
    log = Log()
    client = FakeServer()

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            upstream = asyncio.ensure_future(anyio.sleep_forever())
            upstream.cancel()
            await upstream
        finally:
            log.closed()

    response = StreamingResponse(produce(), background=log.task())
    await call(response, client)
    assert response.outcome is Outcome.CANCELLED
    assert log.events == ["closed", "background"]


async def test_divergence_14_the_producers_own_timeout_firing_with_the_stop_does_not_hide_it() -> None:
    """The producer's own scope is cancelled in the same moment as the stop: the stop is not lost in that
    scope, and the producer ends at once, not after ``cleanup_timeout`` (AnyIO 4.1 on Python 3.10 lets
    the scope catch the first cancellation; the stop then lands at the next await)."""
    log = Log()
    own_timeout = anyio.CancelScope()

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            with own_timeout:
                await anyio.sleep_forever()
            log.append("own timeout passed")
            await anyio.sleep_forever()
        finally:
            log.closed()

    class TimeoutWithTheDisconnect(FakeServer):
        async def receive(self) -> Message:
            message = await super().receive()
            own_timeout.cancel()
            return message

    client = TimeoutWithTheDisconnect(leave_after=1)
    await assert_stops_promptly(produce(), log, client)
    assert log.events[-2:] == ["closed", "background"]


async def test_divergence_14_a_producers_own_task_group_is_cancelled_too() -> None:
    """A producer waiting inside a task group of its own: its child tasks are cancelled with it, at once."""
    log = Log()
    client = FakeServer()

    async def child() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            log.append("child cancelled")

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(child)
                task_group.start_soon(child)
                await anyio.wait_all_tasks_blocked()
                client.leave()
                await anyio.sleep_forever()
        finally:
            log.closed()

    await assert_stops_promptly(produce(), log, client)
    assert log.events == ["child cancelled", "child cancelled", "closed", "background"]


async def test_divergence_14_a_stop_that_lands_in_the_servers_send_is_the_servers() -> None:
    """Only the producer's cleanup is shielded: a stop that lands while the server's ``send()`` waits
    (for a client that stopped reading, then left) cuts the server's own cleanup there at its first
    await, as under Starlette."""
    log = Log()
    client = FakeServer()

    async def stalled_send(message: Message) -> None:
        await client.send(message)
        if message["type"] == "http.response.body":
            try:
                client.leave()
                await anyio.sleep_forever()
            finally:
                log.append("send cleanup started")
                await anyio.lowlevel.checkpoint()
                log.append("send cleanup finished")

    response = StreamingResponse(iter([CHUNK]), background=log.task())
    response.cleanup_timeout = WATCHDOG * 10
    with anyio.fail_after(WATCHDOG):
        await response(client.scope(), client.receive, stalled_send)
    assert response.outcome is Outcome.DISCONNECTED
    assert log.events == ["send cleanup started", "background"]


async def test_divergence_7_new_options_and_attributes() -> None:
    response = StreamingResponse(iter([b"a"]))
    assert response.send_timeout is None
    assert response.background_policy == "always"
    assert response.cleanup_timeout == 5.0
    assert response.outcome is None
    assert response.bytes_sent == 0
    await call(response, FakeServer())
    assert response.outcome is Outcome.COMPLETED
    assert response.bytes_sent == 1


async def test_stopping_is_set_when_the_stream_ends_async_producer() -> None:
    """Inside an async producer ``stopping()`` is the response's event: unset while streaming, set
    before the iterator is closed; outside any body it raises ``LookupError``."""
    seen: list[bool] = []

    async def producer() -> AsyncIterator[bytes]:
        event = stopping()
        seen.append(event.is_set())
        try:
            yield CHUNK
            await anyio.sleep_forever()
        finally:
            seen.append(event.is_set())

    client = FakeServer(leave_after=1)
    response = StreamingResponse(producer())
    await call(response, client)
    assert seen == [False, True]
    with pytest.raises(LookupError):
        stopping()


async def test_stopping_lets_a_sync_producer_stop_its_upstream() -> None:
    """A sync producer waits in its worker thread on ``stopping()`` (its upstream) and learns the client left."""
    seen: list[str] = []

    def producer() -> Iterator[bytes]:
        event = stopping()
        seen.append(f"set={event.is_set()}")
        yield CHUNK
        # The client leaves while this next() runs, in a worker thread, waiting on its "upstream".
        anyio.from_thread.run_sync(client.leave)
        anyio.from_thread.run(event.wait)
        seen.append("upstream stopped")
        yield CHUNK

    client = FakeServer()
    response = StreamingResponse(producer())
    await call(response, client)
    assert response.outcome is Outcome.DISCONNECTED
    assert seen == ["set=False", "upstream stopped"]
    with pytest.raises(LookupError):
        stopping()


@pytest.mark.parametrize("producer", ["async", "sync"])
async def test_stopping_is_available_in_the_producers_finally(producer: str) -> None:
    """A producer's ``finally`` is inside its body, so ``stopping()`` answers there too, and is set."""
    seen: list[object] = []

    def look() -> None:
        try:
            seen.append(stopping().is_set())
        except LookupError as exc:
            seen.append(exc)

    # The server's send() blocks, so the producer sits at a yield when the send timeout stops it.
    client = FakeServer(block_after=1)
    content = producer_of("never-awaiting" if producer == "async" else "sync", itertools.repeat(CHUNK), look)
    response = StreamingResponse(content, send_timeout=0.05)
    await call(response, client)
    assert response.outcome is Outcome.SEND_TIMEOUT
    assert seen == [True]


@pytest.mark.parametrize(
    ("returns", "declared", "outcome"),
    [
        pytest.param(True, False, Outcome.COMPLETED, id="last-send-returns"),
        pytest.param(False, False, Outcome.DISCONNECTED, id="last-send-held"),
        pytest.param(False, True, Outcome.COMPLETED, id="declared-length-out-then-last-send-held"),
    ],
)
async def test_divergence_2_the_last_send_gets_cleanup_timeout_after_a_disconnect(
    returns: bool, declared: bool, outcome: Outcome
) -> None:
    """The client leaves while the server holds the last message (or, with a content-length, once
    every declared byte is out, before the last message). A server whose disconnect just ends the
    response returns from that send: COMPLETED. One that never returns (hypercorn over HTTP/2
    after a stream reset) is let go after ``cleanup_timeout``, as Starlette's listener would cancel
    it: DISCONNECTED, or COMPLETED if every declared byte was out. The background task runs once."""
    release = anyio.Event()
    ran: list[str] = []

    async def hold_the_last(server: FakeServer, message: Message) -> None:
        if declared and message.get("body") == b"last":
            server.leave()
        if not message.get("more_body", False):
            if not declared:
                server.leave()
            await server.disconnect_delivered.wait()
            if returns:
                return
            await release.wait()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"last"

    headers = {"content-length": "9"} if declared else None
    response = StreamingResponse(body(), headers=headers, background=BackgroundTask(lambda: ran.append("background")))
    response.cleanup_timeout = WATCHDOG * 10 if returns else 0.05
    server = FakeServer(on_body=hold_the_last)
    await call(response, server)
    assert response.outcome is outcome
    assert ran == ["background"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 keeps no count of cancellation requests")
@pytest.mark.usefixtures("asyncio_only")
async def test_a_native_cancellation_landing_as_the_body_ends_still_reaches_the_server() -> None:
    """On asyncio the body's end wakes the listener with a native cancellation that the race withdraws;
    a server's own ``task.cancel()`` in the same turn is not withdrawn with it: the body completed, and
    the cancellation reaches the server."""
    client = FakeServer()
    tasks: list[asyncio.Future[None]] = []

    async def send(message: Message) -> None:
        await client.send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            tasks[0].cancel()

    async def produce() -> AsyncIterator[bytes]:
        yield CHUNK

    response = StreamingResponse(produce())
    with anyio.fail_after(WATCHDOG):
        tasks.append(asyncio.ensure_future(response(client.scope(), client.receive, send)))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
    assert response.outcome is Outcome.COMPLETED
    assert client.body == CHUNK


async def test_a_receive_that_swallows_the_listener_s_cancellation_does_not_hang_the_response() -> None:
    """A server (or a middleware) whose ``receive()`` answers a cancellation with a message instead of
    raising it: the listener sees that the race was decided and returns."""
    client = FakeServer()

    async def receive() -> Message:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return {"type": "http.request", "body": b"", "more_body": False}
        raise AssertionError("unreachable")

    async def produce() -> AsyncIterator[bytes]:
        await anyio.lowlevel.checkpoint()
        yield CHUNK

    response = StreamingResponse(produce())
    with anyio.fail_after(WATCHDOG):
        await response(client.scope(), receive, client.send)
    assert response.outcome is Outcome.COMPLETED
    assert client.body == CHUNK
    assert_no_cancellation_left()


def assert_no_cancellation_left(carried: int = 0) -> None:
    """On asyncio (3.11+), the race's wake-up of the server's task was withdrawn."""
    with contextlib.suppress(RuntimeError):  # not on asyncio
        task = asyncio.current_task()
        if task is not None and sys.version_info >= (3, 11):
            assert task.cancelling() == carried


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 keeps no count of cancellation requests")
@pytest.mark.usefixtures("asyncio_only")
async def test_a_cancellation_the_server_s_task_carries_in_is_not_taken_for_the_wake_up() -> None:
    """Earlier code in the server's task swallowed a cancellation without withdrawing it: the
    response still completes and returns, and leaves the count as it found it."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(WATCHDOG)
    client = FakeServer()

    async def produce() -> AsyncIterator[bytes]:
        await anyio.lowlevel.checkpoint()
        yield CHUNK

    response = StreamingResponse(produce())
    try:
        with anyio.CancelScope(), anyio.fail_after(WATCHDOG):
            await response(client.scope(), client.receive, client.send)
        assert response.outcome is Outcome.COMPLETED
        assert client.body == CHUNK
        assert_no_cancellation_left(carried=1)
    finally:
        task.uncancel()  # type: ignore[attr-defined,unused-ignore]


class Abort(BaseException):
    """Neither an ``Exception`` nor a cancellation."""


def holds_abort(exc: BaseException) -> bool:
    return isinstance(exc, Abort) or any(holds_abort(inner) for inner in getattr(exc, "exceptions", ()))


@pytest.mark.parametrize("raised_by", ["receive", "body"])
async def test_a_base_exception_stops_the_response_and_propagates(raised_by: str) -> None:
    """A ``BaseException`` from the server's ``receive()`` or from the producer stops the response
    (``CANCELLED``), closes the producer and propagates; nothing is left running."""
    log = Log()
    client = FakeServer()
    producing = anyio.Event()

    async def receive() -> Message:
        if raised_by == "receive":
            await producing.wait()
            raise Abort
        return await client.receive()

    async def produce() -> AsyncIterator[bytes]:
        try:
            yield CHUNK
            producing.set()
            if raised_by == "body":
                raise Abort
            await anyio.sleep_forever()
        finally:
            log.closed()

    response = StreamingResponse(produce(), background=log.task())
    with anyio.fail_after(WATCHDOG):
        with pytest.raises(BaseException) as raised:
            await response(client.scope(), receive, client.send)
    assert holds_abort(raised.value)  # bare, or in a group (from the task group on trio)
    assert response.outcome is Outcome.CANCELLED
    assert log.events == ["closed", "background"]
    assert_no_cancellation_left()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in Python 3.12")
@pytest.mark.usefixtures("asyncio_only")
async def test_an_eager_task_factory_that_runs_the_whole_body_at_once() -> None:
    """Under an eager task factory the body's task runs its first step as it is created, before the
    listener listens; a body that ends there ends the response."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
    try:
        client = FakeServer()

        async def produce() -> AsyncIterator[bytes]:
            yield CHUNK

        response = StreamingResponse(produce())
        with anyio.fail_after(WATCHDOG):
            await response(client.scope(), client.receive, client.send)
    finally:
        loop.set_task_factory(previous)
    assert response.outcome is Outcome.COMPLETED
    assert client.body == CHUNK
