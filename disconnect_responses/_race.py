"""The race between a response body and the client's departure, and the cleanup after it.

Private: the response classes in ``responses.py`` are the public face. One ``Race`` lives for one
call of a response. ``Race.respond`` runs the body with a guarded ``send`` in a child task, as
Starlette does, while the calling task listens for ``http.disconnect``; a watchdog on slow sends
runs beside them when asked. Whatever ends first sets the ``Outcome``. It then closes the body's
source and runs the background task.
Below it: ``shielded`` (cleanup that outlives cancellation), ``SyncIterator`` (a closable way to
iterate a sync iterable in worker threads) and the shutdown watch (signals stop live responses).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import re
import signal
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Iterator
from contextvars import ContextVar
from types import FrameType
from typing import Any, Generic, Literal, Protocol, TypeVar

import anyio
import anyio.from_thread
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
# turn once this many body bytes went out since the last one. A turn costs about 4 us: once per
# 64 KiB chunk that is a fifth of in-memory throughput, once per 512 KiB about 3%, for a few
# hundred KiB more pushed into a socket whose client has just closed (none once the server said so).
YIELD_EVERY_BYTES = 512 * 1024


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
    TRUNCATED = "truncated"
    """The body's source ended early (a file shrank while it was sent): the response was cut short."""


_current_race: ContextVar[Race] = ContextVar("disconnect_responses.race")


def current_race() -> Race:
    """The race of the response whose body runs in this context; ``LookupError`` outside one."""
    return _current_race.get()


