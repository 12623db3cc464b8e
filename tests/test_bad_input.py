"""Bad input: any Range and If-Range header, and odd ASGI message orders from a server.

The Range properties run hypothesis against ``FileResponse`` through raw ASGI calls (fast, many
examples, with Starlette 1.10's own ``FileResponse`` as a second oracle where it is installed) and
through a real server (fewer examples). Every answer must be a 200, 206, 400 or 416 whose body and
``content-range`` agree with the file; never a 500, an exception or a hang.

The message-order tests drive each response with a fake server whose ``receive`` misbehaves in one
way: the response must end, close its iterator (or file) once, run its background task once and
raise nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from email.utils import formatdate
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import starlette
import starlette.responses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import disconnect_responses._file
from disconnect_responses import FileResponse, Outcome, StreamingResponse

from .asgi import WATCHDOG, messages_of
from .servers import RunningServer, fetch, http_scope, serve

pytestmark = pytest.mark.anyio

# 0 and 1 byte files are the edge cases of every range rule; 200,000 bytes spans several chunks.
SIZES = (0, 1, 777, 200_000)
ASGI_EXAMPLES = 400
SERVER_EXAMPLES = 80
STARLETTE_1_10 = tuple(int(part) for part in starlette.__version__.split(".")[:2]) >= (1, 10)
BOUNDARY = "0123456789abcdef0123456789"
RANGE_LINE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
PART_HEAD = re.compile(
    rb"--(?P<boundary>[0-9a-f]+)\r\nContent-Type: [^\r\n]*\r\nContent-Range: bytes (\d+)-(\d+)/(\d+)\r\n\r\n"
)
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Files:
    def __init__(self, directory: Path) -> None:
        self.data: dict[int, bytes] = {}
        self.paths: dict[int, Path] = {}
        for size in SIZES:
            self.data[size] = os.urandom(size)
            self.paths[size] = directory / f"file-{size}.bin"
            self.paths[size].write_bytes(self.data[size])

    def validators(self, size: int) -> tuple[str, str]:
        """The etag and last-modified FileResponse derives from the file (Starlette's formula)."""
        result = os.stat(self.paths[size])
        base = f"{result.st_mtime}-{result.st_size}"
        etag = f'"{hashlib.md5(base.encode(), usedforsecurity=False).hexdigest()}"'
        return etag, formatdate(result.st_mtime, usegmt=True)

    def open_count(self) -> int:
        """How many descriptors of this process point at one of the files."""
        targets = {str(path) for path in self.paths.values()}
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") in targets:
                    count += 1
            except OSError:
                continue
        return count


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("ranges"))


