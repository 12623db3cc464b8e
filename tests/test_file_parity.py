"""FileResponse sends what Starlette 1.10's FileResponse sends: headers and bytes, request by request.

Each case runs both classes on one file with raw ASGI calls and compares the start message and the
joined body (chunk boundaries are ours to choose; multipart boundaries are random and normalised).
The comparison needs Starlette 1.10 or later; the explicit expectations run on every version.
"""

from __future__ import annotations

import hashlib
import os
import re
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import starlette
import starlette.responses
from starlette.types import Message, Scope

from disconnect_responses import FileResponse, Outcome
from disconnect_responses.testing import request

from .asgi import messages_of
from .servers import http_scope

pytestmark = pytest.mark.anyio

STARLETTE_1_10 = tuple(int(part) for part in starlette.__version__.split(".")[:2]) >= (1, 10)
needs_starlette_1_10 = pytest.mark.skipif(
    not STARLETTE_1_10, reason=f"parity is with Starlette 1.10's FileResponse; {starlette.__version__} is installed"
)
SIZE = 200_003
BOUNDARY = re.compile(rb"[0-9a-f]{26}")


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


async def ours_and_theirs(file: Path, scope: Scope, **kwargs: Any) -> tuple[list[Message], list[Message]]:
    """The messages our ``FileResponse`` and Starlette's, made with the same arguments, send for ``scope``."""
    ours = await messages_of(FileResponse(file, **kwargs), scope)
    theirs = await messages_of(starlette.responses.FileResponse(file, **kwargs), scope)
    return ours, theirs


def normalise(messages: list[Message]) -> tuple[str, int, list[tuple[bytes, bytes]], bytes, list[str]]:
    """The start message, the joined body and the closing message types, boundaries replaced."""
    start, *rest = messages
    body = b"".join(message.get("body", b"") for message in rest)
    headers = [(key, BOUNDARY.sub(b"BOUNDARY", value)) for key, value in start["headers"]]
    tail = [message["type"] for message in rest if not message.get("more_body", False)]
    return start["type"], start["status"], headers, BOUNDARY.sub(b"BOUNDARY", body), tail


def header(messages: list[Message], name: str) -> str | None:
    for key, value in messages[0]["headers"]:
        if key == name.encode():
            return str(value.decode("latin-1"))
    return None


def etag_of(path: Path) -> str:
    result = os.stat(path)
    return '"' + hashlib.md5(f"{result.st_mtime}-{result.st_size}".encode(), usedforsecurity=False).hexdigest() + '"'


RANGE_CASES = [
    pytest.param([], id="no-range"),
    pytest.param([("range", "bytes=0-99")], id="first-100"),
    pytest.param([("range", "bytes=-100")], id="suffix"),
    pytest.param([("range", "bytes=100000-")], id="open-ended"),
    pytest.param([("range", "bytes=100-5000000")], id="end-past-size"),
    pytest.param([("range", "bytes=0-9,20-29")], id="two-ranges"),
    pytest.param([("range", "bytes=0-50, 40-90,200-210,-5")], id="merged-ranges"),
    pytest.param([("range", "bytes=0-0,abc,-,5")], id="junk-parts-ignored"),
    pytest.param([("range", "bytes=" + ",".join(f"{n}-{n}" for n in range(0, 202, 2)))], id="too-many-ranges"),
    pytest.param([("range", "bytes=300000-")], id="416"),
    pytest.param([("range", "bytes=5-1")], id="400-start-after-end"),
    pytest.param([("range", "items=0-1")], id="400-units"),
    pytest.param([("range", "bytes=")], id="400-empty"),
    pytest.param([("range", "bytes 0-1")], id="400-no-equals"),
]


@needs_starlette_1_10
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("headers", RANGE_CASES)
async def test_same_messages_as_starlette(file: Path, headers: list[tuple[str, str]], method: str) -> None:
    ours, theirs = await ours_and_theirs(file, http_scope(headers, method))
    assert normalise(ours) == normalise(theirs)


@needs_starlette_1_10
@pytest.mark.parametrize(
    "if_range",
    [pytest.param("etag", id="etag"), pytest.param("date", id="date"), "W/weak", '"other"', "garbage"],
)
async def test_if_range_as_starlette(file: Path, if_range: str) -> None:
    value = {"etag": etag_of(file), "date": formatdate(os.stat(file).st_mtime, usegmt=True)}.get(if_range, if_range)
    ours, theirs = await ours_and_theirs(file, http_scope([("range", "bytes=0-9"), ("if-range", value)]))
    assert normalise(ours) == normalise(theirs)