def stopping() -> anyio.Event:
    """Return the event that is set when the response streaming the current body is ending.

    Call it inside a body iterator (async or sync) of a ``disconnect_responses`` response. The event
    is set as soon as the client has gone, a send timed out or the server is shutting down, before
    the iterator is closed, so a producer can stop upstream work cooperatively: ``await
    stopping().wait()`` in an async producer, ``stopping().is_set()`` in a sync one.

    Raises ``LookupError`` outside such a body.
    """
    try:
        race = current_race()
    except LookupError:
        raise LookupError("stopping() is only available inside the body of a disconnect_responses response") from None
    if threading.get_ident() != race.loop_thread:
        # A sync producer, in a worker thread: events belong to the event loop's thread.
        return anyio.from_thread.run_sync(race.stopping_event)
    return race.stopping_event()


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
    _stopping: anyio.Event | None = None
    _stopped = False
    _sending = False
    _send_began: float | None = None
    _yield_at = YIELD_EVERY_BYTES
    _final_sent = False
    _start_headers: Iterable[tuple[bytes, bytes]] | None = None
    _cancel_scope: anyio.CancelScope | None = None
    _guard: anyio.CancelScope | None = None

    def __init__(self, response: Guarded, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop_thread = threading.get_ident()
        self._response = response
        self._scope = scope
        self._receive = receive
        self._send = _wrap_websocket_denial_send(send) if scope["type"] == "websocket" else send
        self._send_timeout = response.send_timeout
        self._cleanup_timeout = response.cleanup_timeout
        self._started = time.monotonic()

    async def respond(self, body: Callable[[Send], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        """Run ``body(send)`` against the disconnect, publish the outcome on the response, call
        ``close()`` to release the body's source, run the background task, then raise the body's
        error if it had one. ``stopping()`` answers throughout, the producer's ``finally`` included.
        """
        token = _current_race.set(self)
        try:
            try:
                await self._run(body)
            finally:
                self._response.outcome = self.outcome
                self._response.bytes_sent = self.bytes_sent
                await self._finish(close)
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
        """End the race from outside the body: the body is cancelled where it waits."""
        self._decide(outcome)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _decide(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self._stopped = True
        if self._stopping is not None:
            self._stopping.set()

    def stopping_event(self) -> anyio.Event:
        # Made on first use: most bodies never ask, and an event per response is not free.
        if self._stopping is None:
            self._stopping = anyio.Event()
            if self._stopped:
                self._stopping.set()
        return self._stopping

    async def _run(self, body: Callable[[Send], Awaitable[None]]) -> None:
        try:
            # Cancelling the task group's scope stops the body and the helpers at once.
            async with anyio.create_task_group() as task_group:
                self._cancel_scope = task_group.cancel_scope
                _shutdown_watch.add(self)
                if self._send_timeout is not None:
                    task_group.start_soon(self._watch_sends, self._send_timeout)
                if self._scope["type"] == "http":
                    # As in Starlette, the listener runs here and the body in a child task, which
                    # starts once the listener waits: a client the server already knows is gone
                    # never sees the body start, and a body that ends wakes this task and no other.
                    # One that left since the server last looked does see its producer start, and
                    # gets up to YIELD_EVERY_BYTES of body, plus the chunk that crosses it: the
                    # loop turn after the headers that would spare it costs every response more.
                    task_group.start_soon(self._run_body_in_child, body)
                    try:
                        await self._listen_for_disconnect()
                    except BaseException as exc:
                        # A cancellation before the race is decided comes from outside: decided
                        # here, it sets stopping() for a producer that the cancellation cannot
                        # reach (in a worker thread, in a shielded scope). (Looked at only then: a
                        # decided race cancels the listener itself.)
                        if not self._stopped and isinstance(exc, anyio.get_cancelled_exc_class()):
                            self.stop(Outcome.CANCELLED)
                        raise
                else:
                    await self._run_body(body)
            if self.outcome is Outcome.SHUTDOWN:
                await self._end_open_body()
        except anyio.get_cancelled_exc_class():
            self.stop(Outcome.CANCELLED)
            raise
        finally:
            _shutdown_watch.discard(self)
            if self._guard is not None and self._guard.cancel_called:
                logger.warning("Gave up waiting for the body iterator's cleanup after %s s", self._cleanup_timeout)
            if self.outcome not in (None, Outcome.COMPLETED, Outcome.ERROR):
                self._log_interruption()

    async def _run_body_in_child(self, body: Callable[[Send], Awaitable[None]]) -> None:
        try:
            await self._run_body(body)
        except anyio.get_cancelled_exc_class():
            # The task group's scope stands for this cancellation. Left on the finished task, the
            # exception would be kept by AnyIO in a reference cycle, and with its traceback the
            # body's frames: a producer closed by a wrapper that did not close its own inner
            # generator (FastAPI's) would wait for the garbage collector to run that finally.
            # One no scope sent (a producer awaiting a task that someone cancelled) ends the
            # response as a cancellation from outside would, without the exception.
            self.stop(Outcome.CANCELLED)

    async def _run_body(self, body: Callable[[Send], Awaitable[None]]) -> None:
        cancel_scope = self._cancel_scope
        assert cancel_scope is not None  # for mypy: set before the body starts
        try:
            # Shielded by drive() once the race is decided, so that a producer's cleanup can
            # await; bounded by its deadline. Made from the class of the task group's scope:
            # anyio.CancelScope() looks the backend up on every call, which costs more than the
            # scope itself.
            with type(cancel_scope)() as self._guard:
                await body(self.send)
        except _Stopped:
            pass
        except Exception as exc:
            self.error = exc
            self._decide(Outcome.ERROR)
        else:
            self._decide(Outcome.COMPLETED)
        cancel_scope.cancel()

    async def _end_open_body(self) -> None:
        # An endless stream (no content-length) ends with a proper last chunk, so that the server
        # can close the connection and exit, and an event-stream client sees a clean end and
        # reconnects; a body of declared length is left short for the server to close.
        if self._start_headers is None or self._final_sent:
            return
        if any(name.lower() == b"content-length" for name, _ in self._start_headers):
            return
        with anyio.move_on_after(self._cleanup_timeout):
            try:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            except (OSError, ClientDisconnect):
                pass

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
            if not self._sending and not guard.shield and _takes_stop(guard, suspended, message, error):
                if not self._stopped:
                    # A cancelled scope around the whole response (the server's, on trio) can
                    # reach the body before the listener: it is the same stop, seen first here.
                    self.stop(Outcome.CANCELLED)
                guard.shield = True
                guard.deadline = anyio.current_time() + self._cleanup_timeout

    async def send(self, message: Message) -> None:
        if self._stopped:
            raise _Stopped
        self._sending = True  # for drive(): a wait in here is not the producer's
        try:
            if message["type"] == "http.response.start":
                await self._send_start(message)
                return
            more_body = message.get("more_body", False)
            if not more_body:
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
            sent = self.bytes_sent = self.bytes_sent + len(message.get("body", b""))
            if more_body:
                if self._stopped:
                    # The race was decided while this send waited: pull nothing more from the producer.
                    raise _Stopped
                if sent >= self._yield_at:
                    self._yield_at = sent + YIELD_EVERY_BYTES
                    await anyio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def _send_start(self, message: Message) -> None:
        self._start_headers = message.get("headers", ())
        try:
            await self._send(message)
        except (OSError, ClientDisconnect):
            self.stop(Outcome.DISCONNECTED)
            raise _Stopped from None
        if self._stopped:
            raise _Stopped

    async def _listen_for_disconnect(self) -> None:
        try:
            messages = 0
            while (await self._receive())["type"] != "http.disconnect":
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
            await _logging_errors(close, "closing the body iterator")
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


def _takes_stop(guard: anyio.CancelScope, suspended: Any, message: Any, error: BaseException | None) -> bool:
    """Whether a producer resumes with a cancellation from a cancel scope outside ``guard`` (the
    race's stop, or a scope around the whole response), while no scope of the producer's own
    inside ``guard`` is cancelled too (its own timeout, or on trio the scope a checkpoint uses),
    which would own it, and catch it once the guard is shielded."""
    if not _cancels(suspended, message, error):
        return False
    guard.shield = True  # ends the look at the scopes inside the guard
    own_scopes_cancelled = anyio.current_effective_deadline() <= anyio.current_time()
    guard.shield = False
    return not own_scopes_cancelled


def _cancels(suspended: Any, message: Any, error: BaseException | None) -> bool:
    """Whether a task resumes with a cancellation from a cancel scope: thrown in (asyncio, a task
    that was not waiting on a future), through the future it waited on (asyncio), or as trio's
    ``Error`` outcome. asyncio's own timeouts (``asyncio.timeout``, ``wait_for``) cancel too; AnyIO
    names the scope in the message, they do not."""
    if isinstance(error, asyncio.CancelledError):
        return _from_a_cancel_scope(error)
    if isinstance(suspended, asyncio.Future):
        if not suspended.cancelled():
            return False
        try:
            suspended.result()
        except asyncio.CancelledError as exc:
            return _from_a_cancel_scope(exc)
    return isinstance(getattr(message, "error", None), anyio.get_cancelled_exc_class())


_SCOPE_CANCELLATION = re.compile(r"Cancelled (by|via) cancel scope [0-9a-f]+")


def _from_a_cancel_scope(exc: asyncio.CancelledError) -> bool:
    # AnyIO's message: "Cancelled by cancel scope 7f..." (AnyIO 4.1), "Cancelled via ..." (later).
    return bool(exc.args) and isinstance(exc.args[0], str) and _SCOPE_CANCELLATION.match(exc.args[0]) is not None


async def shielded(func: Callable[[], Awaitable[object]], limit: float, what: str, teardown: bool) -> bool:
    """Await ``func()`` to its end or for ``limit`` seconds, whatever cancels the caller meanwhile.

    Its errors are logged, not raised: this runs while something else ends the response. A shielded
    cancel scope is enough on trio. On asyncio a server may also cancel the task natively, again
    and again, which no cancel scope can stop: there ``func()`` runs in a task of its own while the
    caller waits for it. Returns whether the caller swallowed a native cancellation meanwhile, to
    be re-raised once its cleanup is done.

    ``teardown`` says the server is cancelling its requests: hypercorn's CLI worker does after its
    graceful timeout, then returns, and ``asyncio.run`` cancels every task left, cleanup included.
    Then the task refuses ``cancel()`` (anyio timeouts inside ``func()`` wait for ``limit`` too),
    which keeps the event loop alive until the cleanup is done or ``limit`` has passed.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    cancelled = False
    with anyio.CancelScope(shield=True):
        if loop is None:
            with anyio.move_on_after(limit) as scope:
                await _logging_errors(func, what)
            finished = not scope.cancelled_caught
        else:
            task_class = _Uncancellable if teardown else asyncio.Task
            task = task_class(_logging_errors(func, what), loop=loop)
            deadline = loop.time() + limit
            while not task.done() and loop.time() < deadline:
                try:
                    await asyncio.wait({task}, timeout=deadline - loop.time())
                except asyncio.CancelledError:
                    cancelled = True
            finished = task.done()
            if not finished:
                asyncio.Task.cancel(task)
    if not finished:
        logger.warning("Gave up waiting for %s after %s s; it may still finish on its own", what, limit)
    return cancelled


class _Uncancellable(asyncio.Task[None]):
    """A task that ignores ``cancel()``; its owner cancels it with ``asyncio.Task.cancel(task)``."""

    def cancel(self, msg: object = None) -> bool:
        return False


async def _logging_errors(func: Callable[[], Awaitable[object]], what: str) -> None:
    try:
        await func()
    except Exception:
        logger.exception("Error in %s", what)


def _wrap_websocket_denial_send(send: Send) -> Send:
    # Vendored from Starlette 1.10 (absent before 0.42), which denies a websocket with a response.
    async def wrapped(message: Message) -> None:
        if message["type"] in {"http.response.start", "http.response.body"}:
            message = {**message, "type": "websocket." + message["type"]}
        await send(message)

    return wrapped


async def close_iterator(iterator: object) -> None:
    """Close an async or sync iterator the way its type allows: ``aclose()``, else ``close()``."""
    if inspect.isasyncgen(iterator) and iterator.ag_frame is None:
        return  # it returned, or was closed: nothing is left to close
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
        self._exhausted = False
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
            self._exhausted = True
            raise _Exhausted from None
        finally:
            with self._lock:
                self._running = False
                close_now = self._close_pending
            if close_now:
                self._close()

    def _close(self) -> None:
        # Logs rather than raises: it may run in a worker thread nobody waits for any more.
        try:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
        except Exception:
            logger.exception("Error in closing the body iterator")
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
        elif self._exhausted and inspect.isgenerator(self._iterator):
            # A generator that returned has nothing left to close: no thread round trip for it.
            self._closed.set()
        else:
            await anyio.to_thread.run_sync(self._close)


_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _ChainedHandler:
    """A signal handler that stops every live response, then calls the server's own handler."""

    def __init__(self, watch: _ShutdownWatch, previous: Callable[[int, FrameType | None], object]) -> None:
        self.watch = watch
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.watch.shut_down()
        self.previous(signum, frame)


class _ShutdownWatch:
    """Stops live responses when the server process is told to shut down.

    Servers that shut down gracefully on SIGINT/SIGTERM (uvicorn, hypercorn serving in-process)
    wait for open responses to finish, so an endless stream keeps them alive until a second signal
    (uvicorn #451). Each response, as it starts, makes sure the handler installed by the server is
    chained behind ours. Where no such handler exists in this process (hypercorn's CLI worker, a
    server running outside the main thread), the server's own cancellation is the only way out;
    that is logged once, and the cancellation path still closes iterators and runs background tasks.
    """

    def __init__(self) -> None:
        self._live: dict[Race, Callable[..., object]] = {}
        self._checked_for: object = None
        self._hooked_now = False
        self._stopping_all = False
        self._fallback_logged = False

    def add(self, race: Race) -> None:
        owner, call_soon = _thread_safe_caller()
        if owner is not self._checked_for:
            # Looking at the handlers costs more than a small response: once per event loop.
            self._checked_for = owner
            self._hooked_now = self._hook()
        if self._hooked_now:
            if self._stopping_all:
                race.stop(Outcome.SHUTDOWN)
            self._live[race] = call_soon

    def discard(self, race: Race) -> None:
        self._live.pop(race, None)

    def shut_down(self) -> None:
        # Runs inside a signal handler, between two bytecodes of whatever the main thread was
        # doing: only hand the work to each response's event loop.
        self._stopping_all = True
        for race, call_soon in list(self._live.items()):
            call_soon(race.stop, Outcome.SHUTDOWN)

    def _hook(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            self._log_fallback("the server runs its event loop outside the main thread")
            return False
        for signum in _SHUTDOWN_SIGNALS:
            current = signal.getsignal(signum)
            if isinstance(current, _ChainedHandler):
                continue
            if not callable(current) or current is signal.default_int_handler:
                self._log_fallback(f"no server handler for {signal.Signals(signum).name} in this process")
                return False
            # A server installed its handler after our last look: a new server, a new shutdown.
            self._stopping_all = False
            signal.signal(signum, _ChainedHandler(self, current))
        return True

    def _log_fallback(self, reason: str) -> None:
        if not self._fallback_logged:
            self._fallback_logged = True
            logger.info("Streams cannot stop on a shutdown signal (%s); they end when the server cancels them", reason)


def _thread_safe_caller() -> tuple[object, Callable[..., object]]:
    """The running event loop (or trio token), and its way to run a callback from a signal handler."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        token = sys.modules["trio"].lowlevel.current_trio_token()
        return token, token.run_sync_soon
    return loop, loop.call_soon_threadsafe


_shutdown_watch = _ShutdownWatch()
