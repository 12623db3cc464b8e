"""The file transfer behind ``FileResponse``: opening, answering, pacing and reading ahead.

Private. One ``FileTransfer`` serves one call: it opens the file once (divergence 8), answers a
path it cannot serve or a bad range before anything is sent (9, 13), picks the whole file, one
range or several as Starlette 1.10 does, and sends the bytes, read from the page cache on the
event loop's thread or, where that would wait for the disk, in worker threads, paced by the client
(11), ending early if the file shrinks (10). Every send goes through the race's guarded ``send``.
Changes when how a file is read or sent changes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from secrets import token_hex
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import MalformedRangeHeader, PlainTextResponse, RangeNotSatisfiable
from starlette.types import Scope, Send

from ._race import Outcome, Race
from ._starlette import parse_range_header, should_use_range

if TYPE_CHECKING:
    from .responses import FileResponse

logger = logging.getLogger("disconnect_responses")

# FileResponse pacing. A server's send() waits when the client does not take the bytes as fast as
# they come (flow control), so the time spent in send() per byte tells a slow client from a fast
# one, also when many share the CPU (a client's own rate then says more about the others). Every
# client looks fast while the socket buffers fill (several MiB on loopback), so a client is judged
# only once this much went out, over windows of _RATE_WINDOW bytes; a window that lasts longer
# than _RATE_WINDOW / _FAST_RATE ends early, so a fast client that slows down is back to small
# chunks within about 16 ms.
_FAST_AFTER = 8 * 1024 * 1024
_RATE_WINDOW = 4 * 1024 * 1024
_FAST_RATE = 256 * 1024 * 1024
# A large chunk is read in one worker-thread call and sent in slices of at most this size, each
# followed by a turn of the event loop (the race's send gives one every 512 KiB): one send() of
# 4 MiB would hold the loop about 1.5 ms, and every other request with it.
_SEND_SLICE = 512 * 1024
# A read the page cache can answer is made on the event loop's thread: a worker-thread round trip
# (about 100 us) costs more than copying 128 KiB, and RWF_NOWAIT makes the read fail rather than
# wait for the disk. One such read is at most _CACHED_READ bytes: the kernel's cost per send()
# (waking the client) halves the CPU per GB from 128 KiB to 512 KiB sends. A read and its send
# hold the loop about 0.2 ms, and are followed by two turns of the loop (_send_range).
_CACHED_READ = 512 * 1024


class _NotARegularFile(Exception):
    pass


class _Pacer:
    """Chooses the chunk size, and whether to read ahead, from how long the client's sends wait.

    A slow client gets Starlette's one chunk of ``small`` bytes at a time and nothing read ahead,
    so it costs no more memory than it does under Starlette; a client whose sends keep taking at
    least ``_FAST_RATE`` bytes per second of waiting gets chunks of ``large`` bytes, and those that
    come from the disk are read one ahead of the send.
    """

    def __init__(self, small: int, large: int) -> None:
        self.fast = False
        self._small = small
        self._large = large
        self._total = 0
        self._window_bytes = 0
        self._window_waited = 0.0
        self._window_start = time.monotonic()

    @property
    def chunk_size(self) -> int:
        return self._large if self.fast else self._small

    def sent(self, nbytes: int, waited: float) -> None:
        """Count ``nbytes`` that one send() took ``waited`` seconds to hand over."""
        self._total += nbytes
        self._window_bytes += nbytes
        self._window_waited += waited
        elapsed = time.monotonic() - self._window_start
        if self._window_bytes >= _RATE_WINDOW or elapsed * _FAST_RATE >= _RATE_WINDOW:
            self.fast = self._total >= _FAST_AFTER and self._window_bytes >= self._window_waited * _FAST_RATE
            self._window_bytes = 0
            self._window_waited = 0.0
            self._window_start += elapsed


class _ReadAhead:
    """One read running in a worker thread while the previous chunk is sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = anyio.Event()
        self.data: list[bytes] = []
        self.error: Exception | None = None

    async def run(self, fd: int, offset: int) -> None:
        try:
            self.data = await anyio.to_thread.run_sync(_read_slices, fd, self.size, offset)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    async def result(self) -> list[bytes]:
        await self.done.wait()
        error, self.error = self.error, None
        if error is not None:
            # Kept here, the exception would make a cycle with its traceback (Race.respond).
            try:
                raise error
            finally:
                error = None
        return self.data