@needs_starlette_1_10
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"filename": "report.pdf"}, id="ascii-filename"),
        pytest.param({"filename": "rapport d'été €.txt"}, id="non-ascii-filename"),
        pytest.param({"filename": "a.txt", "content_disposition_type": "inline"}, id="inline"),
        pytest.param({"media_type": "image/png", "headers": {"x-extra": "1"}}, id="media-type-headers"),
        pytest.param({"status_code": 404}, id="status-404"),
        pytest.param({"headers": {"etag": '"mine"', "cache-control": "no-cache"}}, id="own-etag"),
    ],
)
async def test_constructor_arguments_as_starlette(file: Path, kwargs: dict[str, object]) -> None:
    for headers in ([], [("range", "bytes=0-9")], [("range", "bytes=0-9,20-29")]):
        ours, theirs = await ours_and_theirs(file, http_scope(headers), **kwargs)
        assert normalise(ours) == normalise(theirs)


@needs_starlette_1_10
async def test_stat_result_given_as_starlette(file: Path, data: bytes) -> None:
    result = os.stat(file)
    for headers in ([], [("range", "bytes=10-19")]):
        ours, theirs = await ours_and_theirs(file, http_scope(headers), stat_result=result)
        assert normalise(ours) == normalise(theirs)


@needs_starlette_1_10
@pytest.mark.parametrize("headers", [[], [("range", "bytes=0-9")], [("range", "bytes=0-9,20-29")]])
async def test_pathsend_as_starlette(file: Path, headers: list[tuple[str, str]]) -> None:
    ours, theirs = await ours_and_theirs(file, http_scope(headers, extensions={"http.response.pathsend": {}}))
    assert [message["type"] for message in ours][-1] == [message["type"] for message in theirs][-1]
    assert normalise(ours) == normalise(theirs)


@needs_starlette_1_10
@pytest.mark.parametrize("headers", [[], [("range", "bytes=0-9")]])
async def test_websocket_denial_as_starlette(file: Path, headers: list[tuple[str, str]]) -> None:
    scope: Scope = {**http_scope(headers), "type": "websocket"}
    del scope["method"]
    ours, theirs = await ours_and_theirs(file, scope)
    assert normalise(ours) == normalise(theirs)


# Explicit expectations: these hold whatever Starlette is installed (0.40's own class differs).


async def test_plain_get(file: Path, data: bytes) -> None:
    response = FileResponse(file)
    messages = await messages_of(response, http_scope())
    assert messages[0]["status"] == 200
    assert header(messages, "content-length") == str(SIZE)
    assert header(messages, "content-type") == "application/octet-stream"
    assert header(messages, "accept-ranges") == "bytes"
    assert header(messages, "etag") == etag_of(file)
    assert header(messages, "last-modified") == formatdate(os.stat(file).st_mtime, usegmt=True)
    assert b"".join(message["body"] for message in messages[1:]) == data
    assert messages[-1]["more_body"] is False
    assert response.outcome is Outcome.COMPLETED
    assert response.bytes_sent == SIZE


async def test_head_sends_headers_only(file: Path, data: bytes) -> None:
    response = FileResponse(file)
    messages = await messages_of(response, http_scope(method="HEAD"))
    assert header(messages, "content-length") == str(SIZE)
    assert messages[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]
    assert response.outcome is Outcome.COMPLETED
    assert response.bytes_sent == 0


async def test_single_range(file: Path, data: bytes) -> None:
    result = await request(FileResponse(file), headers={"range": "bytes=-100"})
    assert result.status == 206
    assert result.headers["content-range"] == f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}"
    assert result.headers["content-length"] == "100"
    assert result.body == data[-100:]


async def test_multiple_ranges_use_crlf_framing(file: Path, data: bytes) -> None:
    result = await request(FileResponse(file), headers={"range": "bytes=20-29,0-9,5-14"})
    boundary = result.headers["content-type"].removeprefix("multipart/byteranges; boundary=")
    assert re.fullmatch("[0-9a-f]{26}", boundary)
    expected = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-14/{SIZE}\r\n\r\n".encode()
        + data[0:15]
        + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n".encode()
        + f"Content-Range: bytes 20-29/{SIZE}\r\n\r\n".encode()
        + data[20:30]
        + f"\r\n--{boundary}--".encode()
    )
    assert result.body == expected
    assert result.headers["content-length"] == str(len(expected))


