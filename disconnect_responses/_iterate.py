"""Iterating and closing a response's source.

Private. ``close_iterator`` closes whatever a body iterates; ``SyncIterator`` iterates a sync
iterable in worker threads and, unlike Starlette's ``iterate_in_threadpool``, can be closed
(divergences 4 and 5). Changes when how sources are iterated or closed changes.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

logger = logging.getLogger("disconnect_responses")

T = TypeVar("T")


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