@pytest.fixture(scope="module", autouse=True)
def _fixed_boundary() -> Iterator[None]:
    """One multipart boundary for both implementations, so their bytes can be compared."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (starlette.responses, disconnect_responses._file):
            patch.setattr(module, "token_hex", lambda nbytes: BOUNDARY)
        yield


# ---------------------------------------------------------------------------------------------
# Strategies


NUMBERS = st.one_of(
    st.integers(0, 250_000).map(str),
    st.integers(0, 1_000).map(str),
    st.integers(10**15, 10**40).map(str),
    st.sampled_from(["", " ", "-1", "+5", "1_0", "0x10", "1e3", "٣", "00", " 12 ", "9" * 5000]),
)
SPECS = st.one_of(
    st.tuples(NUMBERS, NUMBERS).map(lambda pair: f"{pair[0]}-{pair[1]}"),
    NUMBERS.map(lambda number: f"-{number}"),
    NUMBERS.map(lambda number: f"{number}-"),
    st.text(max_size=8),
)
# Well-formed specs with small numbers, so that many requests hit the files' bytes.
VALID_SPECS = st.one_of(
    st.tuples(st.integers(0, 1_000), st.integers(0, 1_000)).map(lambda pair: f"{min(pair)}-{max(pair)}"),
    st.integers(0, 1_000).map(lambda number: f"-{number}"),
    st.integers(0, 250_000).map(lambda number: f"{number}-"),
)
VALID_LOOKING = st.builds(
    lambda specs, comma: "bytes=" + comma.join(specs),
    st.lists(VALID_SPECS, min_size=1, max_size=5),
    st.sampled_from([",", ", "]),
)
# Several disjoint ranges, in any order: multipart answers.
DISJOINT = st.builds(
    lambda bounds, order: "bytes=" + ",".join(f"{bounds[i]}-{bounds[i + 1]}" for i in order(len(bounds))),
    st.lists(st.integers(0, 800), min_size=4, max_size=10, unique=True).map(
        lambda bounds: sorted(bounds)[: len(bounds) // 2 * 2]
    ),
    st.sampled_from([lambda n: range(0, n, 2), lambda n: range(n - 2, -1, -2)]),
)
RANGE_TEXT = st.one_of(
    VALID_LOOKING,
    VALID_LOOKING,
    DISJOINT,
    st.builds(
        lambda unit, equals, specs, comma: unit + equals + comma.join(specs),
        st.sampled_from(["bytes", "bytes", "bytes", "BYTES", " bytes ", "byte", "items", ""]),
        st.sampled_from(["=", "=", "=", " = ", "==", ""]),
        st.one_of(st.lists(SPECS, max_size=6), st.lists(st.one_of(SPECS, VALID_SPECS), min_size=95, max_size=110)),
        st.sampled_from([",", ",", ", ", ",,", " , "]),
    ),
    st.text(max_size=40),
)
IF_RANGE = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.sampled_from(["etag", "last-modified", "weak etag", "other etag"]),
    st.text(max_size=30),
)
# A real server's request line must stay one latin-1 line: no CR, LF or NUL.
WIRE_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
WIRE_RANGE = st.one_of(RANGE_TEXT.filter(lambda text: text.isprintable() and text.isascii()), WIRE_TEXT)


def if_range_value(choice: str | None, files: Files, size: int) -> str | None:
    etag, last_modified = files.validators(size)
    named = {"etag": etag, "last-modified": last_modified, "weak etag": f"W/{etag}", "other etag": '"0000"'}
    return named.get(choice, choice) if choice is not None else None


# ---------------------------------------------------------------------------------------------
# The oracle


def check_answer(status: int, headers: dict[str, str], body: bytes, data: bytes, method: str) -> None:
    """A 200, 206, 400 or 416 whose length, ``content-range`` and body agree with ``data``."""
    size = len(data)
    head = method == "HEAD"
    multipart = headers.get("content-type", "").startswith("multipart/")
    event(f"status {status}{' multipart' if multipart else ''}")
    assert status in (200, 206, 400, 416), status
    if not head:
        assert int(headers["content-length"]) == len(body), headers
    if status == 200:
        assert headers["content-length"] == str(size)
        assert "content-range" not in headers
        assert body == (b"" if head else data)
    elif status == 206 and headers["content-type"].startswith("multipart/byteranges; boundary="):
        boundary = headers["content-type"].removeprefix("multipart/byteranges; boundary=")
        assert head or check_multipart(body, boundary.encode(), data) >= 2
    elif status == 206:
        match = RANGE_LINE.fullmatch(headers["content-range"])
        assert match is not None, headers
        start, last, total = (int(group) for group in match.groups())
        assert total == size and 0 <= start <= last < size, headers
        assert headers["content-length"] == str(last - start + 1)
        assert body == (b"" if head else data[start : last + 1])
    elif status == 416:
        assert headers["content-range"] == f"bytes */{size}"
        assert body == b""
    else:
        assert headers["content-type"].startswith("text/plain")


def check_multipart(body: bytes, boundary: bytes, data: bytes) -> int:
    """Check each part against ``data`` (sorted, disjoint, not adjacent: merged); return the count."""
    position = 0
    previous_last = -2
    parts = 0
    while not body.startswith(b"--" + boundary + b"--", position):
        match = PART_HEAD.match(body, position)
        assert match is not None, body[position : position + 200]
        assert match["boundary"] == boundary
        start, last, total = (int(group) for group in match.groups()[1:])
        assert total == len(data) and previous_last + 1 < start <= last < len(data)
        end = match.end() + last - start + 1
        assert body[match.end() : end] == data[start : last + 1]
        assert body[end : end + 2] == b"\r\n"
        position = end + 2
        previous_last = last
        parts += 1
    assert position + len(boundary) + 4 == len(body)
    return parts


# ---------------------------------------------------------------------------------------------
# Raw ASGI calls


async def call(app: ASGIApp, scope: Scope) -> tuple[int, dict[str, str], bytes]:
    """Call ``app`` with a server whose client stays; return status, headers and body."""
    start, *bodies = await messages_of(app, scope)
    assert start["type"] == "http.response.start"
    assert [message["type"] for message in bodies] == ["http.response.body"] * len(bodies)
    assert bodies[-1].get("more_body", False) is False
    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in start["headers"]}
    return start["status"], headers, b"".join(message.get("body", b"") for message in bodies)


def request_headers(range_value: str, if_range: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"range", range_value.encode("utf-8"))]
    if if_range is not None:
        headers.append((b"if-range", if_range.encode("utf-8")))
    return headers


@settings(SETTINGS, max_examples=ASGI_EXAMPLES)
@given(
    size=st.sampled_from((*SIZES, 777, 200_000)),
    range_value=RANGE_TEXT,
    if_range=IF_RANGE,
    method=st.sampled_from(["GET", "GET", "HEAD"]),
)
async def test_any_range_header_gets_a_correct_answer(
    files: Files, size: int, range_value: str, if_range: str | None, method: str
) -> None:
    """Any Range (and If-Range) value: 200, 206, 400 or 416 with a body and ``content-range`` that
    match the file, the file closed and the background task run once; on Starlette 1.10 and later,
    byte for byte what Starlette's ``FileResponse`` answers."""
    runs: list[None] = []
    scope = http_scope(request_headers(range_value, if_range_value(if_range, files, size)), method)
    response = FileResponse(files.paths[size], background=BackgroundTask(runs.append, None))
    status, headers, body = await call(response, scope)
    check_answer(status, headers, body, files.data[size], method)
    assert runs == [None]
    assert response.outcome is Outcome.COMPLETED
    assert files.open_count() == 0
    if STARLETTE_1_10:
        upstream = starlette.responses.FileResponse(files.paths[size])
        assert await call(upstream, scope) == (status, headers, body)


