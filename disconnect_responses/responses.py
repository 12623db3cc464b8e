"""Drop-in replacements for ``starlette.responses.StreamingResponse`` and ``FileResponse``.

The public classes; how a call ends lives in ``_race.py``, the file transfer in ``_file.py``. Each
class keeps its parent's constructor, headers and body bytes; what changes is how a call
ends. Intentional divergences from Starlette, each covered by a test that names its number:

1. The disconnect listener runs on every ASGI spec version. Starlette skips it from 2.4 on and
   relies on ``send()`` raising, which never happens while a producer waits for its upstream.
2. ``OSError`` or ``ClientDisconnect`` from ``send()`` ends the response quietly as a
   disconnect instead of escaping to the server log: the client is gone, nothing failed. Once
   every byte of a declared ``content-length`` was handed over, the response is ``COMPLETED``
   whatever the server reports after (granian reports the disconnect before the empty last message).
3. The guarded ``send`` gives the event loop a turn every 512 KiB, so a producer that never
   awaits cannot starve the listener and push the rest of its body into a dead socket; once the
   disconnect is known, no further chunk is handed to the server.
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
11. Reads are ``os.pread`` calls in worker threads. Chunks start at ``chunk_size`` (64 KiB, as
    Starlette's) and grow to ``max_chunk_size`` (4 MiB) only for a client that has taken 8 MiB
    (socket buffers make every client look fast until then) and keeps taking at least 256 MiB/s;
    for such a client the next chunk is read while the current one is sent. A slow client holds
    one 64 KiB chunk, as under Starlette, where each 64 KiB costs a worker thread round trip
    whatever the client's pace. The bytes are Starlette's; the message boundaries are not (no
    empty last message when the size is a multiple of 64 KiB).
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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from email.utils import formatdate
from functools import partial
from mimetypes import guess_type

import starlette.responses
from starlette.background import BackgroundTask
from starlette.responses import ContentStream
from starlette.types import Receive, Scope, Send

from ._file import FileTransfer
from ._iterate import SyncIterator, close_iterator
from ._race import BackgroundPolicy, Outcome, Race
from ._shutdown import checked_grace, grace_from_environment
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
        super().__init__(content, status_code, headers, media_type, background)
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
