"""Faults on real servers: a producer or a file read that fails mid-body, a background task that
raises, and a file deleted, replaced or truncated while it is sent.

Each test states its invariant. What they share: the failure reaches the server's log as itself
(or, for a shrinking file, as the one warning documented in divergence 10 of ``responses.py``),
the body's iterator or file is closed once before the background task, the background task runs
as the policy says, every wait is bounded, and the server keeps serving afterwards. Server
shutdown with responses in flight is covered by ``test_shutdown.py`` (real server processes, one
SIGTERM).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import h2.exceptions
import pytest
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import disconnect_responses._file
from disconnect_responses import FileResponse, Outcome, StreamingResponse
from disconnect_responses._race import BackgroundPolicy

from .asgi import WAIT, Body, assert_closed_then_background, finished, producer_of, run_recorded
from .servers import (
    SERVER_KINDS,
    UVICORN_INCOMPLETE,
    Download,
    Recorder,
    RunningServer,
    client_fetch,
    download,
    read_then_close,
    serve,
)

HTTP1_KINDS = tuple(kind for kind in SERVER_KINDS if kind != "hypercorn-h2")
CHUNK_SIZE = 64 * 1024
FAIL_AFTER = 4 * 1024 * 1024
FILE_SIZE = 8 * 1024 * 1024 + 321
SHRUNK_SIZE = 1024 * 1024
POLICIES: tuple[BackgroundPolicy, ...] = ("always", "completed")
PRODUCERS = ("awaiting", "never-awaiting", "sync")
HEALTHY = [bytes([index]) * (CHUNK_SIZE + index) for index in range(16)]
HEALTHY_DIGEST = hashlib.sha256(b"".join(HEALTHY)).hexdigest()


class ProducerBroke(Exception):
    pass


class BackgroundBroke(Exception):
    pass


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(FILE_SIZE)


def open_descriptors(path: Path) -> int:
    """How many descriptors of this process point at ``path`` (deleted or not)."""
    target = str(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link in (target, f"{target} (deleted)"):
            count += 1
    return count


def healthy_stream() -> StreamingResponse:
    return StreamingResponse(iter(HEALTHY), media_type="application/octet-stream")


def assert_healthy(server: RunningServer) -> None:
    """The server still serves a whole stream after the fault."""
    answer = download(server.port, "/healthy")
    assert answer.complete and answer.digest == HEALTHY_DIGEST


def logged_exception(server: RunningServer, error: BaseException) -> bool:
    return any(record.exc_info is not None and record.exc_info[1] is error for record in server.log_records)


def tracebacks(server: RunningServer) -> list[str]:
    return [record.getMessage() for record in server.log_records if record.exc_info is not None]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# A producer that raises mid-stream


def failing_producer(kind: str, recorder: Recorder) -> Body:
    """A producer of shape ``kind`` that raises ``ProducerBroke`` after ``FAIL_AFTER`` bytes."""
    return producer_of(
        kind,
        itertools.repeat(b"p" * CHUNK_SIZE, FAIL_AFTER // CHUNK_SIZE),
        functools.partial(recorder.record, "iterator closed"),
        error=ProducerBroke("upstream broke"),
    )


def recording_app(recorder: Recorder, make: Callable[[Scope], StreamingResponse | FileResponse]) -> ASGIApp:
    """Serves ``/healthy`` and, elsewhere, ``make(scope)``; records the response and what it raised."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/healthy":
            await healthy_stream()(scope, receive, send)
            return
        await run_recorded(make(scope), recorder, scope, receive, send)

    return app


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("producer", PRODUCERS)
@pytest.mark.parametrize("kind", HTTP1_KINDS)
def test_producer_raising_mid_stream(kind: str, producer: str, policy: BackgroundPolicy) -> None:
    """The producer raises after 4 MiB while the client reads: the client sees the body end early (the
    server closes), the server logs the producer's own exception, the iterator is closed once, the
    background task runs with the default policy and not with "completed", and another download on
    the same server, running at the same time, completes whole."""
    recorder = Recorder()

    def make(scope: Scope) -> StreamingResponse:
        return StreamingResponse(
            failing_producer(producer, recorder),
            media_type="application/octet-stream",
            background=BackgroundTask(recorder.record, "background ran"),
            background_policy=policy,
        )

    with serve(recording_app(recorder, make), kind) as server:
        other: list[Download] = []
        neighbour = threading.Thread(target=lambda: other.append(download(server.port, "/healthy")))
        neighbour.start()
        broken = download(server.port, "/stream")
        neighbour.join(WAIT)
        response = finished(recorder)
        [error] = recorder.values("app raised")
    assert not broken.complete and broken.received <= FAIL_AFTER
    assert [answer.digest for answer in other if answer.complete] == [HEALTHY_DIGEST]
    assert response.outcome is Outcome.ERROR
    assert type(error) is ProducerBroke
    assert server.app_errors == [error]
    assert logged_exception(server, error), tracebacks(server)
    assert_closed_then_background(recorder, background=policy == "always")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", HTTP1_KINDS)
