"""The race between a response body and the client's departure, and the cleanup after it.

Private: the response classes in ``responses.py`` are the public face. One ``Race`` lives for one
call of a response. It runs the body in the calling task with a guarded ``send``, a listener for
``http.disconnect`` and, when asked, a watchdog on slow sends in child tasks; whatever ends first
sets the ``Outcome``. ``finish`` then closes the body iterator and runs the background task.
"""

from __future__ import annotations

import enum
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Generic, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("disconnect_responses")

T = TypeVar("T")
BackgroundPolicy = Literal["always", "completed"]

# A producer that never awaits, behind a server whose send() returns without yielding (uvicorn,
# hypercorn), would never let the disconnect listener run. The guarded send gives the event loop a
# turn once this many body bytes went out since the last one: a turn per 64 KiB chunk costs about a
# fifth of in-memory throughput, a turn per 256 KiB under 5%.
YIELD_EVERY_BYTES = 256 * 1024


class Outcome(str, enum.Enum):
    """How a response's body ended; ``response.outcome`` holds it once the call has returned."""

    COMPLETED = "completed"
    """Every body byte was handed to the server."""
    DISCONNECTED = "disconnected"
    """The client went away: ``http.disconnect`` arrived, or ``send()`` raised ``OSError``."""
    SEND_TIMEOUT = "send_timeout"
    """One ``send()`` blocked longer than ``send_timeout``: the client stopped reading."""
    SHUTDOWN = "shutdown"
    """The server is shutting down."""
    CANCELLED = "cancelled"
    """The task running the response was cancelled from outside."""
    ERROR = "error"
    """The body raised; the exception is re-raised after the cleanup."""


_stopping: ContextVar[anyio.Event] = ContextVar("disconnect_responses.stopping")


def stopping() -> anyio.Event:
    """Return the event that is set when the response streaming the current body is ending.

    Call it inside a body iterator (async or sync) of a ``disconnect_responses`` response. The event
    is set as soon as the client has gone, a send timed out or the server is shutting down, before
    the iterator is closed, so a producer can stop upstream work cooperatively: ``await
    stopping().wait()`` in an async producer, ``stopping().is_set()`` in a sync one.

    Raises ``LookupError`` outside such a body.
    """
    try:
        return _stopping.get()
    except LookupError:
        raise LookupError("stopping() is only available inside the body of a disconnect_responses response") from None


class _Stopped(Exception):
    """Raised by the guarded send once the race is decided: nothing more may reach the server."""


