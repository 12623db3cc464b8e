"""Drop-in replacements for ``starlette.responses.StreamingResponse`` and ``FileResponse``.

Each class keeps its parent's constructor, headers and body bytes; what changes is how a call
ends. Intentional divergences from Starlette, each covered by a test that names its number:

1. The disconnect listener runs on every ASGI spec version. Starlette skips it from 2.4 on and
   relies on ``send()`` raising, which never happens while a producer waits for its upstream.
2. ``OSError`` or ``ClientDisconnect`` from ``send()`` ends the response quietly as a
   disconnect instead of escaping to the server log: the client is gone, nothing failed.
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

``StreamingResponse`` also diverges in this way:

14. A producer stopped while it awaits its upstream takes the cancellation once, where it waits:
    from there its own cleanup (a ``finally``, an ``__aexit__`` that closes a client or releases
    a lock) runs shielded, bounded by ``cleanup_timeout``. For this the race drives Starlette's
    ``stream_response`` step by step (``Race.drive``). Under Starlette the cancellation is
    level-triggered (AnyIO's), so that cleanup is cut at its first await.
    Where the stop arrives through a cancelled scope of the producer's own, the cleanup runs as
    under Starlette (README, "Stopping upstream work").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from mimetypes import guess_type
from secrets import token_hex

import anyio
import anyio.to_thread
import starlette.responses
from anyio.abc import TaskGroup
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import ContentStream, MalformedRangeHeader, PlainTextResponse, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from ._race import BackgroundPolicy, Outcome, Race, SyncIterator, close_iterator, current_race, logger


class StreamingResponse(starlette.responses.StreamingResponse):
    """Starlette's ``StreamingResponse`` that ends promptly and cleanly when the client goes away.

    Extra keyword-only arguments: ``send_timeout`` (seconds one ``send()`` may block before the
    client counts as stalled; ``None``, the default, waits forever) and ``background_policy``
    (``"always"``, the default, or ``"completed"``). After the call, ``outcome`` says how the body
    ended and ``bytes_sent`` how many body bytes were handed to the server.
    """

    cleanup_timeout: float = 5.0

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
    ) -> None:
        super().__init__(content, status_code, headers, media_type, background)
        if not isinstance(content, AsyncIterable):  # divergence 5
            self.body_iterator = SyncIterator(content)
        self.send_timeout = send_timeout
        self.background_policy: BackgroundPolicy = background_policy
        self.outcome: Outcome | None = None
        self.bytes_sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        race = Race(self, scope, receive, send)
        await race.respond(self.stream_response, partial(close_iterator, self.body_iterator))

    async def stream_response(self, send: Send) -> None:
        # Starlette's own, driven by the race (divergence 14), which shields the producer's
        # cleanup if the response stops while the producer awaits.
        await current_race().drive(super().stream_response(send))


# FileResponse pacing. Every client looks fast while the socket buffers fill (several MiB on
# loopback), so a client is judged on its rate only once this much went out, over windows of
# _RATE_WINDOW bytes; a window that lasts longer than _RATE_WINDOW / _FAST_RATE ends early, so a
# fast client that slows down is back to small chunks within about 16 ms.
_FAST_AFTER = 8 * 1024 * 1024
_RATE_WINDOW = 4 * 1024 * 1024
_FAST_RATE = 256 * 1024 * 1024

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


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
        transfer = _FileTransfer(self, scope, race)
        await race.respond(transfer.run, transfer.close)

    def generate_multipart(
        self,
        ranges: Sequence[tuple[int, int]],
        boundary: str,
        max_size: int,
        content_type: str,
    ) -> tuple[int, Callable[[int, int], bytes]]:
        # Vendored from Starlette 1.10: before 0.41 the parts were framed with bare "\n".
        boundary_len = len(boundary)
        static_header_part_len = 49 + boundary_len + len(content_type) + len(str(max_size))
        content_length = sum(
            (len(str(start)) + len(str(end - 1)) + static_header_part_len) + (end - start) for start, end in ranges
        ) + (4 + boundary_len)

        def part_header(start: int, end: int) -> bytes:
            return (
                f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{max_size}\r\n\r\n"
            ).encode("latin-1")

        return content_length, part_header

    def _use_range(self, http_if_range: str) -> bool:
        # Vendored from Starlette 1.10 (_should_use_range).
        if http_if_range.startswith("W/"):
            return False
        return http_if_range == self.headers["last-modified"] or http_if_range == self.headers["etag"]

    @classmethod
    def _ranges(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # Vendored from Starlette 1.10 (_parse_range_header): 0.40 parsed with a regex, merged
        # differently and had no cap on the number of ranges.
        try:
            units, range_ = http_range.split("=", 1)
        except ValueError:
            raise MalformedRangeHeader() from None
        if units.strip().lower() != "bytes":
            raise MalformedRangeHeader("Only support bytes range")
        if range_.count(",") + 1 > cls.max_ranges:
            return []
        ranges = _parse_ranges(range_, file_size)
        if len(ranges) == 0:
            raise MalformedRangeHeader("Range header: range must be requested")
        if any(not (0 <= start < file_size) for start, _ in ranges):
            raise RangeNotSatisfiable(file_size)
        if any(start >= end for start, end in ranges):
            raise MalformedRangeHeader("Range header: start must be less than end")
        if len(ranges) == 1:
            return ranges
        ranges.sort()
        result: list[tuple[int, int]] = [ranges[0]]
        for start, end in ranges[1:]:
            last_start, last_end = result[-1]
            if start <= last_end:
                result[-1] = (last_start, max(last_end, end))
            else:
                result.append((start, end))
        return result


def _parse_ranges(range_: str, file_size: int) -> list[tuple[int, int]]:
    # Vendored from Starlette 1.10 (FileResponse._parse_ranges).
    ranges: list[tuple[int, int]] = []
    for part in range_.split(","):
        part = part.strip()
        if not part or part == "-" or "-" not in part:
            continue
        start_str, end_str = part.split("-", 1)
        start_str = start_str.strip()
        end_str = end_str.strip()
        try:
            start = int(start_str) if start_str else max(file_size - int(end_str), 0)
            end = int(end_str) + 1 if start_str and end_str and int(end_str) < file_size else file_size
            ranges.append((start, end))
        except ValueError:
            continue
    return ranges


class _NotARegularFile(Exception):
    pass


class _Pacer:
    """Chooses the chunk size, and whether to read ahead, from the rate the client takes bytes at.

    A slow client gets Starlette's one chunk of ``small`` bytes at a time and nothing read ahead,
    so it costs no more memory than it does under Starlette; a client that proves fast gets chunks
    of ``large`` bytes, and those that come from the disk are read one ahead of the send.
    """

    def __init__(self, small: int, large: int) -> None:
        self.fast = False
        self._small = small
        self._large = large
        self._total = 0
        self._window_bytes = 0
        self._window_start = time.monotonic()

    @property
    def chunk_size(self) -> int:
        return self._large if self.fast else self._small

    def sent(self, nbytes: int) -> None:
        self._total += nbytes
        self._window_bytes += nbytes
        elapsed = time.monotonic() - self._window_start
        if self._window_bytes >= _RATE_WINDOW or elapsed * _FAST_RATE >= _RATE_WINDOW:
            self.fast = self._total >= _FAST_AFTER and self._window_bytes >= elapsed * _FAST_RATE
            self._window_bytes = 0
            self._window_start += elapsed


class _ReadAhead:
    """One read running in a worker thread while the previous chunk is sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = anyio.Event()
        self.data = b""
        self.error: Exception | None = None

    async def run(self, fd: int, offset: int) -> None:
        try:
            self.data = await anyio.to_thread.run_sync(_read_at, fd, self.size, offset)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    async def result(self) -> bytes:
        await self.done.wait()
        error, self.error = self.error, None
        if error is not None:
            # Kept here, the exception would make a cycle with its traceback (Race.respond).
            try:
                raise error
            finally:
                error = None
        return self.data