def test_file_read_error_mid_file(
    kind: str, policy: BackgroundPolicy, file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fails (EIO) 1 MiB into the file: the server logs that ``OSError`` (a read error is not
    a departed client), the file is closed before the background task, which follows the policy."""
    recorder = Recorder()
    real_read_at = disconnect_responses._file._read_at

    def eio() -> OSError:
        return OSError(errno.EIO, "Input/output error")

    def failing_read_at(fd: int, size: int, offset: int) -> bytes:
        if offset >= SHRUNK_SIZE:
            raise eio()
        return real_read_at(fd, size, offset)

    def background() -> None:
        recorder.record("file closed", open_descriptors(file) == 0)
        recorder.record("background ran")

    monkeypatch.setattr(disconnect_responses._file, "_read_at", failing_read_at)
    monkeypatch.setattr(disconnect_responses._file, "_read_cached", disconnect_responses._file._never_cached)

    def make(scope: Scope) -> FileResponse:
        return FileResponse(file, background=BackgroundTask(background), background_policy=policy)

    with serve(recording_app(recorder, make), kind) as server:
        broken = download(server.port, "/file")
        response = finished(recorder)
        [error] = recorder.values("app raised")
        assert_healthy(server)
    assert not broken.complete and broken.received <= SHRUNK_SIZE
    assert response.outcome is Outcome.ERROR
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert server.app_errors == [error]
    assert logged_exception(server, error), tracebacks(server)
    assert open_descriptors(file) == 0
    if policy == "always":
        assert recorder.values("file closed") == [True]
    assert recorder.count("background ran") == (1 if policy == "always" else 0)


# ---------------------------------------------------------------------------------------------
# A background task that raises


@pytest.mark.parametrize("leave", [False, True], ids=["completed", "client-left"])
@pytest.mark.parametrize("response_kind", ["stream", "file"])
@pytest.mark.parametrize("kind", HTTP1_KINDS)
def test_background_task_raising(kind: str, response_kind: str, leave: bool, file: Path, data: bytes) -> None:
    """The background task raises after a complete body (the client already has every byte) or after
    the client left: the exception reaches the server's log as itself, the body was closed before it,
    nothing hangs, and the server goes on serving."""
    recorder = Recorder()

    def background() -> None:
        recorder.record("background ran")
        raise BackgroundBroke("cleanup failed")

    def make(scope: Scope) -> StreamingResponse | FileResponse:
        task = BackgroundTask(background)
        if response_kind == "file":
            return FileResponse(file, background=task)
        return StreamingResponse(recorded_stream(recorder, long=leave), background=task)

    with serve(recording_app(recorder, make), kind) as server:
        if leave:
            read_then_close(server.port, "/", 256 * 1024, rst=True)
        else:
            answer = download(server.port, "/")
            expected = sha256(data) if response_kind == "file" else sha256(b"".join(HEALTHY))
            assert answer.complete and answer.digest == expected
        response = finished(recorder)
        [error] = recorder.values("app raised")
        assert_healthy(server)
    assert response.outcome is (Outcome.DISCONNECTED if leave else Outcome.COMPLETED)
    assert type(error) is BackgroundBroke
    assert server.app_errors == [error]
    assert logged_exception(server, error), tracebacks(server)
    assert recorder.count("background ran") == 1
    if response_kind == "stream":
        assert recorder.index("iterator closed") < recorder.index("background ran")
    assert open_descriptors(file) == 0


def recorded_stream(recorder: Recorder, long: bool) -> Body:
    """The ``HEALTHY`` chunks; ``long`` adds 256 MiB, so that a client leaving after 256 KiB leaves mid-body."""
    chunks = itertools.chain(HEALTHY, itertools.repeat(b"x" * CHUNK_SIZE, 4096 if long else 0))
    return producer_of("awaiting", chunks, functools.partial(recorder.record, "iterator closed"))


# ---------------------------------------------------------------------------------------------
# The file changes while it is sent

REQUESTS: dict[str, list[tuple[str, str]]] = {
    "plain": [],
    "single-range": [("range", "bytes=1000-")],
    "multi-range": [("range", "bytes=0-99,1000-")],
}


def expected_body(request: str, data: bytes, content_type: str | None) -> bytes:
    if request == "plain":
        return data
    if request == "single-range":
        return data[1000:]
    assert content_type is not None
    boundary = content_type.removeprefix("multipart/byteranges; boundary=")
    size = len(data)
    return (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n".encode()
            + data[start:end]
            + b"\r\n"
            for start, end in ((0, 100), (1000, size))
        )
        + f"--{boundary}--".encode()
    )


def changing_file_app(path: Path, recorder: Recorder, change: Callable[[], None]) -> ASGIApp:
    """A FileResponse for ``path`` whose file gets ``change()`` right after the first body message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        changed = False

        async def changing_send(message: Message) -> None:
            nonlocal changed
            await send(message)
            if message["type"] == "http.response.body" and not changed:
                changed = True
                change()

        def background() -> None:
            recorder.record("background ran", open_descriptors(path) == 0)

        await run_recorded(
            FileResponse(path, background=BackgroundTask(background)), recorder, scope, receive, changing_send
        )

    return app


@pytest.mark.parametrize("change", ["deleted", "replaced"])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_file_deleted_or_replaced_mid_transfer_serves_the_original(
    kind: str, change: str, file: Path, data: bytes
) -> None:
    """Divergence 8: the file is opened once and served from that descriptor, so a file deleted, or
    replaced by another of a different size, after the first chunk still yields the original bytes
    at the original length, for plain, single-range and multi-range requests; then it is closed."""
    recorder = Recorder()
    replacement = file.with_name("replacement.bin")

    def apply() -> None:
        if change == "deleted":
            file.unlink()
        else:
            replacement.write_bytes(b"new" * 1000)
            os.replace(replacement, file)

    with serve(changing_file_app(file, recorder, apply), kind) as server:
        for number, (request, headers) in enumerate(REQUESTS.items(), start=1):
            file.write_bytes(data)
            answer = client_fetch(server, "/", headers)
            assert answer.status == (200 if request == "plain" else 206)
            assert answer.body == expected_body(request, data, answer.header("content-type")), request
            recorder.wait_for("background ran", timeout=WAIT, count=number)
    assert [response.outcome for response in recorder.values("response")] == [Outcome.COMPLETED] * 3  # type: ignore[attr-defined]
    assert recorder.values("background ran") == [True] * 3
    server.assert_no_errors()


@pytest.mark.parametrize("shrunk_to", [SHRUNK_SIZE, 0])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_file_truncated_mid_transfer_ends_cleanly(
    kind: str, shrunk_to: int, file: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Divergence 10, for plain, single-range and multi-range requests, the file cut to 1 MiB or to
    nothing after the first body message: the client gets what the file still had and then the end of
    the connection (HTTP/1) or stream (HTTP/2), within the client's timeout (never a hang); the
    response reports TRUNCATED, the shortfall is logged once as a warning, the file is closed before
    the background task, which runs once; the server logs no traceback (uvicorn logs its one line
    about a response that was not completed)."""
    caplog.set_level(logging.WARNING, logger="disconnect_responses")
    recorder = Recorder()

    def shrink() -> None:
        os.truncate(file, shrunk_to)

    with serve(changing_file_app(file, recorder, shrink), kind) as server:
        for number, (request, headers) in enumerate(REQUESTS.items(), start=1):
            file.write_bytes(data)
            if server.http2:
                with pytest.raises((ConnectionError, h2.exceptions.ProtocolError)):
                    client_fetch(server, "/", headers)
            else:
                answer = download(server.port, "/", headers=headers)
                assert not answer.complete, request
                assert answer.received <= len(expected_body(request, data, answer.head.header("content-type")))
            recorder.wait_for("background ran", timeout=WAIT, count=number)
    outcomes = [response.outcome for response in recorder.values("response")]  # type: ignore[attr-defined]
    assert outcomes == [Outcome.TRUNCATED] * 3
    assert recorder.values("background ran") == [True] * 3
    shortfalls = [record for record in caplog.records if "shrank while it was sent" in record.getMessage()]
    assert len(shortfalls) == 3 and all(record.levelno == logging.WARNING for record in shortfalls)
    assert tracebacks(server) == []
    assert server.errors() == ([UVICORN_INCOMPLETE] * 3 if kind.startswith("uvicorn") else [])