@pytest.fixture(scope="module", params=["uvicorn-httptools", "hypercorn-asyncio"])
def file_server(request: pytest.FixtureRequest, files: Files) -> Iterator[RunningServer]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        size = int(scope["path"].strip("/"))
        await FileResponse(files.paths[size])(scope, receive, send)

    with serve(app, str(request.param)) as server:
        yield server
    server.assert_no_errors()


@settings(SETTINGS, max_examples=SERVER_EXAMPLES)
@given(
    size=st.sampled_from((*SIZES, 777, 200_000)),
    range_value=WIRE_RANGE,
    if_range=st.one_of(st.sampled_from([None, None, None, "etag", "last-modified", "weak etag"]), WIRE_TEXT),
    method=st.sampled_from(["GET", "GET", "HEAD"]),
)
def test_any_range_header_through_a_real_server(
    file_server: RunningServer, files: Files, size: int, range_value: str, if_range: str | None, method: str
) -> None:
    """The same property over HTTP/1.1 on loopback: whatever the server makes of the header (it may
    answer 400 itself), the answer is correct and the server logs no error."""
    headers = [("Range", range_value)]
    value = if_range_value(if_range, files, size)
    if value is not None:
        headers.append(("If-Range", value))
    answer = fetch(file_server.port, f"/{size}", headers, method)
    check_answer(answer.status, dict(answer.headers), answer.body, files.data[size], method)
    file_server.assert_no_errors()


# ---------------------------------------------------------------------------------------------
# Odd ASGI message orders

