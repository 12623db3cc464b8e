"""The race between a response body and the client's departure, and the cleanup after it.

Private: the response classes in ``responses.py`` are the public face. One ``Race`` lives for one
call of a response and is handed what it needs: ``Race.respond`` runs the body with the race's
guarded ``send`` in a child task, as Starlette does, while the calling task listens for
``http.disconnect``; a watchdog on slow sends and the shutdown watch (``_shutdown.py``) run beside
them when asked. On asyncio, with nothing beside the body, the child is a plain asyncio task
(``_race_in_tasks``): an AnyIO task group costs more than the rest of a small response. Whatever
ends first calls ``stop(outcome)``: the body is cancelled where it waits and ``stopping()`` is set.
Then the race closes the body's source and runs the background task (shielded where needed,
``_cancel.py``). Changes when how a response ends changes.

One stop, four names: ``Race.stop(outcome)`` decides the race (the first outcome wins) and
cancels the body; ``Race.stopped`` says it was decided; ``Race.stopping()``, and the public
``stopping()`` for the body in this context, is the event a producer can wait on; ``_Stopped`` is
raised by the guarded ``send`` to unwind a body that tries to send after the stop. The one place
where a server's ``send()`` errors become a stop is ``Race.send`` (divergence 2).

Pinned assumption (``tests/test_assumptions.py``), checked on Starlette 0.40 and 1.10:

R1. Starlette's ``StreamingResponse.stream_response(send)`` is a coroutine that sends the start,
    each item and an empty last message, which ``Race.drive`` steps through.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextvars import ContextVar
from typing import Any, Literal, Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from ._cancel import (
    asyncio_checkpoint,
    asyncio_scope,
    cancelling,
    current_asyncio_task,
    logging_errors,
    retrieve,
    scope_like,
    shielded,
    takes_stop,
    uncancel,
    wait_for_task,
)
from ._shutdown import shutdown_watch
from ._starlette import websocket_denial_send

logger = logging.getLogger("disconnect_responses")

BackgroundPolicy = Literal["always", "completed"]

# A producer that never awaits, behind a server whose send() returns without yielding (uvicorn,
# hypercorn), would never let the disconnect listener run. The guarded send gives the event loop a
# turn once this many body bytes went out since the last one (a streamed body's own waits count:
# Race.drive sees them). A turn costs about 4 us: once per
# 64 KiB chunk that is a fifth of in-memory throughput, once per 512 KiB about 3%, for a few
# hundred KiB more pushed into a socket whose client has just closed (none once the server said so).
YIELD_EVERY_BYTES = 512 * 1024

# What a server's send() raises once the client has gone: OSError on ASGI 2.4, ClientDisconnect
# from a Starlette layer in between.
CLIENT_GONE = (OSError, ClientDisconnect)


class Outcome(str, enum.Enum):
    """How a response's body ended; ``response.outcome`` holds it once the call has returned."""

    COMPLETED = "completed"
    """Every body byte was handed to the server."""
    DISCONNECTED = "disconnected"
    """The client went away: ``http.disconnect`` arrived, or ``send()`` raised ``OSError``."""
    SEND_TIMEOUT = "send_timeout"
    """One ``send()`` blocked longer than ``send_timeout``: the client stopped reading."""
    SHUTDOWN = "shutdown"
    """The server is shutting down, and this open-ended stream did not end within its shutdown grace."""
    CANCELLED = "cancelled"
    """The task running the response was cancelled from outside."""
    ERROR = "error"
    """The body raised; the exception is re-raised after the cleanup."""
    TRUNCATED = "truncated"
    """The body's source ended early (a file shrank while it was sent): the response was cut short."""


_current_race: ContextVar[Race] = ContextVar("disconnect_responses.race")
# Told of each response as its call starts, by disconnect_responses.testing, which reads its
# outcome once the app has returned.
observer: ContextVar[Callable[[Guarded], None] | None] = ContextVar("disconnect_responses.observer", default=None)