def _seek_and_read(fd: int, size: int, offset: int) -> bytes:
    # Where os.pread is missing (Windows), seeking is safe: a response has one read in flight.
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


_read_at: Callable[[int, int, int], bytes] = getattr(os, "pread", _seek_and_read)


class _FileTransfer:
    """One call of a ``FileResponse``: the open file, the request's choices and the body's sends."""

    def __init__(self, response: FileResponse, scope: Scope, race: Race) -> None:
        self.response = response
        self.scope = scope
        self.race = race
        self.fd: int | None = None
        self.pacer = _Pacer(response.chunk_size, max(response.chunk_size, response.max_chunk_size))

    def _open(self) -> os.stat_result:
        # Runs in a worker thread that a cancellation waits for, so the descriptor is always
        # recorded for close(). The stat before the open keeps a FIFO or a device from being
        # opened at all; the fstat after it tells what was opened.
        path = os.fspath(self.response.path)
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _NotARegularFile
        self.fd = os.open(path, _OPEN_FLAGS)
        result = os.fstat(self.fd)
        if not stat.S_ISREG(result.st_mode):
            raise _NotARegularFile
        return result

    async def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            await anyio.to_thread.run_sync(os.close, fd)

    async def run(self, send: Send) -> None:
        response = self.response
        scope = self.scope
        try:
            opened = await anyio.to_thread.run_sync(self._open)
        except Exception as exc:  # divergence 9
            refusal = _refusal(exc)
            if refusal is None:
                raise
            status, reason = refusal
            logger.warning("FileResponse cannot serve %s: %s; answering %d", response.path, reason, status)
            await _send_plain(send, HTTPStatus(status).phrase, status)
            return
        if response.stat_result is None:  # divergence 8: the headers describe the open file
            response.set_stat_headers(opened)
            stat_result = opened
        else:
            stat_result = response.stat_result
        size = stat_result.st_size

        scope_type = scope["type"]
        method = scope["method"].upper() if scope_type == "http" else "GET"
        header_only = method == "HEAD"
        pathsend = scope_type == "http" and "http.response.pathsend" in scope.get("extensions", {})
        headers = Headers(scope=scope)
        http_range = headers.get("range")
        http_if_range = headers.get("if-range")
        ranges: list[tuple[int, int]] = []
        if not (
            response.status_code != 200
            or http_range is None
            or method not in ("GET", "HEAD")
            or (http_if_range is not None and not response._use_range(http_if_range))
        ):
            try:
                ranges = response._ranges(http_range, size)
            except MalformedRangeHeader as exc:
                await _send_plain(send, exc.content, 400)
                return
            except RangeNotSatisfiable as exc:
                await _send_plain(send, "", 416, {"Content-Range": f"bytes */{exc.max_size}"})
                return

        if len(ranges) == 0:
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            if header_only:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            elif pathsend:
                await send({"type": "http.response.pathsend", "path": str(response.path)})
                self.race.bytes_sent += size
            else:
                await self._send_parts(send, [(None, 0, size)], None)
        elif len(ranges) == 1:
            start, end = ranges[0]
            range_headers = MutableHeaders(raw=list(response.raw_headers))
            range_headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
            range_headers["content-length"] = str(end - start)
            await send({"type": "http.response.start", "status": 206, "headers": range_headers.raw})
            if header_only:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await self._send_parts(send, [(None, start, end)], None)
        else:
            # In firefox and chrome, they use boundary with 95-96 bits entropy (that's roughly 13 bytes).
            boundary = token_hex(13)
            content_length, part_header = response.generate_multipart(
                ranges, boundary, size, response.headers["content-type"]
            )
            range_headers = MutableHeaders(raw=list(response.raw_headers))
            range_headers["content-type"] = f"multipart/byteranges; boundary={boundary}"
            range_headers["content-length"] = str(content_length)
            await send({"type": "http.response.start", "status": 206, "headers": range_headers.raw})
            if header_only:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                parts = [(part_header(start, end), start, end) for start, end in ranges]
                await self._send_parts(send, parts, f"--{boundary}--".encode("latin-1"))

    async def _send_parts(
        self, send: Send, parts: Sequence[tuple[bytes | None, int, int]], closing: bytes | None
    ) -> None:
        """Send each part's header (if any) and its byte range of the file, then ``closing``.

        The sends run in the calling task and the read-ahead in a child task that never raises,
        so an error or a stop from ``send`` leaves the task group unwrapped, after the read in
        flight (which the descriptor must outlive) has finished.
        """
        error: Exception | None = None
        async with anyio.create_task_group() as task_group:
            try:
                for index, (header, start, end) in enumerate(parts):
                    if header is not None:
                        await send({"type": "http.response.body", "body": header, "more_body": True})
                    last = closing is None and index == len(parts) - 1
                    if not await self._send_range(send, task_group, start, end, last):
                        return
                    if closing is not None:
                        await send({"type": "http.response.body", "body": b"\r\n", "more_body": True})
                if closing is not None:
                    await send({"type": "http.response.body", "body": closing, "more_body": False})
            except Exception as exc:
                error = exc
                task_group.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _send_range(self, send: Send, task_group: TaskGroup, start: int, end: int, last: bool) -> bool:
        """Send bytes ``start`` to ``end`` of the file; ``False`` if it ended before ``end``."""
        fd = self.fd
        assert fd is not None
        position = start
        ahead: _ReadAhead | None = None
        if start == end and last:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        while position < end:
            if ahead is None:
                size = min(self.pacer.chunk_size, end - position)
                chunk = await anyio.to_thread.run_sync(_read_at, fd, size, position)
            else:
                chunk = await ahead.result()
                ahead = None
            if not chunk:
                await self._cut_short(send, end, position)
                return False
            position += len(chunk)
            if self.pacer.fast and position < end:
                # Divergence 11: a fast client's next chunk is read while this one is sent.
                ahead = _ReadAhead(min(self.pacer.chunk_size, end - position))
                task_group.start_soon(ahead.run, fd, position)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last or position < end})
            self.pacer.sent(len(chunk))
        return True

    async def _cut_short(self, send: Send, expected: int, got: int) -> None:
        # Divergence 10. Over HTTP/1 the response is left without its last message, which makes
        # uvicorn and hypercorn close the connection (uvicorn logs one line, no traceback); a last
        # message short of the content-length would raise inside the server instead (and uvicorn's
        # h11 then leaves the client waiting). Over HTTP/2 a last message ends the stream and the
        # client sees the length mismatch; without it the stream would hang.
        logger.warning(
            "FileResponse: %s shrank while it was sent: expected %d bytes, the file ended at %d; response cut short",
            self.response.path,
            expected,
            got,
        )
        if self.scope.get("http_version", "1.1") not in ("1.0", "1.1"):
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.race.stop(Outcome.TRUNCATED)


def _refusal(exc: Exception) -> tuple[int, str] | None:
    """The status and reason for a path that cannot be served, or ``None`` for a server error."""
    if isinstance(exc, _NotARegularFile):
        return 404, "not a regular file"
    if isinstance(exc, PermissionError):
        return 403, exc.strerror or "permission denied"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
        return 404, exc.strerror or "not found"
    if isinstance(exc, ValueError):  # an embedded null byte
        return 404, str(exc)
    return None


async def _send_plain(send: Send, content: str, status: int, headers: Mapping[str, str] | None = None) -> None:
    # The messages of Starlette's PlainTextResponse, sent through the race's send.
    answer = PlainTextResponse(content, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": answer.raw_headers})
    await send({"type": "http.response.body", "body": answer.body})