class _Turns:
    """Whose turn it is to read and send a large chunk from the cache, among the fast downloads on
    one event loop: one at a time, in the order they asked, and a loop turn without file work
    after each, so that any number of downloads holds up a small request as one does."""

    def __init__(self) -> None:
        self.busy = False
        self.waiting: deque[anyio.Event] = deque()

    async def take(self) -> None:
        if not self.busy:
            self.busy = True
            return
        handed = anyio.Event()
        self.waiting.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.hand_over()  # handed over, and stopped before it could use the turn
            else:
                self.waiting.remove(handed)
            raise

    def hand_over(self) -> None:
        if self.waiting:
            self.waiting.popleft().set()
        else:
            self.busy = False


_turns_of_loop: anyio.lowlevel.RunVar[_Turns] = anyio.lowlevel.RunVar("disconnect_responses.file_turns")


def _turns() -> _Turns:
    try:
        return _turns_of_loop.get()
    except LookupError:
        turns = _Turns()
        _turns_of_loop.set(turns)
        return turns


def _read_slices(fd: int, size: int, offset: int) -> list[bytes]:
    """Up to ``size`` bytes at ``offset``, as slices of at most ``_SEND_SLICE`` bytes, in one call
    (one worker-thread round trip); fewer bytes if the file ends first."""
    slices = []
    end = offset + size
    while offset < end:
        data = _read_at(fd, min(_SEND_SLICE, end - offset), offset)
        if not data:
            break
        slices.append(data)
        offset += len(data)
    return slices


def _read_nowait(fd: int, buffer: memoryview, offset: int) -> int | None:
    """Read into ``buffer`` at ``offset`` what the page cache holds (0 at the end of the file), or
    ``None`` where the read would wait for the disk. A file system that cannot tell raises one of
    ``_NOWAIT_UNSUPPORTED``."""
    try:
        return os.preadv(fd, [buffer], offset, _RWF_NOWAIT)
    except BlockingIOError:
        return None


class _Scratch(threading.local):
    buffer: mmap.mmap | None = None


_scratch_of_thread = _Scratch()


def _scratch(offset: int, size: int) -> memoryview:
    """Where a read on the event loop's thread lands before it is copied into its chunk: one buffer
    per thread (a read and its copy never await), so no transfer holds one of its own. It starts
    at the file offset's place in a page: a kernel copy to a destination 16 bytes past the
    source's place in its page runs at a quarter of the speed (4 KiB aliasing), as a bytearray's
    would."""
    start = offset % mmap.PAGESIZE
    buffer = _scratch_of_thread.buffer
    if buffer is None or len(buffer) < start + size:
        buffer = _scratch_of_thread.buffer = mmap.mmap(-1, max(_CACHED_READ, size) + mmap.PAGESIZE)
    return memoryview(buffer)[start : start + size]


def _never_cached(fd: int, buffer: memoryview, offset: int) -> int | None:
    return None


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_read_cached: Callable[[int, memoryview, int], int | None] = (
    _read_nowait if _RWF_NOWAIT and hasattr(os, "preadv") else _never_cached
)


def _seek_and_read(fd: int, size: int, offset: int) -> bytes:
    # Where os.pread is missing (Windows), seeking is safe: a response has one read in flight.
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


_read_at: Callable[[int, int, int], bytes] = getattr(os, "pread", _seek_and_read)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)

# One part of a body: a header sent before it (a multipart part's), and the file's bytes start to end.
Part = tuple[bytes | None, int, int]


