"""The shutdown watch: a server's SIGINT or SIGTERM reaches the responses it is waiting for.

Private. A response registers a callback with ``shutdown_watch.add`` while it streams and
removes it with ``discard``; the watch knows nothing else about responses. It chains a handler in
front of the one the server installed, so the server's own shutdown goes on as before. Changes
when servers change how they install their signal handlers.

Pinned assumptions (``tests/test_assumptions.py``):

S1. uvicorn installs its handlers with ``signal.signal`` in the main thread of each worker process;
    ``loop.add_signal_handler`` (granian, hypercorn's asyncio worker) leaves asyncio's no-op
    Python handler in ``signal.getsignal()`` and wakes the loop through the wakeup fd, which a
    handler chained in front of it does not disturb.
S2. ``loop.call_soon_threadsafe`` and trio's ``TrioToken.run_sync_soon`` may be called from a
    signal handler.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("disconnect_responses")

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _ChainedHandler:
    """A signal handler that stops every watched response, then calls the server's own handler."""

    def __init__(self, watch: ShutdownWatch, previous: Callable[[int, FrameType | None], object]) -> None:
        self.watch = watch
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.watch.shut_down()
        self.previous(signum, frame)


class ShutdownWatch:
    """Stops live responses when the server process is told to shut down.

    Servers that shut down gracefully on SIGINT/SIGTERM (uvicorn, hypercorn serving in-process)
    wait for open responses to finish, so an endless stream keeps them alive until a second signal
    (uvicorn #451). Each response, as it starts, makes sure the handler installed by the server is
    chained behind ours. Where no such handler exists in this process (hypercorn's CLI worker, a
    server running outside the main thread), the server's own cancellation is the only way out;
    that is logged once, and the cancellation path still closes iterators and runs background tasks.
    """

    def __init__(self) -> None:
        self._live: dict[Callable[[], object], Callable[..., object]] = {}
        self._checked_for: object = None
        self._hooked_now = False
        self._stopping_all = False
        self._fallback_logged = False

    def add(self, on_shutdown: Callable[[], object]) -> None:
        """Call ``on_shutdown()`` in this event loop's thread when the shutdown signal arrives (at
        once if it has already arrived), until ``discard(on_shutdown)``."""
        owner, call_soon = _thread_safe_caller()
        if owner is not self._checked_for:
            # Looking at the handlers costs more than a small response: once per event loop.
            self._checked_for = owner
            self._hooked_now = self._hook()
        if self._hooked_now:
            if self._stopping_all:
                on_shutdown()
            self._live[on_shutdown] = call_soon

    def discard(self, on_shutdown: Callable[[], object]) -> None:
        self._live.pop(on_shutdown, None)

    def shut_down(self) -> None:
        # Runs inside a signal handler, between two bytecodes of whatever the main thread was
        # doing: only hand the work to each response's event loop.
        self._stopping_all = True
        for on_shutdown, call_soon in list(self._live.items()):
            call_soon(on_shutdown)

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


shutdown_watch = ShutdownWatch()