CHUNKS = [bytes([index]) * (64 * 1024 + index) for index in range(8)]
REQUEST_PART: Message = {"type": "http.request", "body": b"part", "more_body": True}
REQUEST_END: Message = {"type": "http.request", "body": b"", "more_body": False}
DISCONNECT: Message = {"type": "http.disconnect"}
UNKNOWN: list[Message] = [
    {"type": "http.foo"},
    {"type": "websocket.receive", "text": "?"},
    {"type": "lifespan.startup"},
]


class Producer:
    """A body iterator object that counts the calls of its close method."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.closes = 0
        self.index = 0

    def content(self) -> AsyncIterator[bytes] | Iterator[bytes]:
        return _SyncProducer(self) if self.kind == "sync" else _AsyncProducer(self)

    def next_chunk(self) -> bytes | None:
        if self.index == len(CHUNKS):
            return None
        self.index += 1
        return CHUNKS[self.index - 1]


class _AsyncProducer:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    def __aiter__(self) -> _AsyncProducer:
        return self

    async def __anext__(self) -> bytes:
        if self.producer.kind == "awaiting":
            await anyio.lowlevel.checkpoint()
        chunk = self.producer.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self.producer.closes += 1


class _SyncProducer:
    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    def __iter__(self) -> _SyncProducer:
        return self

    def __next__(self) -> bytes:
        chunk = self.producer.next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        self.producer.closes += 1


class OddServer:
    """A fake server whose ``receive`` plays ``script``, then ``then``: "block" (until the call is
    over), "disconnect" (on every later call) or "unknown" (an unknown message on every call,
    returned at once, until the response has sent its last message). A listener that never yields
    would hang the event loop, where no ``fail_after`` can fire: past ``WATCHDOG`` seconds of
    unknown messages the fake answers with a disconnect, so such a listener fails the test on its
    outcome instead of hanging it."""

    def __init__(self, script: list[Message], then: str, raises: Exception | None = None) -> None:
        self.script = list(script)
        self.then = then
        self.raises = raises
        self.receive_calls = 0
        self.messages: list[Message] = []
        self.over = anyio.Event()
        self.disconnect_delivered = anyio.Event()
        self.hold_start = False
        self.created = time.monotonic()

    async def receive(self) -> Message:
        self.receive_calls += 1
        if self.raises is not None:
            raise self.raises
        if self.script:
            message = self.script.pop(0)
        elif self.then == "block":
            await self.over.wait()
            message = {"type": "http.disconnect"}
        elif self.then == "unknown" and not self.finished and time.monotonic() - self.created < WATCHDOG:
            message = {"type": "http.foo"}
        else:
            message = {"type": "http.disconnect"}
        if message["type"] == "http.disconnect":
            self.disconnect_delivered.set()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.hold_start:
            await self.disconnect_delivered.wait()
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.messages[1:])

    @property
    def finished(self) -> bool:
        return (
            bool(self.messages)
            and self.messages[-1]["type"] == "http.response.body"
            and not self.messages[-1].get("more_body", False)
        )


ORDERS: dict[str, tuple[list[Message], str, set[Outcome]]] = {
    # name: (script, then, allowed outcomes)
    "disconnect-before-the-body-is-read": ([], "disconnect", {Outcome.DISCONNECTED, Outcome.COMPLETED}),
    "repeated-disconnects": (
        [{"type": "http.disconnect"}] * 3,
        "disconnect",
        {Outcome.DISCONNECTED, Outcome.COMPLETED},
    ),
    "extra-requests-then-silence": (
        [REQUEST_PART, REQUEST_PART, REQUEST_END, REQUEST_END, REQUEST_PART],
        "block",
        {Outcome.COMPLETED},
    ),
    "extra-requests-then-disconnect": (
        [REQUEST_PART, REQUEST_END, REQUEST_END, REQUEST_PART],
        "disconnect",
        {Outcome.DISCONNECTED, Outcome.COMPLETED},
    ),
    "unknown-types-then-silence": (UNKNOWN, "block", {Outcome.COMPLETED}),
    "unknown-types-then-disconnect": (UNKNOWN, "disconnect", {Outcome.DISCONNECTED, Outcome.COMPLETED}),
    "disconnect-before-the-response-start-is-sent": ([], "disconnect", {Outcome.DISCONNECTED}),
}
RESPONSES = ("file", "awaiting", "never-awaiting", "sync")


@dataclasses.dataclass
class OddRun:
    response: StreamingResponse | FileResponse
    background_runs: list[None]
    closes: Callable[[], int]
    expected: bytes
    error: Exception | None


async def run_odd(files: Files, kind: str, server: OddServer) -> OddRun:
    """Call a response of ``kind`` against ``server`` and collect what it left behind."""
    runs: list[None] = []
    background = BackgroundTask(runs.append, None)
    response: StreamingResponse | FileResponse
    closes: Callable[[], int]
    if kind == "file":
        response = FileResponse(files.paths[200_000], background=background)
        expected = files.data[200_000]

        def file_closes() -> int:
            return 1 if files.open_count() == 0 else 0

        closes = file_closes
    else:
        producer = Producer(kind)
        response = StreamingResponse(producer.content(), background=background)
        expected = b"".join(CHUNKS)

        def producer_closes() -> int:
            return producer.closes

        closes = producer_closes
    error: Exception | None = None
    with anyio.fail_after(WATCHDOG):
        try:
            await response(http_scope([]), server.receive, server.send)
        except Exception as exc:
            error = exc
        finally:
            server.over.set()
    return OddRun(response, runs, closes, expected, error)


@pytest.mark.parametrize("kind", RESPONSES)
@pytest.mark.parametrize("order", ORDERS)
async def test_odd_message_orders_are_handled(files: Files, order: str, kind: str) -> None:
    """Whatever order the server's messages come in, the response ends with an allowed outcome,
    closes its iterator (or file) once, runs its background task once, raises nothing and reads no
    more messages than it needs; a completed body is whole."""
    script, then, allowed = ORDERS[order]
    server = OddServer(script, then)
    server.hold_start = order == "disconnect-before-the-response-start-is-sent"
    run = await run_odd(files, kind, server)
    assert run.error is None
    assert run.response.outcome in allowed
    assert run.closes() == 1
    assert run.background_runs == [None]
    if run.response.outcome is Outcome.COMPLETED:
        assert server.finished and server.body == run.expected
    else:
        assert not server.finished
    if then == "disconnect":
        # The listener stops at the first disconnect: nothing spins on a server that repeats it.
        assert server.receive_calls <= len(script) + 1
    if server.hold_start:
        # The held send of the start may be cancelled or completed; no body follows it either way.
        assert [message["type"] for message in server.messages] in ([], ["http.response.start"])


@pytest.mark.parametrize("kind", ["file", "awaiting", "sync"])
async def test_a_receive_that_never_blocks_does_not_starve_the_body(files: Files, kind: str) -> None:
    """A server whose ``receive`` returns unknown messages at once, until the body has ended: the
    listener yields between them, so the body still completes."""
    server = OddServer([], "unknown")
    run = await run_odd(files, kind, server)
    assert run.error is None
    assert run.response.outcome is Outcome.COMPLETED
    assert server.body == run.expected
    assert run.closes() == 1
    assert run.background_runs == [None]


class ReceiveBroke(Exception):
    pass


@pytest.mark.parametrize("kind", RESPONSES)
async def test_a_receive_that_raises_propagates_its_error_after_the_cleanup(files: Files, kind: str) -> None:
    """``receive()`` raising (a broken server or middleware): the error reaches the server as itself,
    unwrapped, after the iterator (or file) was closed and the background task ran, as an error from
    the producer does."""
    server = OddServer([], "block", raises=ReceiveBroke("receive broke"))
    run = await run_odd(files, kind, server)
    assert type(run.error) is ReceiveBroke
    assert run.response.outcome is Outcome.ERROR
    assert run.closes() == 1
    assert run.background_runs == [None]
