"""FileResponse behind real servers on loopback: uvicorn (h11, httptools) and hypercorn (asyncio, trio, HTTP/2).

Clients read part of a file and leave (close, RST, or an HTTP/2 stream reset) or read it all. The
app records, through a ``Recorder``, the response's outcome and whether the file descriptor was
closed when the background task started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.exceptions
import pytest
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disconnect_responses import FileResponse, Outcome

from .servers import SERVER_KINDS, OpenedFiles, Recorder, Response, client_fetch, partial_read_with_headers, serve

SIZE = 8 * 1024 * 1024 + 321
PARTIAL = 256 * 1024

REQUESTS = {
    "plain": [],
    "single-range": [("range", "bytes=1000-")],
    "multi-range": [("range", "bytes=0-99,1000-")],
}


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


def file_app(
    path: Path, recorder: Recorder, opened: OpenedFiles, on_body: Callable[[Message], None] | None = None
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def watched_send(message: Message) -> None:
            await send(message)
            if on_body is not None and message["type"] == "http.response.body":
                on_body(message)

        def background() -> None:
            recorder.record("background", opened.closed())

        response = FileResponse(path, background=BackgroundTask(background))
        try:
            await response(scope, receive, watched_send)
        finally:
            recorder.record("outcome", response.outcome)

    return app


def expected_body(response: Response, data: bytes, request: str) -> bytes:
    if request == "plain":
        return data
    if request == "single-range":
        return data[1000:]
    content_type = response.header("content-type")
    assert content_type is not None
    boundary = content_type.removeprefix("multipart/byteranges; boundary=")
    parts = [(0, 100), (1000, SIZE)]
    return (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{SIZE}\r\n\r\n".encode()
            + data[start:end]
            + b"\r\n"
            for start, end in parts
        )
        + f"--{boundary}--".encode()
    )


def leave_modes(kind: str) -> Iterator[tuple[str, bool]]:
    for request in REQUESTS:
        yield request, False
    if kind != "hypercorn-h2":
        yield "plain", True


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_divergence_4_client_leaving_mid_file_closes_it_before_the_background(
    kind: str, file: Path, opened: OpenedFiles
) -> None:
    """Plain, single-range and multi-range requests, left after 256 KiB of 8 MiB: the response
    stops as DISCONNECTED, the file is closed when the background task starts, which runs once,
    and the server logs no error."""
    recorder = Recorder()
    expected_runs = 0
    with serve(file_app(file, recorder, opened), kind) as server:
        for request, rst in leave_modes(kind):
            with partial_read_with_headers(server, "/", PARTIAL, REQUESTS[request], rst=rst) as count:
                assert count >= PARTIAL
                expected_runs += 1
                # hypercorn over HTTP/2 may take the whole file before the reset and then hold the
                # last send: the response ends after cleanup_timeout (Race._listen_for_disconnect).
                recorder.wait_for("outcome", timeout=FileResponse.cleanup_timeout + 5, count=expected_runs)
            assert recorder.values("outcome")[-1] is Outcome.DISCONNECTED, request
    assert recorder.values("background") == [True] * expected_runs
    assert recorder.count("outcome") == expected_runs
    server.assert_no_errors()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_completed_downloads_are_byte_identical(kind: str, file: Path, data: bytes, opened: OpenedFiles) -> None:
    recorder = Recorder()
    with serve(file_app(file, recorder, opened), kind) as server:
        for number, (request, headers) in enumerate(REQUESTS.items(), start=1):
            response = client_fetch(server, "/", headers)
            assert response.status == (200 if request == "plain" else 206)
            assert response.body == expected_body(response, data, request), request
            recorder.wait_for("outcome", count=number)
    assert recorder.values("outcome") == [Outcome.COMPLETED] * len(REQUESTS)
    assert recorder.values("background") == [True] * len(REQUESTS)
    server.assert_no_errors()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_divergence_10_shrinking_file_ends_the_response(kind: str, file: Path, opened: OpenedFiles) -> None:
    """The file loses all but 1 MiB after the first chunk: the client gets the 1 MiB the file still
    has and then the end of the connection (HTTP/1) or of the stream (HTTP/2), not a hang; the
    background task runs. uvicorn logs that the app returned without completing the response (one
    line, no traceback); hypercorn logs nothing."""
    recorder = Recorder()

    def shrink(message: Message) -> None:
        if recorder.count("shrunk") == 0:
            os.truncate(file, 1024 * 1024)
            recorder.record("shrunk")

    with serve(file_app(file, recorder, opened, shrink), kind) as server:
        with pytest.raises((ConnectionError, h2.exceptions.ProtocolError)) as caught:
            client_fetch(server, "/")
        recorder.wait_for("outcome")
    if not server.http2:
        assert f"body ended after {1024 * 1024} of {SIZE} bytes" in str(caught.value)
    assert recorder.values("outcome") == [Outcome.TRUNCATED]
    assert recorder.values("background") == [True]
    expected = ["uvicorn.error ERROR: ASGI callable returned without completing response."]
    assert server.errors() == (expected if kind.startswith("uvicorn") else [])
