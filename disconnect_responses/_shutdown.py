"""The shutdown watch: a server's SIGINT or SIGTERM reaches the open-ended streams it waits for.

Private. An open-ended stream registers a callback with ``shutdown_watch.add`` while it runs and
removes it with ``discard``; the watch knows nothing else about responses (what the callback does,
the grace before the stream is ended, is the race's). It chains a handler in front of the one the
server installed, so the server's own shutdown goes on as before: responses of known length finish
in the server's graceful window, as under Starlette. Also here: the process-wide default grace,
from ``DISCONNECT_RESPONSES_SHUTDOWN_GRACE``. Changes when servers change how they install their
signal handlers.

Pinned assumptions (``tests/test_assumptions.py``):

S1. uvicorn installs its handlers with ``signal.signal`` in the main thread of each worker process;
    ``loop.add_signal_handler`` (granian, hypercorn's asyncio worker) leaves asyncio's no-op
    Python handler in ``signal.getsignal()`` and wakes the loop through the wakeup fd, which a
    handler chained in front of it does not disturb.
S2. ``loop.call_soon_threadsafe`` and trio's ``TrioToken.run_sync_soon`` may be called from a
    signal handler; the callback they run may read the loop's clock (``loop.time()``,
    ``trio.current_time()``) and set a cancel scope's deadline in it. AnyIO's own functions are not
    usable there: under uvloop it finds no backend outside a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType

logger = logging.getLogger("disconnect_responses")

GRACE_VARIABLE = "DISCONNECT_RESPONSES_SHUTDOWN_GRACE"


def grace_from_environment(environ: Mapping[str, str] = os.environ) -> float:
    """The default shutdown grace in seconds: ``$DISCONNECT_RESPONSES_SHUTDOWN_GRACE``, else 0."""
    value = environ.get(GRACE_VARIABLE, "").strip()
    return 0.0 if not value else checked_grace(value, GRACE_VARIABLE)


def checked_grace(value: object, name: str) -> float:
    """``value`` as a grace in seconds; ``ValueError`` naming ``name`` unless it is a number >= 0."""
    try:
        grace = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        grace = math.nan
    if not grace >= 0 or math.isinf(grace):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return grace


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
    """Calls registered responses back when the server process is told to shut down.

    Servers that shut down gracefully on SIGINT/SIGTERM (uvicorn, gunicorn's uvicorn worker,
    granian, hypercorn serving in-process) wait for open responses to finish, so an endless stream
    keeps them alive until a second signal (uvicorn #451). Each registration makes sure the handler
    installed by the server is chained behind ours. Where no such handler exists in this process
    (hypercorn's CLI worker, a server running outside the main thread), the server's own
    cancellation is the only way out; that is logged once, and the cancellation path still closes
    iterators and runs background tasks.
    """

    def __init__(self) -> None:
        self._live: dict[Callable[[float], object], tuple[Callable[..., object], Callable[[], float]]] = {}
        self._checked_for: object = None
        self._hooked_now = False
        self._stopping_all = False
        self._fallback_logged = False
        self._simulations = 0

    def add(self, on_shutdown: Callable[[float], object]) -> None:
        """Call ``on_shutdown(now)`` in this event loop's thread when the shutdown signal arrives (at
        once if it has already arrived), until ``discard(on_shutdown)``; ``now`` is the time on the
        loop's clock, the one its cancel scopes' deadlines are in."""
        owner, call_soon, clock = _loop_access()
        if owner is not self._checked_for:
            # Looking at the handlers costs more than a small response: once per event loop.
            self._checked_for = owner
            self._hooked_now = self._hook()
        if self._hooked_now or self._simulations:
            if self._stopping_all:
                on_shutdown(clock())
            self._live[on_shutdown] = call_soon, clock

    def discard(self, on_shutdown: Callable[[float], object]) -> None:
        self._live.pop(on_shutdown, None)

    def shut_down(self) -> None:
        # Runs inside a signal handler, between two bytecodes of whatever the main thread was
        # doing: only hand the work to each response's event loop.
        self._stopping_all = True
        for on_shutdown, (call_soon, clock) in list(self._live.items()):
            call_soon(_call_with_time, on_shutdown, clock)

    @contextlib.contextmanager
    def simulation(self) -> Iterator[None]:
        """While open, responses register whatever signal handlers the process has, and
        ``shut_down()`` may be called directly (disconnect_responses.testing). A simulation starts
        before any shutdown, and on exit the shutdown is over."""
        if not self._simulations:
            self._stopping_all = False
        self._simulations += 1
        try:
            yield
        finally:
            self._simulations -= 1
            if not self._simulations:
                self._stopping_all = False

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


def _loop_access() -> tuple[object, Callable[..., object], Callable[[], float]]:
    """The running event loop (or trio token), its way to run a callback from a signal handler, and
    its clock."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trio = sys.modules["trio"]
        token = trio.lowlevel.current_trio_token()
        return token, token.run_sync_soon, trio.current_time
    return loop, loop.call_soon_threadsafe, loop.time


def _call_with_time(on_shutdown: Callable[[float], object], clock: Callable[[], float]) -> None:
    on_shutdown(clock())


shutdown_watch = ShutdownWatch()