class Race:
    def __init__(self, scope: Scope, receive: Receive, send: Send, send_timeout: float | None) -> None:
        self.outcome: Outcome | None = None
        self.error: Exception | None = None
        self.bytes_sent = 0
        self.stopping = anyio.Event()
        self._scope = scope
        self._receive = receive
        self._send = send
        self._send_timeout = send_timeout
        self._send_began: float | None = None
        self._unyielded = 0
        self._final_sent = False
        self._started = time.monotonic()
        self._body_scope = anyio.CancelScope()

    def stop(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self.stopping.set()
        self._body_scope.cancel()

    async def run(self, body: Callable[[Send], Awaitable[None]]) -> None:
        """Run ``body(send)`` until it completes, fails, or the race is stopped."""
        token = _stopping.set(self.stopping)
        try:
            async with anyio.create_task_group() as task_group:
                if self._scope["type"] == "http":
                    task_group.start_soon(self._listen_for_disconnect)
                if self._send_timeout is not None:
                    task_group.start_soon(self._watch_sends, self._send_timeout)
                with self._body_scope:
                    try:
                        await body(self.send)
                    except _Stopped:
                        pass
                    except Exception as exc:
                        self.error = exc
                        self.stop(Outcome.ERROR)
                    else:
                        self.stop(Outcome.COMPLETED)
                task_group.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            self.stop(Outcome.CANCELLED)
            raise
        finally:
            _stopping.reset(token)
            if self.outcome not in (Outcome.COMPLETED, Outcome.ERROR):
                self._log_interruption()

    async def send(self, message: Message) -> None:
        if self.stopping.is_set():
            raise _Stopped
        more_body = message.get("more_body", False)
        if not more_body and message["type"] == "http.response.body":
            # From here on the listener's http.disconnect may just be the end of this response.
            self._final_sent = True
        if self._send_timeout is not None:
            self._send_began = time.monotonic()
        try:
            await self._send(message)
        except (OSError, ClientDisconnect):
            self.stop(Outcome.DISCONNECTED)
            raise _Stopped from None
        self._send_began = None
        sent = len(message.get("body", b""))
        self.bytes_sent += sent
        self._unyielded += sent
        if self._unyielded >= YIELD_EVERY_BYTES and more_body:
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()

    async def _listen_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._final_sent:
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
        assert self.outcome is not None
        logger.info(
            '"%s %s" stopped: %s after %d body bytes in %.1f ms',
            self._scope.get("method", self._scope["type"].upper()),
            self._scope.get("path", ""),
            self.outcome.value,
            self.bytes_sent,
            (time.monotonic() - self._started) * 1000,
        )

    async def finish(
        self,
        close: Callable[[], Awaitable[None]],
        background: BackgroundTask | None,
        policy: BackgroundPolicy,
        cleanup_timeout: float,
    ) -> None:
        """Close the body's source, then run the background task if the policy says so.

        The close is shielded and bounded by ``cleanup_timeout``: it runs whatever stopped the body.
        After an outside cancellation (a server shutting down) the background task is shielded and
        bounded by the same timeout too; otherwise it runs as Starlette runs it.
        """
        cancelled = self.outcome is Outcome.CANCELLED
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + cleanup_timeout
            try:
                await close()
            except Exception:
                logger.exception("Closing the body iterator failed")
        if scope.cancelled_caught:
            logger.warning("The body iterator did not close within %s s; left to finish on its own", cleanup_timeout)
        if background is None or (policy == "completed" and self.outcome is not Outcome.COMPLETED):
            return
        with anyio.CancelScope(shield=cancelled) as scope:
            if cancelled:
                scope.deadline = anyio.current_time() + cleanup_timeout
            await background()
        if scope.cancelled_caught:
            logger.warning("The background task did not finish within %s s of the cancellation", cleanup_timeout)


async def close_iterator(iterator: object) -> None:
    """Close an async or sync iterator the way its type allows: ``aclose()``, else ``close()``."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
        return
    close = getattr(iterator, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


class _Exhausted(Exception):
    """StopIteration cannot cross a worker thread's future; this stands in for it."""


class SyncIterator(Generic[T]):
    """An async iterator over a sync iterable whose ``next()`` calls run in worker threads.

    Unlike Starlette's ``iterate_in_threadpool`` it can be closed: ``aclose()`` calls the sync
    iterator's ``close()`` in a worker thread, and when a ``next()`` is still running there (the
    response was stopped while waiting for it), that thread closes the iterator as soon as
    ``next()`` returns. A cancelled ``__anext__`` abandons its thread instead of waiting for it.
    """

    def __init__(self, iterable: Iterable[T]) -> None:
        self._iterator: Iterator[T] = iter(iterable)
        self._lock = threading.Lock()
        self._running = False
        self._close_pending = False
        self._closed = threading.Event()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await anyio.to_thread.run_sync(self._next, abandon_on_cancel=True)
        except _Exhausted:
            raise StopAsyncIteration from None

    def _next(self) -> T:
        with self._lock:
            if self._close_pending:
                raise _Exhausted
            self._running = True
        try:
            return next(self._iterator)
        except StopIteration:
            raise _Exhausted from None
        finally:
            with self._lock:
                self._running = False
                close_now = self._close_pending
            if close_now:
                self._close()

    def _close(self) -> None:
        try:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
        finally:
            self._closed.set()

    async def aclose(self) -> None:
        with self._lock:
            if self._close_pending:
                return
            self._close_pending = True
            running = self._running
        if running:
            await anyio.to_thread.run_sync(self._closed.wait, abandon_on_cancel=True)
        else:
            await anyio.to_thread.run_sync(self._close)


__all__ = ["Outcome", "Race", "SyncIterator", "close_iterator", "stopping"]
