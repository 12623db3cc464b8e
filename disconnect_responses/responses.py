"""Drop-in replacements for ``starlette.responses.StreamingResponse`` and ``FileResponse``, and for
``sse_starlette.EventSourceResponse``.

The public classes; how a call ends lives in ``_race.py``, the file transfer in ``_file.py``, the
event encoding in ``_sse.py`` and FastAPI's generator endpoints in ``_fastapi.py``. Each class keeps
its parent's constructor, headers and body bytes; what changes is how a call ends. Intentional
divergences from Starlette (and for ``EventSourceResponse`` from sse-starlette 3.7), each covered
by a test that names its number:

1. The disconnect listener runs on every ASGI spec version. Starlette skips it from 2.4 on and
   relies on ``send()`` raising, which never happens while a producer waits for its upstream.
2. ``OSError`` or ``ClientDisconnect`` from ``send()`` ends the response quietly as a
   disconnect instead of escaping to the server log: the client is gone, nothing failed. Once
   every byte of a declared ``content-length`` was handed over, the response is ``COMPLETED``
   whatever the server reports after (granian reports the disconnect before the empty last message).
   A disconnect while the server holds the last message may be the end of the response: that
   send gets ``cleanup_timeout`` to return (then the response ends as a disconnect), where
   Starlette cancels it at once; hypercorn over HTTP/2 can hold it forever after a stream reset.
3. The guarded ``send`` gives the event loop a turn once 512 KiB went out without one, so a
   producer that never awaits cannot starve the listener and push the rest of its body into a dead
   socket; once the disconnect is known, no further chunk is handed to the server.
4. The body iterator is always closed (``aclose()``, or ``close()`` in a worker thread for a sync
   iterator), shielded and bounded by ``cleanup_timeout``, before the background task starts.
   Starlette never closes a sync iterator and closes an async one only if a cancellation
   happens to land inside it.
5. A sync iterator's ``next()`` runs in a worker thread that a stopped response abandons instead
   of waiting for; the iterator is closed in that thread as soon as ``next()`` returns.
6. The background task runs after a disconnect, a send timeout and an error, not only after a
   completed body (``background_policy="completed"`` restores the old rule); after an outside
   cancellation it runs shielded, bounded by ``cleanup_timeout``.
7. New keyword-only options and attributes: ``send_timeout``, ``background_policy``,
   ``cleanup_timeout``, and after the call ``outcome`` and ``bytes_sent``. One log line on the
   ``disconnect_responses`` logger records each interrupted response.

``FileResponse`` also diverges in these ways:

8. The file is opened once and the open descriptor is ``fstat``-ed: headers, range checks and
   the length sent all describe the file that is read, even if the path is replaced meanwhile;
   a file that grows is served at the opened length. A ``stat_result`` given by the caller still
   sets the headers and the length, as in Starlette. Starlette stats the path, then opens it.
9. A missing path (or one through a non-directory, a loop, a name too long), or one that is not
   a regular file (a directory, a FIFO: never opened), gets a plain ``404 Not Found``; a path it
   may not read gets ``403 Forbidden``; one WARNING names the path and the reason. Nothing is
   sent before, also with ``stat_result`` given or for ``HEAD``. Starlette raises
   ``RuntimeError``, a 500 (with ``stat_result`` given: after the headers went out). Other
   ``OSError``s, such as running out of descriptors, propagate.
10. A file that shrinks while it is sent ends the response after the bytes it still has: over
    HTTP/1 without a last message, so uvicorn and hypercorn close the connection (uvicorn logs
    one line, no traceback); over HTTP/2 with an empty last message, which ends the stream and
    lets the client see the length mismatch (without it the stream hangs). One WARNING gives the
    path, the length expected and where the file ended; the outcome is ``TRUNCATED``, and the
    background task runs as after a disconnect. Starlette's last message short of the
    content-length makes the server raise a protocol error (a traceback; uvicorn's h11 leaves the
    client waiting if the app then returns), or, for several ranges, raises ``RuntimeError``.
11. What the page cache holds is read on the event loop's thread (``os.preadv`` with
    ``RWF_NOWAIT``, which fails rather than wait for the disk), with two turns of the loop after
    each read and send, and the fast downloads on one loop taking turns for these reads and sends;
    only a read that would wait goes to a worker thread, where Starlette pays a
    thread round trip for every 64 KiB. Chunks start at ``chunk_size`` (64 KiB, as Starlette's); a
    client that has taken 8 MiB (socket buffers make every client look fast until then) and whose
    sends wait less than 1 s per 256 MiB gets 512 KiB chunks from the cache, or ``max_chunk_size``
    (4 MiB) from the disk, read while the previous one is sent and sent in 512 KiB slices (after
    a read from the disk, the cache is asked first again). A slow
    client holds one 64 KiB chunk, as under Starlette. The bytes are Starlette's; the message
    boundaries are not (no empty last message when the size is a multiple of 64 KiB).
12. It behaves as Starlette 1.10's on every supported Starlette: the range parsing, ``If-Range``,
    the CRLF multipart framing, the 416's ``content-range: bytes */size`` and the cap of
    100 ranges are vendored; an unknown type is ``application/octet-stream``; there is no
    ``method`` argument.
13. The background task also runs after a 400, 416, 404 or 403 answer (outcome ``COMPLETED``);
    Starlette returns before it for a bad range and raises for a missing file.
    ``http.response.pathsend`` counts the file size in ``bytes_sent``.

``StreamingResponse`` also diverges in these ways:

14. A producer stopped while it awaits its upstream takes the cancellation once, where it waits:
    from there its own cleanup (a ``finally``, an ``__aexit__`` that closes a client or releases
    a lock) runs shielded, bounded by ``cleanup_timeout``. For this the race drives Starlette's
    ``stream_response`` step by step (``Race.drive``). Under Starlette the cancellation is
    level-triggered (AnyIO's), so that cleanup is cut at its first await.
    Where the stop arrives through a cancelled scope of the producer's own, the cleanup runs as
    under Starlette (README, "Stopping upstream work").
15. On the server's shutdown signal (SIGINT or SIGTERM reaching the app's process), an open-ended
    stream (no ``content-length`` header) has ``stopping()`` set at once, and unless it ends by
    itself within ``shutdown_grace`` seconds (0 by default) it is stopped (``SHUTDOWN``) and ended
    with a proper last chunk, so the server can exit: under Starlette it keeps the server alive
    until a second signal. A response with a ``content-length`` (and every ``FileResponse``) is
    left to finish within the server's graceful window, as under Starlette.
16. As the ``response_class`` of a FastAPI generator endpoint, the response iterates and closes the
    endpoint's own async generator instead of FastAPI's relay of it, so the generator's ``finally``
    runs before the background task; closing the relay leaves the generator to the garbage
    collector. Where FastAPI's relay is not as expected, one warning says so (``_fastapi.py``).

``EventSourceResponse`` diverges from sse-starlette's in these ways:

17. Every guarantee of ``StreamingResponse`` above holds for events. sse-starlette lets a producer
    that never awaits run on after the close, never closes a sync iterator, lets ``OSError`` escape
    on ASGI 2.4 and then skips the background task, and raises ``SendTimeoutError`` where the
    outcome here is ``SEND_TIMEOUT``. It learns of a shutdown by patching uvicorn's exit handler
    (``AppStatus``) and ends each stream without its last message (uvicorn logs an ERROR per stream);
    here the shutdown watch (15) works on every server and a stream ends between events with a last
    chunk. Each event is one ``send()``, so any stop falls between events.
18. ``HEAD`` gets the headers and an empty body, and the background task runs, as in sse-starlette
    (its #218); Starlette's ``StreamingResponse`` streams on ``HEAD``, which never ends for an endless
    stream.
19. A ``fastapi.sse.ServerSentEvent`` item is sent as FastAPI sends it, and a pydantic model as its
    JSON; sse-starlette sends ``str()`` of either, which no client can parse.
20. A ping goes out after ``ping`` seconds without an event (FastAPI's rule), not every ``ping``
    seconds: a busy stream needs no keep-alive. It takes turns with the events, never inside one,
    and goes through the guarded ``send``, so a ping to a client that left ends the stream (2) and a
    ping that blocks counts for ``send_timeout``. A NaN interval is refused.
21. ``client_close_handler_callable`` and ``shutdown_event`` are refused with a ``TypeError`` naming
    their replacements (``outcome`` and the background task; ``stopping()``). ``shutdown_grace_period``
    is ``shutdown_grace`` (15). ``cleanup_timeout`` is 5 s by default, as for the other classes (30 s
    in sse-starlette; ``None``: no bound). ``data_sender_callable`` runs beside the stream and is
    cancelled when it ends; its error ends the stream (``ERROR``) and is re-raised.

As the ``response_class`` of a FastAPI generator endpoint, ``EventSourceResponse`` encodes what the
endpoint yields as ``fastapi.sse`` does: JSON ``data`` validated against the return annotation,
FastAPI's line layout and ping (``_fastapi.py``), checked byte for byte against ``fastapi.sse``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence
from email.utils import formatdate
from functools import partial
from mimetypes import guess_type
from typing import Any, cast

import anyio
import starlette.responses
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders
from starlette.responses import ContentStream
from starlette.types import Receive, Scope, Send

from ._fastapi import PING as FASTAPI_PING
from ._fastapi import endpoint_source, event_encoder
from ._file import FileTransfer
from ._iterate import SyncIterator, close_iterator
from ._race import BackgroundPolicy, Outcome, Race
from ._shutdown import checked_grace, grace_from_environment
from ._sse import SEPARATORS, ping_message
from ._sse import encode as encode_event
from ._starlette import generate_multipart


class StreamingResponse(starlette.responses.StreamingResponse):
    """Starlette's ``StreamingResponse`` that ends promptly and cleanly when the client goes away.

    Extra keyword-only arguments: ``send_timeout`` (seconds one ``send()`` may block before the
    client counts as stalled; ``None``, the default, waits forever), ``background_policy``
    (``"always"``, the default, or ``"completed"``) and ``shutdown_grace`` (seconds an open-ended
    stream may run on after the server's shutdown signal; the class attribute by default). After
    the call, ``outcome`` says how the body ended and ``bytes_sent`` how many body bytes were
    handed to the server.
    """

    cleanup_timeout: float = 5.0
    shutdown_grace: float = grace_from_environment()  # divergence 15

    def __init__(
        self,
        content: ContentStream,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        *,
        send_timeout: float | None = None,
        background_policy: BackgroundPolicy = "always",
        shutdown_grace: float | None = None,
    ) -> None:
        super().__init__(endpoint_source(content), status_code, headers, media_type, background)  # divergence 16
        if not isinstance(content, AsyncIterable):  # divergence 5
            self.body_iterator = SyncIterator(content)
        self.send_timeout = send_timeout
        self.background_policy: BackgroundPolicy = background_policy
        if shutdown_grace is not None:
            self.shutdown_grace = checked_grace(shutdown_grace, "shutdown_grace")
        self.outcome: Outcome | None = None
        self.bytes_sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        race = Race(self, scope, receive, send)

        def body(send: Send) -> Awaitable[None]:
            # Starlette's own stream_response, driven by the race (divergence 14), which shields
            # the producer's cleanup if the response stops while the producer awaits.
            return race.drive(self.stream_response(send))

        open_ended = all(name != b"content-length" for name, _ in self.raw_headers)
        shutdown_grace = self.shutdown_grace if open_ended else None  # divergence 15
        await race.respond(body, partial(close_iterator, self.body_iterator), shutdown_grace)


class FileResponse(starlette.responses.FileResponse):
    """Starlette 1.10's ``FileResponse``, on every supported Starlette, ending cleanly and fast.

    Same constructor and the same headers and bytes as Starlette 1.10, plus the keyword-only
    ``send_timeout`` and ``background_policy`` of ``StreamingResponse``. Differences: the file is
    opened once and its open descriptor gives the headers (8); a missing path, a directory or a
    file it may not read gets a 404 or 403 instead of a 500 (9); a file that shrinks ends the
    response early with a warning (10); chunks grow from ``chunk_size`` to ``max_chunk_size`` for a
    client that proves fast (11). After the call, ``outcome`` and ``bytes_sent`` say how it ended
    (``bytes_sent`` is the file size after ``http.response.pathsend``).
    """

    chunk_size = 64 * 1024
    max_chunk_size = 4 * 1024 * 1024
    max_ranges = 100
    cleanup_timeout: float = 5.0

    def __init__(
        self,
        path: str | os.PathLike[str],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        filename: str | None = None,
        stat_result: os.stat_result | None = None,
        content_disposition_type: str = "attachment",
        *,
        send_timeout: float | None = None,
        background_policy: BackgroundPolicy = "always",
    ) -> None:
        if media_type is None:  # divergence 12: Starlette 0.40 guesses "text/plain"
            media_type = guess_type(filename or path)[0] or "application/octet-stream"
        super().__init__(
            path=path,
            status_code=status_code,
            headers=headers,
            media_type=media_type,
            background=background,
            filename=filename,
            stat_result=stat_result,
            content_disposition_type=content_disposition_type,
        )
        self.send_timeout = send_timeout
        self.background_policy: BackgroundPolicy = background_policy
        self.outcome: Outcome | None = None
        self.bytes_sent = 0

    def set_stat_headers(self, stat_result: os.stat_result) -> None:
        content_length = str(stat_result.st_size)
        last_modified = formatdate(stat_result.st_mtime, usegmt=True)
        etag_base = str(stat_result.st_mtime) + "-" + str(stat_result.st_size)
        etag = f'"{hashlib.md5(etag_base.encode(), usedforsecurity=False).hexdigest()}"'
        self.headers.setdefault("content-length", content_length)
        self.headers.setdefault("last-modified", last_modified)
        self.headers.setdefault("etag", etag)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        race = Race(self, scope, receive, send)
        transfer = FileTransfer(self, scope, race)
        await race.respond(transfer.run, transfer.close)

    def generate_multipart(
        self,
        ranges: Sequence[tuple[int, int]],
        boundary: str,
        max_size: int,
        content_type: str,
    ) -> tuple[int, Callable[[int, int], bytes]]:
        return generate_multipart(ranges, boundary, max_size, content_type)  # divergence 12


class EventSourceResponse(StreamingResponse):
    """A stream of Server-Sent Events: sse-starlette's ``EventSourceResponse``, with the guarantees
    of this library's ``StreamingResponse``.

    The same constructor, headers and bytes as ``sse_starlette.EventSourceResponse`` 3.7 for what
    its users yield: ``str``, ``bytes``, a ``dict`` of event fields, a ``ServerSentEvent`` (this
    library's or sse-starlette's; ``fastapi.sse``'s and pydantic models too, 19). As the
    ``response_class`` of a FastAPI endpoint that yields, it encodes as ``fastapi.sse`` does. A
    keep-alive comment goes out after ``ping`` seconds (15 by default; 0: never) without an event
    (20). ``shutdown_grace_period`` is ``shutdown_grace``; ``client_close_handler_callable`` and
    ``shutdown_event`` are refused, ``outcome`` and ``stopping()`` replace them (21). ``HEAD`` gets
    the headers only (18).
    """

    media_type = "text/event-stream"
    DEFAULT_PING_INTERVAL = 15
    DEFAULT_SEPARATOR = "\r\n"

    def __init__(
        self,
        content: AsyncIterable[Any] | Iterable[Any],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str = "text/event-stream",
        background: BackgroundTask | None = None,
        ping: float | None = None,
        sep: str | None = None,
        ping_message_factory: Callable[[], object] | None = None,
        data_sender_callable: Callable[[], Awaitable[None]] | None = None,
        send_timeout: float | None = None,
        client_close_handler_callable: object = None,
        shutdown_event: object = None,
        shutdown_grace_period: float | None = None,
        cleanup_timeout: float | None = 5.0,
        *,
        background_policy: BackgroundPolicy = "always",
    ) -> None:
        for name, value in (  # divergence 21
            ("client_close_handler_callable", client_close_handler_callable),
            ("shutdown_event", shutdown_event),
        ):
            if value is not None:
                raise TypeError(f"EventSourceResponse does not take {name}: {_REPLACED_OPTIONS[name]}")
        if sep not in (None, *SEPARATORS):
            raise ValueError(f"sep must be one of: \\r\\n, \\r, \\n, got: {sep!r}")
        self.sep = sep or self.DEFAULT_SEPARATOR
        all_headers = MutableHeaders(headers=headers)  # sse-starlette's headers, as it sets them
        all_headers.setdefault("Cache-Control", "no-store")
        all_headers["Connection"] = "keep-alive"
        all_headers["X-Accel-Buffering"] = "no"
        super().__init__(
            cast(ContentStream, content),  # items, not chunks: encoded as they are sent
            status_code,
            all_headers,
            media_type,
            background,
            send_timeout=send_timeout,
            background_policy=background_policy,
            shutdown_grace=shutdown_grace_period,
        )
        self.ping_interval = self.DEFAULT_PING_INTERVAL if ping is None else ping
        self.ping_message_factory = ping_message_factory
        self.data_sender_callable = data_sender_callable
        if cleanup_timeout is not None:
            self.cleanup_timeout = checked_grace(cleanup_timeout, "cleanup_timeout")
        else:
            self.cleanup_timeout = math.inf

    @property
    def ping_interval(self) -> float:
        """Seconds without an event after which a keep-alive comment is sent; 0: never."""
        return self._ping_interval

    @ping_interval.setter
    def ping_interval(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError("ping interval must be int or float")
        if not value >= 0:
            raise ValueError("ping interval must be >= 0 (0 disables ping)")
        self._ping_interval = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        race = Race(self, scope, receive, send)
        encode = event_encoder(scope)
        if encode is None:
            encode = partial(encode_event, sep=self.sep)
            ping = self._ping_message
        else:
            ping = _fastapi_ping
        head = scope["type"] == "http" and scope["method"] == "HEAD"  # divergence 18
        interval = self.ping_interval
        last_sent: float | None = None  # no ping before the start is out

        async def events(send: Send) -> None:
            nonlocal last_sent
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if interval:
                last_sent = anyio.current_time()
            if not head:
                async for item in self.body_iterator:
                    message = {"type": "http.response.body", "body": encode(item), "more_body": True}
                    if interval:
                        last_sent = anyio.current_time()
                    await send(message)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def ping_when_idle() -> None:
            # divergence 20: only after ``interval`` without an event, as FastAPI's ping
            nonlocal last_sent
            while True:
                now = anyio.current_time()
                if last_sent is None or now < last_sent + interval:
                    await anyio.sleep(interval if last_sent is None else last_sent + interval - now)
                    continue
                last_sent = now
                await race.send_beside({"type": "http.response.body", "body": ping(), "more_body": True})

        beside: list[Callable[[], Awaitable[None]]] = []
        if interval and not head:
            beside.append(ping_when_idle)
        if self.data_sender_callable is not None and not head:
            beside.append(self.data_sender_callable)

        def body(send: Send) -> Awaitable[None]:
            return race.drive(events(send))  # divergence 14, as for StreamingResponse

        grace = None if head else self.shutdown_grace
        await race.respond(body, partial(close_iterator, self.body_iterator), grace, beside)

    def _ping_message(self) -> bytes:
        message = self.ping_message_factory() if self.ping_message_factory is not None else ping_message(self.sep)
        return encode_event(message, self.sep)


def _fastapi_ping() -> bytes:
    return FASTAPI_PING


# sse-starlette's options that this library's machinery replaces: the replacement, for the error.
_REPLACED_OPTIONS = {
    "client_close_handler_callable": "the background task runs after a disconnect too, and response.outcome "
    "says how the stream ended",
    "shutdown_event": "await disconnect_responses.stopping().wait() in the generator: it is set at the "
    "server's shutdown",
}