def stopping() -> anyio.Event:
    """Return the event that is set when the response streaming the current body is ending.

    Call it inside a body iterator (async or sync) of a ``disconnect_responses`` response. The event
    is set as soon as the client has gone, a send timed out or the server is shutting down, before
    the iterator is closed, so a producer can stop upstream work cooperatively: ``await
    stopping().wait()`` in an async producer, ``stopping().is_set()`` in a sync one.

    Raises ``LookupError`` outside such a body.
    """
    try:
        race = _current_race.get()
    except LookupError:
        raise LookupError("stopping() is only available inside the body of a disconnect_responses response") from None
    if threading.get_ident() != race.loop_thread:
        # A sync producer, in a worker thread: events belong to the event loop's thread.
        return anyio.from_thread.run_sync(race.stopping)
    return race.stopping()


class _Stopped(Exception):
    """Raised by the guarded send once the race is decided: nothing more may reach the server."""


class Guarded(Protocol):
    """The response a ``Race`` runs for: its options, and where the outcome is published."""

    send_timeout: float | None
    cleanup_timeout: float
    background: BackgroundTask | None
    background_policy: BackgroundPolicy
    outcome: Outcome | None
    bytes_sent: int


class Race:
    """One call of a response: ``respond()`` runs the body against the disconnect, then cleans up."""

    # Class-level starting values: a small response pays for every assignment in __init__.
    outcome: Outcome | None = None
    error: Exception | None = None
    bytes_sent = 0
    stopped = False
    _stopping: anyio.Event | None = None
    _sending = False
    _send_began: float | None = None
    # Whether body sends are timed: for the send watchdog, and for FileResponse's pacing (send_took).
    time_sends = False
    send_took = 0.0  # seconds the server's send() took for the last body message
    _yield_at = YIELD_EVERY_BYTES
    _final_sent = False
    _start_sent = False
    _declared_length: int | None = None
    _cancel_scope: anyio.CancelScope | None = None
    _guard: anyio.CancelScope | None = None
    _shutdown_grace: float | None = None
    _shutting_down = False
    _grace_ends = math.inf
    # On asyncio with nothing beside the body: the listening task, which stop() wakes (_race_in_tasks).
    _listener: asyncio.Task[Any] | None = None
    _woke_listener = False
    _beside: Sequence[Callable[[], Awaitable[None]]] = ()
    # A turn of the event loop for the body (anyio.lowlevel.checkpoint() looks up the backend per call).
    checkpoint: Callable[[], Awaitable[None]] = staticmethod(anyio.lowlevel.checkpoint)
    _send_lock: anyio.Lock | None = None

    def __init__(self, response: Guarded, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop_thread = threading.get_ident()
        self._response = response
        self._scope = scope
        self._receive = receive
        self._send = websocket_denial_send(send) if scope["type"] == "websocket" else send
        self._send_timeout = response.send_timeout
        if response.send_timeout is not None:
            self.time_sends = True
        self._cleanup_timeout = response.cleanup_timeout
        self._started = time.monotonic()

    async def respond(
        self,
        body: Callable[[Send], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
        shutdown_grace: float | None = None,
        beside: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        """Run ``body(send)`` against the disconnect, publish the outcome on the response, call
        ``close()`` to release the body's source, run the background task, then raise the body's
        error if it had one. ``stopping()`` answers throughout, the producer's ``finally`` included.

        ``shutdown_grace`` makes an open-ended body end on the server's shutdown signal: at the
        signal ``stopping()`` is set, and after ``shutdown_grace`` seconds the body is stopped
        (``SHUTDOWN``) unless it ended by itself. ``None``, for a body of known length, leaves the
        shutdown to the server, as under Starlette.

        Each of ``beside`` runs in a task of its own beside the body until the response ends (an
        event stream's ping); one that sends uses ``send_beside``, which takes turns with the body.
        """
        self._shutdown_grace = shutdown_grace
        if beside:
            self._beside = beside
            self._send_lock = anyio.Lock()
        observe = observer.get()
        if observe is not None:
            observe(self._response)
        token = _current_race.set(self)
        try:
            try:
                await self._run(body)
            finally:
                self._response.outcome = self.outcome
                self._response.bytes_sent = self.bytes_sent
                try:
                    await self._finish(close)
                finally:
                    if self.outcome is Outcome.SHUTDOWN:
                        await self._end_open_body()
        finally:
            _current_race.reset(token)
        error, self.error = self.error, None
        if error is not None:
            # Neither this race nor this frame may keep the exception: its traceback holds both,
            # and the producer's frames with them, which a cycle would keep until the garbage
            # collector runs.
            try:
                raise error
            finally:
                error = None

    def stop(self, outcome: Outcome) -> None:
        """Decide the race (the first outcome wins), set ``stopping()`` and cancel the body where
        it waits; a body that sends after this gets ``_Stopped``."""
        if self.outcome is None:
            self.outcome = outcome
        self.stopped = True
        if self._stopping is not None:
            self._stopping.set()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        listener = self._listener
        if listener is not None:
            self._listener = None
            if listener is not current_asyncio_task():
                self._woke_listener = True
                listener.cancel()

    def stopping(self) -> anyio.Event:
        """The event behind the public ``stopping()``."""
        # Made on first use: most bodies never ask, and an event per response is not free.
        if self._stopping is None:
            self._stopping = anyio.Event()
            if self.stopped or self._shutting_down:
                self._stopping.set()
        return self._stopping

    async def _run(self, body: Callable[[Send], Awaitable[None]]) -> None:
        try:
            listener = current_asyncio_task()
            if listener is not None:
                self.checkpoint = asyncio_checkpoint
                if self._scope["type"] == "http" and self._send_timeout is None and not self._beside:
                    await self._race_in_tasks(body, listener)
                    return
            # Cancelling the task group's scope stops the body and the helpers at once.
            async with anyio.create_task_group() as task_group:
                self._cancel_scope = task_group.cancel_scope
                if self._shutdown_grace is not None:
                    shutdown_watch.add(self._on_shutdown)
                if self._send_timeout is not None:
                    task_group.start_soon(self._watch_sends, self._send_timeout)
                for task in self._beside:
                    task_group.start_soon(self._run_beside, task)
                if self._scope["type"] == "http":
                    # As in Starlette: the body in a child task, the listener here (README, Design).
                    task_group.start_soon(self._run_body_in_child, body)
                    try:
                        await self._listen_for_disconnect()
                    except BaseException as exc:
                        # A cancellation before the race is decided comes from outside: decided
                        # here, it sets stopping() for a producer that the cancellation cannot
                        # reach (in a worker thread, in a shielded scope). (Looked at only then: a
                        # decided race cancels the listener itself.)
                        if not self.stopped and isinstance(exc, anyio.get_cancelled_exc_class()):
                            self._stop_from_outside()
                        raise
                else:
                    outcome = await self._run_body(body)
                    if outcome is not None:
                        self.stop(outcome)
        except anyio.get_cancelled_exc_class():
            self._stop_from_outside()
            raise
        finally:
            if self._shutdown_grace is not None:
                shutdown_watch.discard(self._on_shutdown)
            if self.outcome is Outcome.DISCONNECTED and self.bytes_sent == self._declared_length:
                # Every declared byte reached the server: delivered, whatever it reported meanwhile.
                self.outcome = Outcome.COMPLETED
            if self._guard is not None and self._guard.cancel_called:
                logger.warning("Gave up waiting for the body iterator's cleanup after %s s", self._cleanup_timeout)
            if self.outcome not in (None, Outcome.COMPLETED, Outcome.ERROR):
                self._log_interruption()

    async def _race_in_tasks(self, body: Callable[[Send], Awaitable[None]], listener: asyncio.Task[Any]) -> None:
        """The race on asyncio when only the body and the listener run: the same two tasks as in
        the task group, for a fraction of its cost per response (README, Design). The body runs
        in a plain asyncio task under a cancel scope of its own, which stop() cancels; stop() wakes
        this task, the listener, with a native cancellation that it withdraws."""
        # Cancellation requests the server's task carried in, which are not the wake-up's.
        carried = cancelling(listener)
        body_task = listener.get_loop().create_task(self._run_body_in_task(body))
        # An eager task factory runs the body's first step in create_task(): it may have ended.
        if not self.stopped:
            self._listener = listener
            try:
                await self._listen_for_disconnect()
            except BaseException as exc:
                woken = isinstance(exc, asyncio.CancelledError) and self._woke_listener
                if not woken or uncancel(listener) > carried:
                    # From outside (maybe together with the wake-up), or raised by receive(): as
                    # in the task group, the body stops and is waited for.
                    self._listener = None
                    if not self.stopped:
                        self._stop_from_outside()
                    await wait_for_task(body_task)
                    retrieve(body_task)
                    raise
            else:
                if self._woke_listener and cancelling(listener) > carried:
                    uncancel(listener)  # a receive() swallowed the wake-up and returned a message
        if await wait_for_task(body_task):
            raise asyncio.CancelledError
        body_task.result()  # a BaseException the body raised (not an Exception: that is the outcome's)

    async def _run_body_in_task(self, body: Callable[[Send], Awaitable[None]]) -> None:
        outcome = None
        try:
            with asyncio_scope() as self._cancel_scope:
                if self.stopped:
                    # The listener heard the disconnect before this task started.
                    self._cancel_scope.cancel()
                elif self._shutdown_grace is not None:
                    shutdown_watch.add(self._on_shutdown)
                try:
                    outcome = await self._run_body(body)
                finally:
                    self._cancel_scope = None  # the body has ended: nothing left to cancel
        except asyncio.CancelledError:
            # Not this scope's: a producer awaiting a task that someone cancelled (as below).
            self._stop_from_outside()
            return
        except BaseException:
            if not self.stopped:
                self._stop_from_outside()  # and the listener re-raises it
            raise
        if outcome is not None:
            self.stop(outcome)
        elif not self.stopped:
            # The end of the shutdown grace: the scope's deadline cancelled the body.
            self._stop_from_outside()

    async def _run_body_in_child(self, body: Callable[[Send], Awaitable[None]]) -> None:
        try:
            outcome = await self._run_body(body)
            if outcome is not None:
                self.stop(outcome)
        except anyio.get_cancelled_exc_class():
            # Swallowed: kept on the finished task, it would hold the body's frames in a cycle
            # (README, Design). One no scope sent (a producer awaiting a task that someone
            # cancelled) ends the response as a cancellation from outside would.
            self._stop_from_outside()

    async def _run_body(self, body: Callable[[Send], Awaitable[None]]) -> Outcome | None:
        """Run the body; return how it ended, for the caller to stop with, or ``None`` when the
        race was decided meanwhile."""
        assert self._cancel_scope is not None  # for mypy: set before the body starts
        try:
            # Shielded by drive() once the race is decided, so that a producer's cleanup can
            # await; bounded by its deadline.
            with scope_like(self._cancel_scope) as self._guard:
                await body(self.send)
        except _Stopped:
            return None  # stopped already
        except Exception as exc:
            self.error = exc
            return Outcome.ERROR
        return Outcome.COMPLETED

    async def _run_beside(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except _Stopped:
            pass  # stopped already
        except Exception as exc:
            if self.error is None:
                self.error = exc
            self.stop(Outcome.ERROR)

    def _on_shutdown(self, now: float) -> None:
        # Called back by the shutdown watch in the event loop's thread, maybe outside any task,
        # where AnyIO's own functions may find no backend: ``now`` is the loop's clock.
        if self.stopped or self._shutting_down:
            return
        assert self._cancel_scope is not None and self._shutdown_grace is not None  # registered with both
        if self._shutdown_grace == 0:
            self.stop(Outcome.SHUTDOWN)
            return
        self._shutting_down = True
        if self._stopping is not None:
            self._stopping.set()
        # The race's own scope runs out at the end of the grace: a cancellation of it that no
        # stop() decided is this one (_stop_from_outside).
        self._grace_ends = self._cancel_scope.deadline = now + self._shutdown_grace

    def _stop_from_outside(self) -> None:
        """Stop for a cancellation that no ``stop()`` decided: the shutdown grace ran out (the
        race's own scope reached its deadline), or someone cancelled the response (``CANCELLED``)."""
        # Not the scope's cancel_called: on trio a nursery cancels its own scope when a cancellation
        # from outside reaches a task beside the body (the ping, the send watchdog) first.
        grace_over = self._grace_ends <= anyio.current_time()
        self.stop(Outcome.SHUTDOWN if grace_over else Outcome.CANCELLED)

    async def _end_open_body(self) -> None:
        # An open-ended stream (only those are shut down) ends with a proper last chunk, so that
        # the server can close the connection and exit, and an event-stream client sees a clean
        # end and reconnects. It goes last, after the cleanup: granian ends a worker that is
        # shutting down once its responses are complete, whether or not the app has returned.
        if not self._start_sent or self._final_sent:
            return
        with anyio.move_on_after(self._cleanup_timeout):
            try:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            except CLIENT_GONE:
                pass  # the client left as well: nothing to end

    @types.coroutine
    def drive(self, body: Coroutine[Any, Any, None]) -> Generator[Any, Any, None]:
        """Run ``body``, a coroutine that pulls a producer and sends what it yields, to its end.

        A stop cancels the body where it waits, in the producer if it is awaiting its upstream
        there; the cancellation is level-triggered, so an ``async with`` whose ``__aexit__`` awaits
        (closing a client, releasing a lock) would be cut at its first await. Driving the body
        step by step instead of with ``await`` shows when it resumes with the stop's cancellation
        outside ``send()``, that is in the producer: then, before the producer runs on, the guard
        around the body is shielded, with ``cleanup_timeout`` as its deadline. The cancellation of
        a scope around the whole response, seen here before the listener saw it, counts as the
        stop (``CANCELLED``). A producer that resumes without it (from a shielded scope or a
        worker thread) takes it at its next await. A step that does not wait (an item ready at
        once, a send that returns) costs nothing here.
        """
        guard = self._guard
        assert guard is not None  # for mypy: the body runs inside it
        suspended: Any = None
        message: Any = None
        error: BaseException | None = None
        while True:
            try:
                suspended = body.send(message) if error is None else body.throw(error)
            except StopIteration:
                return
            finally:
                # Spent, and not to be kept: an exception raised from here carries this frame,
                # and a local holding it would make a cycle that keeps the producer's frames
                # until the garbage collector runs.
                message = error = None
            try:
                message = yield suspended
            except GeneratorExit:
                body.close()
                raise
            except BaseException as exc:
                error = exc
            # The loop had a turn: the guarded send's forced one can wait for the next 512 KiB.
            self._yield_at = self.bytes_sent + YIELD_EVERY_BYTES
            if not self._sending and not guard.shield and takes_stop(guard, suspended, message, error):
                if not self.stopped:
                    # A cancelled scope around the whole response (the server's, on trio), or the
                    # end of the shutdown grace, can reach the body before the listener: it is the
                    # same stop, seen first here.
                    self._stop_from_outside()
                guard.shield = True
                guard.deadline = anyio.current_time() + self._cleanup_timeout

    async def send(self, message: Message) -> None:
        """The guarded ``send`` the body is handed: nothing reaches the server once the race is
        stopped, and the server's errors for a departed client become the stop (divergence 2)."""
        self._sending = True  # for drive(): a wait in here is not the producer's
        try:
            if self._send_lock is None:
                await self._send_guarded(message)
            else:
                async with self._send_lock:
                    await self._send_guarded(message)
        finally:
            self._sending = False

    async def send_beside(self, message: Message) -> None:
        """The guarded ``send`` for a task beside the body: it takes turns with the body's sends,
        so that a message never goes out inside another."""
        assert self._send_lock is not None  # for mypy: made in respond() for such a task
        async with self._send_lock:
            await self._send_guarded(message)

    async def _send_guarded(self, message: Message) -> None:
        if self.stopped:
            raise _Stopped
        try:
            if message["type"] == "http.response.start":
                self._start_sent = True
                for name, value in message.get("headers", ()):
                    if name == b"content-length" and value.isdigit():
                        self._declared_length = int(value)
                await self._send(message)
                if self.stopped:
                    raise _Stopped
                return
            more_body = message.get("more_body", False)
            if not more_body:
                # From here on the listener's http.disconnect may just be the end of this response.
                self._final_sent = True
            if self.time_sends:
                began = self._send_began = time.monotonic()
                await self._send(message)
                self._send_began = None
                self.send_took = time.monotonic() - began
            else:
                await self._send(message)
            sent = self.bytes_sent = self.bytes_sent + len(message.get("body", b""))
            if sent == self._declared_length:
                # Every declared byte is out: a server may call that the end (granian reports the
                # disconnect at once), before the empty last message (see _run).
                self._final_sent = True
            if more_body:
                if self.stopped:
                    # The race was decided while this send waited: pull nothing more from the producer.
                    raise _Stopped
                if sent >= self._yield_at:
                    self._yield_at = sent + YIELD_EVERY_BYTES
                    await self.checkpoint()
        except CLIENT_GONE:
            self.stop(Outcome.DISCONNECTED)
            raise _Stopped from None

    async def _listen_for_disconnect(self) -> None:
        try:
            messages = 0
            while (await self._receive())["type"] != "http.disconnect":
                if self.stopped:
                    return  # decided meanwhile, by a stop whose wake-up this receive() swallowed
                messages += 1
                if messages > 1:
                    # The request's body is usually one message; a server that keeps answering at
                    # once must not starve the body.
                    await anyio.lowlevel.checkpoint()
        except Exception as exc:
            if self.error is None:
                self.error = exc
            self.stop(Outcome.ERROR)
            return
        if self.stopped:
            return
        if not self._final_sent:
            self.stop(Outcome.DISCONNECTED)
        else:
            # The disconnect may be the end of this response, whose body then ends and cancels
            # this wait; but hypercorn over HTTP/2 can hold the last send forever on a client that
            # reset the stream, so the body gets cleanup_timeout (Starlette cancels it at once).
            await anyio.sleep(self._cleanup_timeout)
            self.stop(Outcome.DISCONNECTED)

    async def _watch_sends(self, limit: float) -> None:
        # Polling at a quarter of the timeout costs nothing per chunk; a send is let go between
        # timeout and 1.25 x timeout after it began.
        while True:
            began = self._send_began
            if began is None:
                await anyio.sleep(limit / 4)
                continue
            remaining = began + limit - time.monotonic()
            if remaining <= 0:
                self.stop(Outcome.SEND_TIMEOUT)
                return
            await anyio.sleep(remaining)

    def _log_interruption(self) -> None:
        assert self.outcome is not None  # for mypy: the caller checked
        logger.info(
            '"%s %s" stopped: %s after %d body bytes in %.1f ms',
            self._scope.get("method", self._scope["type"].upper()),
            self._scope.get("path", ""),
            self.outcome.value,
            self.bytes_sent,
            (time.monotonic() - self._started) * 1000,
        )

    async def _finish(self, close: Callable[[], Awaitable[None]]) -> None:
        # The close runs shielded and bounded by cleanup_timeout, whatever stopped the body. After
        # an outside cancellation (a server shutting down) the background task does too; otherwise
        # it runs as Starlette runs it, and its errors propagate.
        background = self._response.background
        policy = self._response.background_policy
        cancelled = self.outcome is Outcome.CANCELLED
        if self.outcome is Outcome.COMPLETED:
            # Nothing is cancelling this task and the iterator is exhausted: closing it is a
            # formality, not worth a cancel scope or a task per response.
            await logging_errors(close, "closing the body iterator")
            interrupted = False
        else:
            interrupted = await shielded(close, self._cleanup_timeout, "closing the body iterator", cancelled)
        if background is not None and (policy == "always" or self.outcome is Outcome.COMPLETED):
            if cancelled or interrupted:
                interrupted |= await shielded(background, self._cleanup_timeout, "the background task", True)
            else:
                await background()
        if interrupted:
            raise asyncio.CancelledError
