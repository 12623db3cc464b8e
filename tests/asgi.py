"""What the tests build their apps from and check them with: a fake server for raw ASGI calls, the
producer shapes, and the assertions on what an app recorded.

Shared by the test modules; ``tests/servers.py`` holds the real servers, the clients and the
``Recorder``.

Raw ASGI
    ``FakeServer``: one connection's ``receive`` and ``send``, as a server drives them (its docstring
    says the ways its client can leave). ``call(app, server, scope=None)``: one call, bounded by
    ``WATCHDOG``; the client leaves once it returned. ``call_then_cancel(app, server, when)``: the
    call, cancelled from outside once ``when()`` returned. ``messages_of(app, scope)``: what ``app``
    sends to a server whose client stays. ``noting_disconnect(receive, note)``: ``receive``, telling
    ``note`` of each ``http.disconnect`` it returns.

Producers
    ``producer_of(shape, chunks, closed, started=None, error=None)``: a generator of one of ``SHAPES``.
    ``blocked_in_next(chunk, release, blocked=, closed=)``: a sync generator whose second ``next()``
    blocks its worker thread.
    ``assert_exhausted(content)``: a closed generator can never start later.

What an app recorded (the names the apps in these tests record in a ``Recorder``)
    ``run_recorded(response, recorder, scope, receive, send)``: runs a response inside an app, and
    records "app raised" and "response".
    ``finished(recorder, timeout=WAIT, background=False)``: the one response recorded as "response".
    ``assert_closed_then_background(recorder, closed="iterator closed", background=True)``.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Final

import anyio
import anyio.lowlevel
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disconnect_responses import FileResponse, StreamingResponse

from .servers import Recorder, http_scope

# A raw ASGI call ends in milliseconds; this bound only turns a hang into a failure.
WATCHDOG: Final = 5.0
# How long a test waits for what an app on a real server records.
WAIT: Final = 10.0
SHAPES: Final = ("awaiting", "never-awaiting", "sync")

Body = AsyncIterator[bytes] | Iterator[bytes]


# ---------------------------------------------------------------------------------------------
# Raw ASGI


class FakeServer:
    """One connection's ``receive`` and ``send``, driven as a server would drive them.

    ``receive()`` returns the queued ``requests`` first, then waits until the client ``leave()``s and
    returns ``http.disconnect``; with ``silent`` it never does (a server that has not noticed yet).
    ``send()`` records the messages it takes in ``messages``. Once the client has gone, a spec 2.4
    server refuses every message with ``OSError`` (recorded in ``refused``, not in ``messages``).
    ``send_error`` is raised instead of taking a body message. The client leaves once ``leave_after``
    body chunks (body messages with more to come) were taken, and ``send()`` blocks forever on the
    ``block_after``-th, as for a client that stopped reading. ``on_body`` runs after each body
    message taken, to leave, stall, raise or change the file at a chosen point.
    """

    def __init__(
        self,
        spec_version: str | None = "2.3",
        *,
        leave_after: int | None = None,
        requests: Sequence[Message] = (),
        block_after: int | None = None,
        send_error: Exception | None = None,
        silent: bool = False,
        on_body: Callable[[FakeServer, Message], Awaitable[None]] | None = None,
    ) -> None:
        self.spec_version = spec_version
        self.leave_after = leave_after
        self.block_after = block_after
        self.send_error = send_error
        self.silent = silent
        self.on_body = on_body
        self.requests = list(requests)
        self.gone = anyio.Event()
        self.receive_calls = 0
        self.disconnect_received = False
        self.disconnect_delivered = anyio.Event()
        self.messages: list[Message] = []
        self.refused: list[Message] = []
        self.body_chunks = 0
        self.bytes_after_leaving = 0
        self.sent_after_disconnect_received: list[Message] = []

    def scope(self, type: str = "http") -> Scope:
        return {**http_scope(spec_version=self.spec_version, path="/stream"), "type": type}

    def leave(self) -> None:
        self.gone.set()

    async def receive(self) -> Message:
        self.receive_calls += 1
        if self.requests:
            return self.requests.pop(0)
        await self.gone.wait()
        if self.silent:
            await anyio.sleep_forever()
        self.disconnect_received = True
        self.disconnect_delivered.set()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone.is_set() and self.spec_version == "2.4":
            self.refused.append(message)
            raise OSError(errno.EPIPE, "Broken pipe")
        if self.send_error is not None and message["type"] == "http.response.body":
            raise self.send_error
        if self.disconnect_received:
            self.sent_after_disconnect_received.append(message)
        if self.gone.is_set():
            self.bytes_after_leaving += len(message.get("body", b""))
        self.messages.append(message)
        if message["type"] != "http.response.body":
            return
        if message.get("more_body", False):
            self.body_chunks += 1
            if self.body_chunks == self.leave_after:
                self.leave()
            if self.body_chunks == self.block_after:
                await anyio.sleep_forever()
        if self.on_body is not None:
            await self.on_body(self, message)

    @property
    def body(self) -> bytes:
        return b"".join(bytes(message.get("body", b"")) for message in self.messages)

    @property
    def body_messages(self) -> list[Message]:
        return [message for message in self.messages if message["type"] == "http.response.body"]


async def call(app: ASGIApp, server: FakeServer, scope: Scope | None = None) -> None:
    """Call ``app`` once with ``server`` (and its own scope unless given one), bounded by ``WATCHDOG``;
    the client leaves once the call returned."""
    with anyio.fail_after(WATCHDOG):
        await app(server.scope() if scope is None else scope, server.receive, server.send)
    server.leave()


async def call_then_cancel(
    app: ASGIApp, server: FakeServer, when: Callable[[], Awaitable[object]], scope: Scope | None = None
) -> None:
    """Call ``app`` as a server that shuts down does: in a task group that it cancels once ``when()``
    returned; bounded by ``WATCHDOG``."""

    async def serve() -> None:
        await app(server.scope() if scope is None else scope, server.receive, server.send)

    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(serve)
            await when()
            task_group.cancel_scope.cancel()


async def messages_of(app: ASGIApp, scope: Scope) -> list[Message]:
    """The messages ``app`` sends to a server whose client stays until the call is over."""
    server = FakeServer()
    await call(app, server, scope)
    return server.messages


def noting_disconnect(receive: Receive, note: Callable[[], object]) -> Receive:
    """``receive``, calling ``note`` each time it returns ``http.disconnect``."""

    async def noting() -> Message:
        message = await receive()
        if message["type"] == "http.disconnect":
            note()
        return message

    return noting


# ---------------------------------------------------------------------------------------------
# Producers


def producer_of(
    shape: str,
    chunks: Iterable[bytes],
    closed: Callable[[], object],
    *,
    started: Callable[[], object] | None = None,
    error: Exception | None = None,
) -> Body:
    """A generator that yields ``chunks``, then raises ``error`` if there is one, in one of ``SHAPES``:
    "awaiting" (async, a checkpoint before each chunk), "never-awaiting" (async, no await of its own:
    only the response can give the event loop a turn) or "sync" (pulled in worker threads).

    ``started`` is called as its body starts, outside the ``try``: a generator closed before it
    started calls neither. ``closed`` is called in its ``finally``."""

    async def awaiting() -> AsyncIterator[bytes]:
        if started is not None:
            started()
        try:
            for chunk in chunks:
                await anyio.lowlevel.checkpoint()
                yield chunk
            if error is not None:
                raise error
        finally:
            closed()

    async def never_awaiting() -> AsyncIterator[bytes]:
        if started is not None:
            started()
        try:
            for chunk in chunks:
                yield chunk
            if error is not None:
                raise error
        finally:
            closed()

    def sync() -> Iterator[bytes]:
        if started is not None:
            started()
        try:
            yield from chunks
            if error is not None:
                raise error
        finally:
            closed()

    shapes: dict[str, Callable[[], Body]] = {"awaiting": awaiting, "never-awaiting": never_awaiting, "sync": sync}
    return shapes[shape]()


def blocked_in_next(
    chunk: bytes, release: threading.Event, *, blocked: Callable[[], object], closed: Callable[[], object]
) -> Iterator[bytes]:
    """Yields ``chunk``; the next ``next()`` calls ``blocked`` and then blocks its worker thread, as a
    read from an upstream that does not answer does, until ``release`` is set (at most ``WAIT``);
    then yields ``chunk`` again. ``closed`` is called in its ``finally``, in that worker thread."""
    try:
        yield chunk
        blocked()
        release.wait(WAIT)
        yield chunk
    finally:
        closed()


async def assert_exhausted(content: Body) -> None:
    """A closed generator can never start later: the next pull ends it at once."""
    if isinstance(content, AsyncIterator):
        with pytest.raises(StopAsyncIteration):
            await content.__anext__()
    else:
        with pytest.raises(StopIteration):
            next(content)


# ---------------------------------------------------------------------------------------------
# What an app recorded


async def run_recorded(
    response: StreamingResponse | FileResponse, recorder: Recorder, scope: Scope, receive: Receive, send: Send
) -> None:
    """Runs ``response`` in an app: records "app raised" with what it raised, then, however it ended,
    "response" with the response itself (the last thing recorded, so ``finished`` returns once the
    call is over)."""
    try:
        await response(scope, receive, send)
    except Exception as exc:
        recorder.record("app raised", exc)
        raise
    finally:
        recorder.record("response", response)


def finished(recorder: Recorder, timeout: float = WAIT, background: bool = False) -> StreamingResponse | FileResponse:
    """The one response the app recorded as "response", once it has (and, with ``background``, once
    "background ran" was recorded too), each wait bounded by ``timeout``."""
    recorder.wait_for("response", timeout=timeout)
    if background:
        recorder.wait_for("background ran", timeout=timeout)
    [response] = recorder.values("response")
    assert isinstance(response, StreamingResponse | FileResponse)
    return response


def assert_closed_then_background(recorder: Recorder, closed: str = "iterator closed", background: bool = True) -> None:
    """``closed`` (the iterator's ``finally``, or the file's close) was recorded once; and the
    background task ran exactly once, after it, or with ``background=False``, never."""
    names = recorder.names()
    assert names.count(closed) == 1, names
    if background:
        assert names.count("background ran") == 1, names
        assert names.index(closed) < names.index("background ran"), names
    else:
        assert names.count("background ran") == 0, names