class FileTransfer:
    """One call of a ``FileResponse``: the open file, the request's choices and the body's sends."""

    def __init__(self, response: FileResponse, scope: Scope, race: Race) -> None:
        self.response = response
        self.scope = scope
        self.race = race
        race.time_sends = True  # the pacer judges a client by how long its sends take
        self.fd: int | None = None
        # At most this much per read on the loop's thread; until the file system says it cannot.
        self.cached_read: int | None = max(_CACHED_READ, response.chunk_size)
        self.pacer = _Pacer(response.chunk_size, max(response.chunk_size, response.max_chunk_size))
        http = scope["type"] == "http"
        self.method = scope["method"].upper() if http else "GET"
        self.pathsend = http and "http.response.pathsend" in scope.get("extensions", {})

    async def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            await anyio.to_thread.run_sync(os.close, fd)

    async def run(self, send: Send) -> None:
        size = await self._open_or_refuse(send)
        if size is None:
            return
        try:
            ranges = self._requested_ranges(size)
        except MalformedRangeHeader as exc:
            await _send_plain(send, exc.content, 400)
            return
        except RangeNotSatisfiable as exc:
            await _send_plain(send, "", 416, {"Content-Range": f"bytes */{exc.max_size}"})
            return
        if len(ranges) == 0:
            await self._send_whole(send, size)
        elif len(ranges) == 1:
            await self._send_single_range(send, size, *ranges[0])
        else:
            await self._send_multiple_ranges(send, size, ranges)

    async def _open_or_refuse(self, send: Send) -> int | None:
        """Open the file and set the headers from it; the size to serve, or ``None`` once a path
        that cannot be served was answered (divergence 9)."""
        response = self.response
        try:
            opened = await anyio.to_thread.run_sync(self._open)
        except Exception as exc:
            refusal = _refusal(exc)
            if refusal is None:
                raise
            status, reason = refusal
            logger.warning("FileResponse cannot serve %s: %s; answering %d", response.path, reason, status)
            await _send_plain(send, HTTPStatus(status).phrase, status)
            return None
        if response.stat_result is not None:
            return response.stat_result.st_size
        response.set_stat_headers(opened)  # divergence 8: the headers describe the open file
        return opened.st_size

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

    def _requested_ranges(self, size: int) -> list[tuple[int, int]]:
        response = self.response
        headers = Headers(scope=self.scope)
        http_range = headers.get("range")
        http_if_range = headers.get("if-range")
        if (
            response.status_code != 200
            or http_range is None
            or self.method not in ("GET", "HEAD")
            or (
                http_if_range is not None
                and not should_use_range(http_if_range, response.headers["last-modified"], response.headers["etag"])
            )
        ):
            return []
        return parse_range_header(http_range, size, response.max_ranges)

    async def _send_whole(self, send: Send, size: int) -> None:
        response = self.response
        if self.pathsend and self.method != "HEAD":
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.pathsend", "path": str(response.path)})
            self.race.bytes_sent += size
            return
        await self._respond(send, response.status_code, response.raw_headers, [(None, 0, size)], None)

    async def _send_single_range(self, send: Send, size: int, start: int, end: int) -> None:
        headers = MutableHeaders(raw=list(self.response.raw_headers))
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        headers["content-length"] = str(end - start)
        await self._respond(send, 206, headers.raw, [(None, start, end)], None)

    async def _send_multiple_ranges(self, send: Send, size: int, ranges: list[tuple[int, int]]) -> None:
        response = self.response
        # In firefox and chrome, they use boundary with 95-96 bits entropy (that's roughly 13 bytes).
        boundary = token_hex(13)
        content_length, part_header = response.generate_multipart(
            ranges, boundary, size, response.headers["content-type"]
        )
        headers = MutableHeaders(raw=list(response.raw_headers))
        headers["content-type"] = f"multipart/byteranges; boundary={boundary}"
        headers["content-length"] = str(content_length)
        parts = [(part_header(start, end), start, end) for start, end in ranges]
        await self._respond(send, 206, headers.raw, parts, f"--{boundary}--".encode("latin-1"))

    async def _respond(
        self,
        send: Send,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        parts: Sequence[Part],
        closing: bytes | None,
    ) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if self.method == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await self._send_parts(send, parts, closing)

    async def _send_parts(self, send: Send, parts: Sequence[Part], closing: bytes | None) -> None:
        """Send each part's header (if any) and its byte range of the file, then ``closing``.

        The sends run in the calling task and the read-ahead in a child task that never raises,
        so an error or a stop from ``send`` leaves the task group unwrapped, after the read in
        flight (which the descriptor must outlive) has finished. A body that ends before the
        pacer can call its client fast reads nothing ahead, and needs no task group (most files
        are small, and a task group costs more than sending one).
        """
        if sum(end - start for _, start, end in parts) <= _FAST_AFTER:
            await self._send_each_part(send, None, parts, closing)
            return
        error: Exception | None = None
        async with anyio.create_task_group() as task_group:
            try:
                await self._send_each_part(send, task_group, parts, closing)
            except Exception as exc:
                error = exc
                task_group.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _send_each_part(
        self, send: Send, task_group: TaskGroup | None, parts: Sequence[Part], closing: bytes | None
    ) -> None:
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

    async def _send_range(self, send: Send, task_group: TaskGroup | None, start: int, end: int, last: bool) -> bool:
        """Send bytes ``start`` to ``end`` of the file; ``False`` if it ended before ``end``."""
        fd = self.fd
        assert fd is not None
        position = start
        ahead: _ReadAhead | None = None
        turns: _Turns | None = None
        if start == end and last:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        while position < end:
            size = min(self.pacer.chunk_size, end - position)
            if ahead is None:
                if self.pacer.fast:
                    # A large chunk from the cache waits for its turn among the fast downloads.
                    if turns is None:
                        turns = _turns()
                    await turns.take()
                    try:
                        sent = await self._send_cached(send, fd, size, position, end, last)
                    finally:
                        turns.hand_over()
                else:
                    sent = await self._send_cached(send, fd, size, position, end, last)
                if sent:
                    position += sent
                    # The second turn: what the poll of the sockets woke runs before more file work.
                    await self.race.checkpoint()
                    continue
                slices = await anyio.to_thread.run_sync(_read_slices, fd, size, position)
            else:
                slices = await ahead.result()
                ahead = None
            if not slices:
                await self._cut_short(send, end, position)
                return False
            read_to = position + sum(map(len, slices))
            if self.pacer.fast and read_to < end and not self._in_cache(fd, read_to):
                # Divergence 11: a fast client's next chunk from the disk is read while this one is
                # sent (where the cache holds it, it is read from there: a few evicted pages must not
                # send the rest of the file through worker threads).
                assert task_group is not None  # for mypy: a body this long has one (_send_parts)
                ahead = _ReadAhead(min(self.pacer.chunk_size, end - read_to))
                task_group.start_soon(ahead.run, fd, read_to)
            for data in slices:
                position += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": not last or position < end})
                self.pacer.sent(len(data), self.race.send_took)
        return True

    async def _send_cached(self, send: Send, fd: int, size: int, position: int, end: int, last: bool) -> int:
        """Read up to ``size`` bytes at ``position`` from the page cache on the loop's thread and send
        them, then give the loop a turn (the read gave none); how many bytes, 0 if the cache does not
        hold them. With the turn after the caller's, what the next poll of the sockets wakes runs
        in a turn without file work (a small request needs several turns, and would otherwise wait
        behind a read and send in each)."""
        data = self._from_cache(fd, size, position)
        if data:
            await send(
                {"type": "http.response.body", "body": data, "more_body": not last or position + len(data) < end}
            )
            self.pacer.sent(len(data), self.race.send_took)
            await self.race.checkpoint()
        return len(data)

    def _from_cache(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes (at most ``cached_read``) at ``offset`` if the page cache holds
        them, else ``b""``."""
        read = self._cached_view(fd, size, offset)
        return bytes(read) if read is not None else b""

    def _in_cache(self, fd: int, offset: int) -> bool:
        """Whether the page cache holds the byte at ``offset``."""
        return self._cached_view(fd, 1, offset) is not None

    def _cached_view(self, fd: int, size: int, offset: int) -> memoryview | None:
        if self.cached_read is None:
            return None
        buffer = _scratch(offset, min(size, self.cached_read))
        try:
            read = _read_cached(fd, buffer, offset)
        except OSError as exc:
            if exc.errno not in _NOWAIT_UNSUPPORTED:
                raise
            self.cached_read = None  # this file system cannot read without waiting: ask no more
            return None
        return buffer[:read] if read else None

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
