"""FileResponse's own behaviour, with hand-written ASGI servers (``receive``/``send``) on asyncio and trio."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from starlette.background import BackgroundTask
from starlette.types import Message, Scope

import disconnect_responses._file
from disconnect_responses import FileResponse, Outcome, stopping

from .asgi import WATCHDOG, FakeServer, call, call_then_cancel
from .servers import OpenedFiles, http_scope

pytestmark = pytest.mark.anyio

SIZE = 3 * 1024 * 1024 + 123
LOGGER = "disconnect_responses"


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


def append(path: Path, extra: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(extra)


class Background:
    """A background task that records whether the file was closed when it started."""

    def __init__(self, opened: OpenedFiles) -> None:
        self.opened = opened
        self.runs: list[bool] = []

    def __call__(self) -> None:
        self.runs.append(self.opened.closed())

    def task(self) -> BackgroundTask:
        return BackgroundTask(self)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client counts as fast after the first 128 KiB: large chunks (256 KiB, so that a test file
    holds several), read ahead from the disk and sent in 100 KiB slices."""
    monkeypatch.setattr(FileResponse, "max_chunk_size", 256 * 1024)
    monkeypatch.setattr(disconnect_responses._file, "_SEND_SLICE", 100 * 1024)
    monkeypatch.setattr(disconnect_responses._file, "_FAST_AFTER", 128 * 1024)
    monkeypatch.setattr(disconnect_responses._file, "_RATE_WINDOW", 64 * 1024)
    monkeypatch.setattr(disconnect_responses._file, "_FAST_RATE", 1)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """No read is answered from the page cache: every read goes to a worker thread, as from a disk."""
    monkeypatch.setattr(disconnect_responses._file, "_read_cached", disconnect_responses._file._never_cached)


needs_nowait = pytest.mark.skipif(
    disconnect_responses._file._read_cached is disconnect_responses._file._never_cached,
    reason="no RWF_NOWAIT reads here",
)

RANGES = [
    pytest.param([], id="plain"),
    pytest.param([("range", "bytes=1000-")], id="single-range"),
    pytest.param([("range", "bytes=0-99,1000-")], id="multi-range"),
]


# Completion


@pytest.mark.parametrize("source", ["cache", "disk"])
@pytest.mark.parametrize("speed", ["slow", "fast"])
@pytest.mark.parametrize("headers", RANGES)
async def test_divergence_11_bytes_identical_at_every_pace(
    request: pytest.FixtureRequest,
    file: Path,
    data: bytes,
    opened: OpenedFiles,
    headers: list[tuple[str, str]],
    speed: str,
    source: str,
) -> None:
    """Whatever the chunk size and read path, the body is the file's bytes, and the file is closed."""
    if speed == "fast":
        request.getfixturevalue("fast")
    if source == "disk":
        request.getfixturevalue("disk")
    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer()
    await call(response, server, http_scope(headers))
    if not headers:
        assert server.body == data
    elif headers[0][1] == "bytes=1000-":
        assert server.body == data[1000:]
    else:
        assert data[:100] in server.body
        assert data[1000:] in server.body
    assert server.messages[-1]["more_body"] is False
    assert all(message["more_body"] for message in server.messages[1:-1])
    assert response.outcome is Outcome.COMPLETED
    assert background.runs == [True]
    sizes = {len(message["body"]) for message in server.body_messages if len(message["body"]) > 200}
    if speed == "fast":
        # A fast client's chunks grow past chunk_size, up to max_chunk_size or what is left.
        assert max(sizes) > FileResponse.chunk_size
        assert max(sizes) <= FileResponse.max_chunk_size
    else:
        assert sizes <= {
            FileResponse.chunk_size,
            (SIZE - 1000) % FileResponse.chunk_size,
            SIZE % FileResponse.chunk_size,
        }


async def test_divergence_11_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    server = FakeServer()
    response = FileResponse(path)
    await call(response, server)
    assert server.messages[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]
    assert response.outcome is Outcome.COMPLETED


# Disconnects


@pytest.mark.parametrize("speed", ["slow", "fast"])
@pytest.mark.parametrize("headers", RANGES)
async def test_divergence_3_disconnect_stops_within_one_chunk(
    request: pytest.FixtureRequest, file: Path, opened: OpenedFiles, headers: list[tuple[str, str]], speed: str
) -> None:
    """After http.disconnect, at most one more body chunk reaches the server; then close, then background."""
    if speed == "fast":
        request.getfixturevalue("fast")
    sent_after: list[Message] = []

    async def disconnect_at_half(server: FakeServer, message: Message) -> None:
        if server.gone.is_set():
            sent_after.append(message)
        elif len(server.body) > SIZE // 2:
            server.leave()
        await anyio.lowlevel.checkpoint()

    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer(on_body=disconnect_at_half)
    await call(response, server, http_scope(headers))
    assert response.outcome is Outcome.DISCONNECTED
    assert len(sent_after) <= 1
    # A send cancelled inside the server is not counted.
    assert response.bytes_sent in (len(server.body), len(server.body) - len(server.messages[-1]["body"]))
    assert background.runs == [True]


