"""Cancellation: telling the stop's own cancellation apart, and cleanup that outlives cancellation.

Private. Everything the library relies on that AnyIO, asyncio or trio do not promise in their
public API lives here, so that one module changes when they do. Each assumption below has one test
in ``tests/test_assumptions.py`` whose failure names it; they were checked on AnyIO 4.1 and 4.16,
trio 0.26 to 0.33, CPython 3.10 to 3.13.

A1. AnyIO cancels an asyncio task with the message ``"Cancelled by cancel scope <hex id>"``
    (AnyIO 4.1) or ``"Cancelled via cancel scope <hex id>"`` (later); asyncio's own timeouts
    (``asyncio.timeout``, ``wait_for``) send no such message. ``takes_stop`` tells them apart by it.
A2. On asyncio, a task that resumes from a cancelled future reads the message from
    ``future.result()``; on trio, a task resumes with an ``outcome.Error`` holding ``trio.Cancelled``
    as the value its coroutine is sent (``Race.drive`` sees the step this way).
A3. With the guard scope shielded, ``anyio.current_effective_deadline()`` reflects only the scopes
    inside the guard: ``-inf`` there means a scope of the producer's own is cancelled.
A4. ``type(task_group.cancel_scope)()`` makes a working cancel scope of the running backend, the
    same as ``anyio.CancelScope()`` without its backend lookup (``scope_like``).
A5. ``asyncio.run`` tears down by calling ``task.cancel()`` on every task left, then waits for
    them: a task whose ``cancel()`` refuses (``_Uncancellable``) keeps the loop alive until it ends.
A6. On asyncio, ``type(anyio.CancelScope())`` makes a working cancel scope in any asyncio task, one
    that AnyIO did not start included (``asyncio_scope``); a native ``Task.cancel()`` passes through
    an AnyIO scope that is not cancelled itself (one cancelled in the same turn may swallow it on
    AnyIO 4.1: the listener then sees its ``receive()`` return after the stop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

logger = logging.getLogger("disconnect_responses")


def asyncio_checkpoint() -> Awaitable[None]:
    """``anyio.lowlevel.checkpoint()`` on asyncio, without its backend lookup on every call."""
    return asyncio.sleep(0)


def current_asyncio_task() -> asyncio.Task[Any] | None:
    """The running asyncio task, or ``None`` outside one (on trio)."""
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


@functools.cache
def _asyncio_scope_class() -> type[anyio.CancelScope]:
    return type(anyio.CancelScope())


def asyncio_scope() -> anyio.CancelScope:
    """A new cancel scope on asyncio, without ``anyio.CancelScope()``'s backend lookup (A6)."""
    return _asyncio_scope_class()()


def cancelling(task: asyncio.Task[Any]) -> int:
    """How many ``task.cancel()`` requests are pending (Python 3.11+; 3.10 keeps no count: 0)."""
    if sys.version_info >= (3, 11):
        return task.cancelling()
    return 0


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the ended ``task``'s exception as seen: the caller raises one of its own."""
    if not task.cancelled():
        task.exception()


def uncancel(task: asyncio.Task[Any]) -> int:
    """Withdraw one ``task.cancel()`` request; return how many remain (Python 3.11+; 3.10 keeps no
    count, so none remain)."""
    if sys.version_info >= (3, 11):
        return task.uncancel()
    return 0


async def wait_for_task(task: asyncio.Task[Any]) -> bool:
    """Wait for ``task``, which was stopped and ends soon, whatever cancels the caller meanwhile.
    Returns whether the caller swallowed a native cancellation meanwhile, to be re-raised."""
    if task.done():
        return False  # as usual: the body's task woke the caller as it ended
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.wait((task,))
            except asyncio.CancelledError:
                cancelled = True
    return cancelled


def scope_like(scope: anyio.CancelScope) -> anyio.CancelScope:
    """A new cancel scope of ``scope``'s backend (A4): ``anyio.CancelScope()`` looks the backend
    up on every call, which costs more than the scope itself."""
    return type(scope)()


def takes_stop(guard: anyio.CancelScope, suspended: Any, message: Any, error: BaseException | None) -> bool:
    """Whether a producer resumes with a cancellation from a cancel scope outside ``guard`` (the
    race's stop, or a scope around the whole response), while no scope of the producer's own
    inside ``guard`` is cancelled too (its own timeout, or on trio the scope a checkpoint uses),
    which would own it, and catch it once the guard is shielded (A3)."""
    if not _cancels(suspended, message, error):
        return False
    guard.shield = True  # ends the look at the scopes inside the guard
    own_scopes_cancelled = anyio.current_effective_deadline() <= anyio.current_time()
    guard.shield = False
    return not own_scopes_cancelled


def _cancels(suspended: Any, message: Any, error: BaseException | None) -> bool:
    """Whether a task resumes with a cancellation from a cancel scope: thrown in (asyncio, a task
    that was not waiting on a future), through the future it waited on (asyncio), or as trio's
    ``Error`` outcome (A2). asyncio's own timeouts cancel too; AnyIO names the scope in the
    message, they do not (A1)."""
    if isinstance(error, asyncio.CancelledError):
        return from_a_cancel_scope(error)
    if isinstance(suspended, asyncio.Future):
        if not suspended.cancelled():
            return False
        try:
            suspended.result()
        except asyncio.CancelledError as exc:
            return from_a_cancel_scope(exc)
    return isinstance(getattr(message, "error", None), anyio.get_cancelled_exc_class())


_SCOPE_CANCELLATION = re.compile(r"Cancelled (by|via) cancel scope [0-9a-f]+")


def from_a_cancel_scope(exc: asyncio.CancelledError) -> bool:
    """Whether an asyncio cancellation was sent by an AnyIO cancel scope (A1)."""
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
    Then the task refuses ``cancel()`` (A5; anyio timeouts inside ``func()`` wait for ``limit``
    too), which keeps the event loop alive until the cleanup is done or ``limit`` has passed.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    cancelled = False
    with anyio.CancelScope(shield=True):
        if loop is None:
            with anyio.move_on_after(limit) as scope:
                await logging_errors(func, what)
            finished = not scope.cancelled_caught
        else:
            task_class = _Uncancellable if teardown else asyncio.Task
            task = task_class(logging_errors(func, what), loop=loop)
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


async def logging_errors(func: Callable[[], Awaitable[object]], what: str) -> None:
    """Await ``func()``; log its error instead of raising it."""
    try:
        await func()
    except Exception:
        logger.exception("Error in %s", what)