async def test_416_names_the_size(file: Path, data: bytes) -> None:
    messages = await messages_of(FileResponse(file), http_scope([("range", "bytes=300000-")]))
    assert messages[0]["status"] == 416
    assert header(messages, "content-range") == f"bytes */{SIZE}"
    assert messages[1] == {"type": "http.response.body", "body": b""}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("bytes=5-1", b"Range header: start must be less than end"),
        ("items=0-1", b"Only support bytes range"),
        ("bytes=", b"Range header: range must be requested"),
        ("bytes 0-1", b"Malformed range header."),
    ],
)
async def test_400_for_a_malformed_range(file: Path, value: str, text: bytes) -> None:
    messages = await messages_of(FileResponse(file), http_scope([("range", value)]))
    assert messages[0]["status"] == 400
    assert header(messages, "content-type") == "text/plain; charset=utf-8"
    assert messages[1] == {"type": "http.response.body", "body": text}


async def test_too_many_ranges_send_the_whole_file(file: Path, data: bytes) -> None:
    ranges = ",".join(f"{n}-{n}" for n in range(0, 202, 2))
    result = await request(FileResponse(file), headers={"range": f"bytes={ranges}"})
    assert (result.status, result.body) == (200, data)


async def test_if_range_mismatch_sends_the_whole_file(file: Path, data: bytes) -> None:
    mismatched = await request(FileResponse(file), headers={"range": "bytes=0-9", "if-range": '"other"'})
    assert mismatched.status == 200
    matched = await request(FileResponse(file), headers={"range": "bytes=0-9", "if-range": etag_of(file)})
    assert matched.status == 206


async def test_content_disposition(file: Path, data: bytes) -> None:
    plain = await request(FileResponse(file, filename="a b.txt"))
    assert plain.headers["content-disposition"] == "attachment; filename*=utf-8''a%20b.txt"
    assert plain.headers["content-type"] == "text/plain; charset=utf-8"
    ascii_name = await request(FileResponse(file, filename="ab.txt", content_disposition_type="inline"))
    assert ascii_name.headers["content-disposition"] == 'inline; filename="ab.txt"'
    accented = await request(FileResponse(file, filename="été.bin"))
    assert accented.headers["content-disposition"] == "attachment; filename*=utf-8''%C3%A9t%C3%A9.bin"


async def test_divergence_12_unknown_type_is_octet_stream_on_every_starlette(tmp_path: Path) -> None:
    path = tmp_path / "noextension"
    path.write_bytes(b"x")
    messages = await messages_of(FileResponse(path), http_scope())
    assert header(messages, "content-type") == "application/octet-stream"


async def test_stat_result_given_sets_the_headers(file: Path, data: bytes) -> None:
    result = os.stat(file)
    response = FileResponse(file, stat_result=result)
    assert response.headers["content-length"] == str(SIZE)
    messages = await messages_of(response, http_scope())
    assert b"".join(message["body"] for message in messages[1:]) == data


async def test_pathsend_when_offered(file: Path, data: bytes) -> None:
    response = FileResponse(file)
    messages = await messages_of(response, http_scope(extensions={"http.response.pathsend": {}}))
    assert messages[1:] == [{"type": "http.response.pathsend", "path": str(file)}]
    assert response.bytes_sent == SIZE
    assert response.outcome is Outcome.COMPLETED
    ranged = await messages_of(
        FileResponse(file), http_scope([("range", "bytes=0-9")], extensions={"http.response.pathsend": {}})
    )
    assert [message["type"] for message in ranged] == ["http.response.start", "http.response.body"]
    head = await messages_of(FileResponse(file), http_scope(method="HEAD", extensions={"http.response.pathsend": {}}))
    assert [message["type"] for message in head] == ["http.response.start", "http.response.body"]


async def test_websocket_denial(file: Path, data: bytes) -> None:
    scope: Scope = {**http_scope(), "type": "websocket"}
    del scope["method"]
    messages = await messages_of(FileResponse(file), scope)
    assert {message["type"] for message in messages} == {
        "websocket.http.response.start",
        "websocket.http.response.body",
    }
    assert b"".join(message["body"] for message in messages[1:]) == data