@pytest.mark.parametrize("headers", RANGES)
async def test_divergence_2_oserror_on_send_with_spec_2_4(
    file: Path, opened: OpenedFiles, headers: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """Spec 2.4: send() raises OSError once the client has gone; nothing escapes, the cleanup runs."""

    async def gone_after_first_chunk(server: FakeServer, message: Message) -> None:
        if len(server.body_messages) >= 2:
            server.leave()
            raise OSError(errno.EPIPE, "client gone")

    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer(on_body=gone_after_first_chunk)
    with caplog.at_level(logging.INFO, LOGGER):
        await call(response, server, http_scope(headers, spec_version="2.4"))
    assert response.outcome is Outcome.DISCONNECTED
    assert background.runs == [True]
    assert [record.levelname for record in caplog.records if record.name == LOGGER] == ["INFO"]


async def test_divergence_6_background_policy_completed_skips_after_disconnect(file: Path, opened: OpenedFiles) -> None:
    async def gone(server: FakeServer, message: Message) -> None:
        raise OSError(errno.ECONNRESET, "reset")

    background = Background(opened)
    response = FileResponse(file, background=background.task(), background_policy="completed")
    await call(response, FakeServer(on_body=gone), http_scope(spec_version="2.4"))
    assert response.outcome is Outcome.DISCONNECTED
    assert background.runs == []
    assert opened.closed()


@pytest.mark.usefixtures("fast", "disk")
async def test_divergence_11_disconnect_during_a_read_waits_for_it(
    file: Path, opened: OpenedFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read still running in a worker thread is waited for: the descriptor outlives it, then closes."""
    reading = anyio.Event()
    release = threading.Event()
    real_read_at = disconnect_responses._file._read_at
    fd_valid_after_release: list[bool] = []

    def held_read_at(fd: int, size: int, offset: int) -> bytes:
        if offset >= 1024 * 1024 and not release.is_set():
            anyio.from_thread.run_sync(reading.set)
            release.wait(WATCHDOG)
            fd_valid_after_release.append(not opened.closed())
        return real_read_at(fd, size, offset)

    monkeypatch.setattr(disconnect_responses._file, "_read_at", held_read_at)
    stopping_events: list[anyio.Event] = []

    async def capture_stopping(server: FakeServer, message: Message) -> None:
        if not stopping_events:
            stopping_events.append(stopping())

    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer(on_body=capture_stopping)

    async def disconnect_while_reading() -> None:
        await reading.wait()
        server.leave()
        await stopping_events[0].wait()
        release.set()

    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(disconnect_while_reading)
            await response(http_scope(), server.receive, server.send)
    assert fd_valid_after_release == [True]
    assert response.outcome is Outcome.DISCONNECTED
    assert background.runs == [True]


# Send timeout and cancellation


@pytest.mark.parametrize("headers", RANGES)
async def test_divergence_7_send_timeout_lets_a_stalled_client_go(
    file: Path, opened: OpenedFiles, headers: list[tuple[str, str]]
) -> None:
    async def stall_after_first_chunk(server: FakeServer, message: Message) -> None:
        if len(server.body_messages) >= 2:
            await anyio.sleep_forever()

    background = Background(opened)
    response = FileResponse(file, background=background.task(), send_timeout=0.05)
    await call(response, FakeServer(on_body=stall_after_first_chunk), http_scope(headers))
    assert response.outcome is Outcome.SEND_TIMEOUT
    assert background.runs == [True]


async def test_divergence_6_external_cancellation_closes_the_file_and_runs_the_background(
    file: Path, opened: OpenedFiles
) -> None:
    sending = anyio.Event()

    async def block(server: FakeServer, message: Message) -> None:
        sending.set()
        await anyio.sleep_forever()

    background = Background(opened)
    response = FileResponse(file, background=background.task())
    await call_then_cancel(response, FakeServer(on_body=block), when=sending.wait)
    assert response.outcome is Outcome.CANCELLED
    assert background.runs == [True]


# Open once, fstat the descriptor (divergence 8)


async def test_divergence_8_headers_come_from_the_open_file(file: Path, data: bytes, opened: OpenedFiles) -> None:
    """The file is replaced after the open: headers and bytes still describe the file that was opened."""

    async def replace_after_start(server: FakeServer, message: Message) -> None:
        if len(server.body_messages) == 1:
            replacement = file.with_name("replacement")
            replacement.write_bytes(b"short")
            os.replace(replacement, file)

    server = FakeServer(on_body=replace_after_start)
    response = FileResponse(file)
    await call(response, server)
    assert dict(server.messages[0]["headers"])[b"content-length"] == str(SIZE).encode()
    assert server.body == data
    assert len(opened.fds) == 1


async def test_divergence_8_a_growing_file_is_served_at_its_opened_length(file: Path, data: bytes) -> None:
    async def grow(server: FakeServer, message: Message) -> None:
        if len(server.body_messages) == 1:
            append(file, b"more" * 100_000)

    server = FakeServer(on_body=grow)
    response = FileResponse(file)
    await call(response, server)
    assert server.body == data
    assert server.messages[-1]["more_body"] is False
    assert response.outcome is Outcome.COMPLETED


async def test_divergence_8_stat_result_given_sets_the_length(file: Path, data: bytes) -> None:
    """A stat_result given by the caller wins, as in Starlette: it sets the headers and the length sent."""
    small = os.stat_result((0o100644, 0, 0, 1, 0, 0, 1000, 0, 0, 0))
    server = FakeServer()
    await call(FileResponse(file, stat_result=small), server)
    assert dict(server.messages[0]["headers"])[b"content-length"] == b"1000"
    assert server.body == data[:1000]


# Paths that cannot be served (divergence 9)


async def assert_answers_plain(response: FileResponse, status: int, text: bytes, scope: Scope | None = None) -> None:
    """Called once, ``response`` answers ``status`` with ``text`` as plain text, and sends nothing else."""
    server = FakeServer()
    await call(response, server, scope)
    assert server.messages == [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(text)).encode()), (b"content-type", b"text/plain; charset=utf-8")],
        },
        {"type": "http.response.body", "body": text},
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER and record.levelname == "WARNING"]


def assert_warned(caplog: pytest.LogCaptureFixture, *fragments: str) -> None:
    """The library logged one warning, and it says each of ``fragments``."""
    (warning,) = warnings_of(caplog)
    for fragment in fragments:
        assert fragment in warning


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_divergence_9_missing_file_is_404(
    tmp_path: Path, opened: OpenedFiles, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    path = tmp_path / "missing.bin"
    background = Background(opened)
    response = FileResponse(path, background=background.task())
    await assert_answers_plain(response, 404, b"Not Found", http_scope(method=method))
    assert response.outcome is Outcome.COMPLETED
    assert background.runs == [True]
    assert_warned(caplog, str(path), "404")


async def test_divergence_9_missing_file_with_stat_result_is_404(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette would send the headers from the given stat_result, then fail; nothing is sent here first."""
    path = tmp_path / "missing.bin"
    given = os.stat_result((0o100644, 0, 0, 1, 0, 0, 1000, 0, 0, 0))
    await assert_answers_plain(FileResponse(path, stat_result=given), 404, b"Not Found")
    assert len(warnings_of(caplog)) == 1


async def test_divergence_9_directory_is_404(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await assert_answers_plain(FileResponse(tmp_path), 404, b"Not Found")
    assert_warned(caplog, str(tmp_path), "not a regular file")


async def test_divergence_9_fifo_is_404_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    await assert_answers_plain(FileResponse(path), 404, b"Not Found")


async def test_divergence_9_path_below_a_file_is_404(file: Path) -> None:
    await assert_answers_plain(FileResponse(file / "below"), 404, b"Not Found")


async def test_divergence_9_permission_denied_is_403(
    file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tests may run as root, for whom a mode of 000 denies nothing: the open is made to fail instead.
    def denied(path: str, flags: int, *args: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", denied)
    await assert_answers_plain(FileResponse(file), 403, b"Forbidden")
    assert_warned(caplog, str(file), "Permission denied")


async def test_divergence_9_other_errors_propagate(file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of descriptors is a server error, not a missing file: it propagates as in Starlette."""

    def exhausted(path: str, flags: int, *args: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "open", exhausted)
    server = FakeServer()
    response = FileResponse(file)
    with pytest.raises(OSError, match="Too many open files"):
        await call(response, server)
    assert server.messages == []
    assert response.outcome is Outcome.ERROR


# A file that shrinks (divergence 10)


@pytest.mark.parametrize("headers", RANGES)
@pytest.mark.parametrize("http_version", ["1.1", "2"])
async def test_divergence_10_shrinking_file_is_cut_short(
    file: Path,
    data: bytes,
    opened: OpenedFiles,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[str, str]],
    http_version: str,
) -> None:
    """The bytes sent are the file's; HTTP/1 ends without a last message, HTTP/2 with an empty one."""

    async def shrink_after_first_chunk(server: FakeServer, message: Message) -> None:
        if len(server.body_messages) == 1:
            os.truncate(file, 200_000)

    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer(on_body=shrink_after_first_chunk)
    with caplog.at_level(logging.INFO, LOGGER):
        await call(response, server, http_scope(headers, http_version=http_version))
    assert response.outcome is Outcome.TRUNCATED
    assert background.runs == [True]
    assert server.body.endswith(data[1000 if headers else 0 : 200_000])
    if http_version == "1.1":
        assert all(message["more_body"] for message in server.body_messages)
    else:
        assert server.body_messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert all(message["more_body"] for message in server.body_messages[:-1])
    assert_warned(caplog, str(file), "the file ended at 200000")


async def test_divergence_10_policy_completed_skips_the_background_when_cut_short(file: Path) -> None:
    async def shrink(server: FakeServer, message: Message) -> None:
        os.truncate(file, 100)

    runs: list[str] = []
    response = FileResponse(file, background=BackgroundTask(runs.append, "ran"), background_policy="completed")
    await call(response, FakeServer(on_body=shrink))
    assert response.outcome is Outcome.TRUNCATED
    assert runs == []


# Divergence 13: the background task runs after every answer


@pytest.mark.parametrize("value", ["bytes=9999999-", "bytes=5-1"])
async def test_divergence_13_background_runs_after_400_and_416(file: Path, opened: OpenedFiles, value: str) -> None:
    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer()
    await call(response, server, http_scope([("range", value)]))
    assert server.messages[0]["status"] in (400, 416)
    assert response.outcome is Outcome.COMPLETED
    assert background.runs == [True]


async def test_head_and_pathsend_close_the_file_before_the_background(file: Path, opened: OpenedFiles) -> None:
    for scope in (http_scope(method="HEAD"), http_scope(extensions={"http.response.pathsend": {}})):
        background = Background(opened)
        response = FileResponse(file, background=background.task())
        await call(response, FakeServer(), scope)
        assert response.outcome is Outcome.COMPLETED
        assert background.runs == [True]


def iter_chunks(messages: list[Message]) -> Iterator[int]:
    for message in messages:
        if message["type"] == "http.response.body":
            yield len(message["body"])


async def test_divergence_11_slow_client_never_gets_large_chunks(file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client below the rate threshold stays on 64 KiB chunks with nothing read ahead."""
    monkeypatch.setattr(disconnect_responses._file, "_FAST_AFTER", 0)
    monkeypatch.setattr(disconnect_responses._file, "_RATE_WINDOW", 64 * 1024)
    monkeypatch.setattr(disconnect_responses._file, "_FAST_RATE", 1 << 60)
    server = FakeServer()
    await call(FileResponse(file), server)
    assert max(iter_chunks(server.messages)) == FileResponse.chunk_size


@needs_nowait
async def test_divergence_11_what_the_cache_holds_is_read_without_a_worker_thread(
    file: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test file was just written, so the page cache holds it: no read goes to a worker thread."""

    def no_thread_read(fd: int, size: int, offset: int) -> bytes:
        raise AssertionError("a read that the page cache answers went to a worker thread")

    monkeypatch.setattr(disconnect_responses._file, "_read_at", no_thread_read)
    server = FakeServer()
    response = FileResponse(file)
    await call(response, server)
    assert server.body == data
    assert response.outcome is Outcome.COMPLETED


@needs_nowait
@pytest.mark.usefixtures("fast")
async def test_divergence_11_a_fast_client_returns_to_the_cache_after_a_few_evicted_pages(
    file: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages missing from the cache in the middle of the file are read in a worker thread, and the
    rest of the file, which the cache holds, is read from the cache again: one disk read, no
    read-ahead into what the cache holds."""
    evicted = range(SIZE // 2, SIZE // 2 + 4096)
    read_cached = disconnect_responses._file._read_cached
    thread_reads: list[int] = []

    def cache_missing_a_page(fd: int, buffer: memoryview, offset: int) -> int | None:
        if offset <= evicted.start < offset + len(buffer) or offset in evicted:
            return None
        return read_cached(fd, buffer, offset)

    def read_at(fd: int, size: int, offset: int) -> bytes:
        thread_reads.append(offset)
        return os.pread(fd, size, offset)

    monkeypatch.setattr(disconnect_responses._file, "_read_cached", cache_missing_a_page)
    monkeypatch.setattr(disconnect_responses._file, "_read_at", read_at)
    server = FakeServer()
    await call(FileResponse(file), server)
    assert server.body == data
    # The one chunk holding the missing page (256 KiB, read in slices of 100 KiB), nothing after it.
    assert thread_reads and thread_reads[0] <= evicted.start
    assert thread_reads[-1] - thread_reads[0] < FileResponse.max_chunk_size


@pytest.mark.usefixtures("fast")
async def test_divergence_11_fast_downloads_on_one_loop_take_turns_and_all_complete(file: Path, data: bytes) -> None:
    servers = [FakeServer() for _ in range(4)]
    responses = [FileResponse(file) for _ in servers]
    async with anyio.create_task_group() as task_group:
        for response, server in zip(responses, servers, strict=True):
            task_group.start_soon(call, response, server)
    assert all(server.body == data for server in servers)
    assert all(response.outcome is Outcome.COMPLETED for response in responses)
    assert not disconnect_responses._file._turns().busy


async def waiting_for(turns: disconnect_responses._file._Turns, count: int) -> None:
    while len(turns.waiting) < count:
        await anyio.lowlevel.checkpoint()


async def test_divergence_11_a_download_stopped_while_it_waits_for_its_turn_passes_it_on() -> None:
    """Turns go in the order asked; a download stopped while it waits leaves the queue, and one
    stopped just as the turn was handed to it hands it on: no download waits forever."""
    turns = disconnect_responses._file._Turns()
    got: list[str] = []

    async def download(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            await turns.take()
            got.append(name)
            turns.hand_over()

    await turns.take()
    with anyio.fail_after(WATCHDOG):
        async with anyio.create_task_group() as task_group:
            stopped_waiting, stopped_when_handed = anyio.CancelScope(), anyio.CancelScope()
            task_group.start_soon(download, "stopped while waiting", stopped_waiting)
            task_group.start_soon(download, "stopped when handed the turn", stopped_when_handed)
            task_group.start_soon(download, "next")
            await waiting_for(turns, 3)
            stopped_waiting.cancel()
            turns.hand_over()
            stopped_when_handed.cancel()
    # On trio a task already woken with the turn runs on: it took the turn and handed it over.
    assert got in (["next"], ["stopped when handed the turn", "next"])
    assert not turns.busy and not turns.waiting


@needs_nowait
@pytest.mark.parametrize(
    ("error", "tries"),
    [
        pytest.param(errno.EAGAIN, "every chunk", id="would-wait"),
        pytest.param(errno.EOPNOTSUPP, "once", id="file-system-cannot-tell"),
        pytest.param(errno.EINVAL, "once", id="kernel-cannot-tell"),
        pytest.param(errno.EIO, "error", id="disk-error"),
    ],
)
async def test_divergence_11_a_read_that_cannot_be_made_without_waiting_goes_to_a_thread(
    file: Path, data: bytes, opened: OpenedFiles, error: int, tries: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that would wait goes to a worker thread, each time; a file system that cannot read
    without waiting is asked once per response; any other error is the response's error."""
    calls: list[int] = []

    def refuse(fd: int, buffers: list[memoryview], offset: int, flags: int) -> int:
        calls.append(offset)
        raise BlockingIOError(error, "would wait") if error == errno.EAGAIN else OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "preadv", refuse)
    background = Background(opened)
    response = FileResponse(file, background=background.task())
    server = FakeServer()
    if tries == "error":
        with pytest.raises(OSError, match=os.strerror(error)):
            await call(response, server)
        assert response.outcome is Outcome.ERROR
    else:
        await call(response, server)
        assert server.body == data
        assert response.outcome is Outcome.COMPLETED
        assert len(calls) == (1 if tries == "once" else len(server.body_messages))
    assert background.runs == [True]


def test_divergence_11_a_client_whose_sends_never_wait_is_fast_one_whose_sends_wait_is_not() -> None:
    """Flow control, not a client's rate, tells a slow client: sends that never wait make a client
    fast even when the windows take long (other clients share the core); sends that wait do not."""
    waits = {"busy core": 0.0, "slow client": 0.05}
    for label, waited in waits.items():
        pacer = disconnect_responses._file._Pacer(64 * 1024, 4 * 1024 * 1024)
        for _ in range(2 * disconnect_responses._file._FAST_AFTER // (64 * 1024)):
            pacer.sent(64 * 1024, waited)
        assert pacer.fast is (label == "busy core"), label
