"""Real servers in a background thread, an event log for apps, and raw HTTP/1.1 and HTTP/2 clients.

Shared by every real-server test module; the API below is stable.

Servers
    ``SERVER_KINDS``: the kinds to parametrise over: ``"uvicorn-h11"``, ``"uvicorn-httptools"``,
    ``"hypercorn-asyncio"``, ``"hypercorn-trio"``, ``"hypercorn-h2"`` (hypercorn on asyncio; the
    clients speak HTTP/2 with prior knowledge over cleartext to it). granian is left out: its
    embedded server is marked experimental (it logs a warning saying so), binds from an address and
    port itself (no pre-bound socket to take the port from), and runs its own Rust runtime.

    ``serve(app, kind, lifespan=False) -> Iterator[RunningServer]``: a context manager. Starts the
    server in a thread on a listening socket bound to 127.0.0.1 port 0, waits (bounded, event-driven:
    a readiness probe answered by the server, not a sleep) until it serves requests, yields a
    ``RunningServer``, and on exit asks it to shut down and joins its thread within
    ``SHUTDOWN_TIMEOUT`` (the servers themselves cancel responses still running after 2 s). The app
    is wrapped: lifespan messages are answered by the wrapper (``lifespan=True`` hands them to the app,
    e.g. a FastAPI app with startup work), ``GET /__ready__`` is the probe, and any exception escaping
    the app is recorded in ``RunningServer.app_errors`` (and re-raised to the server as usual).
    ``RunningServer``: ``.port``, ``.kind``, ``.http2``, ``.app_errors`` and ``.log_records`` (records
    at WARNING or above from the ``uvicorn``, ``hypercorn``, ``asyncio`` and ``trio`` loggers, live
    while it runs), ``.errors()`` (app errors plus log records at ERROR or above, so far) and
    ``.assert_no_errors()``. Check them after the block too: a server may log as it shuts down.
    ``UVICORN_INCOMPLETE``: the error line uvicorn logs for an app that returned before the body ended.

Event log
    ``Recorder``: thread-safe; apps call ``record(name, value=None)``. ``names()``, ``values(name)``,
    ``count(name)``, ``index(name)`` read it; ``wait_for(name_or_predicate, timeout=5.0, count=1)``
    blocks on a ``threading.Condition`` until ``name`` was recorded ``count`` times (or the predicate,
    called with the list of ``Event`` so far, is true) and raises ``AssertionError`` naming what was
    awaited and what was recorded on timeout.

HTTP/1.1 clients (raw sockets, ``Connection: close``, every socket operation bounded by
``CLIENT_TIMEOUT``)
    ``fetch(port, path, headers=None, method="GET") -> Response``: status, headers (lower-cased
    names) and the full body, decoded from content-length, chunked or close-delimited framing (none
    for HEAD).
    ``read_then_close(port, path, nbytes, rst=False, headers=None) -> int``: sends a GET, reads the
    header block and then at least ``nbytes`` raw bytes after it (chunked framing counts), closes
    (with ``rst=True`` SO_LINGER (1, 0) turns the close into a TCP RST) and returns how many bytes
    after the header block it read.
    ``stalled_client(port, path) -> Iterator[Response]``: a context manager; connects with a small
    receive buffer, reads the response head, then stops reading but keeps the socket open until exit.
    Yields the head (``body`` empty).
    ``open_response(port, path, headers=None)``: a context manager; reads the response head and
    yields it, the socket and the body bytes that came with the head; closes on exit.
    ``leave_when(server, recorder, event, path="/")``: reads the head (a 200), closes once the app
    recorded ``event``.

HTTP/2 clients (the ``h2`` library, cleartext prior knowledge)
    ``h2_fetch(port, path, headers=None, method="GET") -> Response``.
    ``h2_read_then_reset(port, path, nbytes) -> Iterator[int]``: a context manager; reads at least
    ``nbytes`` of DATA, sends RST_STREAM (CANCEL) and yields the bytes read while the connection stays
    open, so the server sees a stream reset, not a closed connection; closes it on exit.
    ``h2_stalled_client(port, path) -> Iterator[Response]``: reads the head, then never grants more
    flow-control window, so the server's ``send()`` blocks; the connection stays open until exit.

Transparent choice by server kind (h2 for ``hypercorn-h2``, else HTTP/1.1)
    ``client_fetch(server, path, headers=None, method="GET") -> Response``.
    ``partial_read(server, path, nbytes, rst=False, headers=None) -> Iterator[int]``: a context
    manager; HTTP/1.1 closes the socket (RST if asked) before yielding, HTTP/2 resets the stream and
    keeps the connection open until exit. Yields the bytes read. ``partial_read_with_headers(server,
    path, nbytes, headers, rst=False)`` is the same with the headers positional.
    ``client_stall(server, path) -> Iterator[Response]``.

Raw ASGI
    ``http_scope(headers=(), method="GET", spec_version="2.3", http_version="1.1", extensions=None,
    path="/")``: the scope a server hands an HTTP request (header names given as ``str`` are
    lower-cased and encoded as latin-1, ``bytes`` pass unchanged; ``spec_version=None`` leaves it out).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hypercorn.asyncio
import hypercorn.config
import hypercorn.trio
import hypercorn.typing
import trio
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

SERVER_KINDS: Final = ("uvicorn-h11", "uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio", "hypercorn-h2")
HTTP2_KINDS: Final = frozenset({"hypercorn-h2"})

CLIENT_TIMEOUT: Final = 10.0
STARTUP_TIMEOUT: Final = 10.0
SHUTDOWN_TIMEOUT: Final = 10.0
READY_PATH: Final = "/__ready__"
STALLED_RCVBUF: Final = 16 * 1024

_WATCHED_LOGGERS: Final = ("uvicorn", "hypercorn", "asyncio", "trio")

# What uvicorn logs for an app that returned before the body ended (a send timeout, a file that
# shrank): a line about a truncated response, not an exception.
UVICORN_INCOMPLETE: Final = "uvicorn.error ERROR: ASGI callable returned without completing response."


# ---------------------------------------------------------------------------------------------
# Event log


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    value: object
    time: float
    thread: str


class Recorder:
    """A thread-safe, append-only log of what an app did, with bounded event-driven waits."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._condition = threading.Condition()

    def record(self, name: str, value: object = None) -> None:
        event = Event(name, value, time.monotonic(), threading.current_thread().name)
        with self._condition:
            self._events.append(event)
            self._condition.notify_all()

    @property
    def events(self) -> list[Event]:
        with self._condition:
            return list(self._events)

    def names(self) -> list[str]:
        return [event.name for event in self.events]

    def values(self, name: str) -> list[object]:
        return [event.value for event in self.events if event.name == name]

    def count(self, name: str) -> int:
        return sum(1 for event in self.events if event.name == name)

    def index(self, name: str) -> int:
        """The position of the first event called ``name``; ``ValueError`` if there is none."""
        return self.names().index(name)

    def wait_for(self, what: str | Callable[[list[Event]], bool], timeout: float = 5.0, count: int = 1) -> list[Event]:
        """Block until ``what`` was recorded ``count`` times (or the predicate holds); return the log."""
        predicate: Callable[[list[Event]], bool]
        if isinstance(what, str):
            name = what

            def counted(events: list[Event]) -> bool:
                return sum(1 for event in events if event.name == name) >= count

            predicate = counted
            description = f"{count} x {name!r}"
        else:
            predicate = what
            description = getattr(what, "__name__", repr(what))
        with self._condition:
            if not self._condition.wait_for(lambda: predicate(self._events), timeout=timeout):
                names = [event.name for event in self._events]
                raise AssertionError(f"waited {timeout} s for {description}; recorded: {names}")
            return list(self._events)


# ---------------------------------------------------------------------------------------------
# Servers


class _LogCollector(logging.Handler):
    """Appends the records it sees to a running server's ``log_records`` as they happen."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class RunningServer:
    kind: str
    port: int
    app_errors: list[BaseException] = dataclasses.field(default_factory=list)
    log_records: list[logging.LogRecord] = dataclasses.field(default_factory=list)

    @property
    def http2(self) -> bool:
        return self.kind in HTTP2_KINDS

    def errors(self) -> list[str]:
        """Exceptions that escaped the app and server log records at ERROR or above."""
        found = [f"app raised {error!r}" for error in self.app_errors]
        found += [
            f"{record.name} {record.levelname}: {record.getMessage()}"
            for record in self.log_records
            if record.levelno >= logging.ERROR
        ]
        return found

    def assert_no_errors(self) -> None:
        errors = self.errors()
        assert not errors, f"the server saw errors: {errors}"


def _wrap_app(app: ASGIApp, server: RunningServer, lifespan: bool) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not lifespan:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http" and scope["path"] == READY_PATH:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            await app(scope, receive, send)
        except Exception as exc:
            server.app_errors.append(exc)
            raise

    return wrapped


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class _Runner:
    """Runs one server kind in the current thread (``run``); ``stop`` may be called from any thread."""

    def __init__(self, app: ASGIApp, kind: str, sock: socket.socket) -> None:
        self.app = app
        self.kind = kind
        self.sock = sock
        self._stop: Callable[[], None] | None = None
        self._stop_requested = False
        self._lock = threading.Lock()

    def _set_stopper(self, stopper: Callable[[], None]) -> None:
        with self._lock:
            self._stop = stopper
            requested = self._stop_requested
        if requested:
            stopper()

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            stopper = self._stop
        if stopper is not None:
            stopper()

    def run(self) -> None:
        if self.kind.startswith("uvicorn-"):
            self._run_uvicorn(self.kind.removeprefix("uvicorn-"))
        elif self.kind in ("hypercorn-asyncio", "hypercorn-h2"):
            asyncio.run(self._run_hypercorn_asyncio())
        elif self.kind == "hypercorn-trio":
            trio.run(self._run_hypercorn_trio)
        else:
            raise ValueError(f"unknown server kind {self.kind!r}")

    def _run_uvicorn(self, http: str) -> None:
        config = uvicorn.Config(
            self.app,
            http=http,
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)

        def stopper() -> None:
            server.should_exit = True

        self._set_stopper(stopper)
        server.run(sockets=[self.sock])

    def _hypercorn_config(self) -> hypercorn.config.Config:
        config = hypercorn.config.Config()
        # Hypercorn owns the socket it builds from the descriptor, so it gets a duplicate.
        config.bind = [f"fd://{os.dup(self.sock.fileno())}"]
        config.errorlog = logging.getLogger("hypercorn.error")
        config.accesslog = None
        config.graceful_timeout = 2.0
        return config

    def _hypercorn_app(self) -> hypercorn.typing.Framework:
        # hypercorn types its app with its own precise TypedDicts; Starlette's aliases are looser.
        return cast("hypercorn.typing.Framework", self.app)

    async def _run_hypercorn_asyncio(self) -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopper() -> None:
            loop.call_soon_threadsafe(shutdown.set)

        self._set_stopper(stopper)
        await hypercorn.asyncio.serve(self._hypercorn_app(), self._hypercorn_config(), shutdown_trigger=shutdown.wait)

    async def _run_hypercorn_trio(self) -> None:
        shutdown = trio.Event()
        token = trio.lowlevel.current_trio_token()
        self._set_stopper(lambda: token.run_sync_soon(shutdown.set))
        await hypercorn.trio.serve(self._hypercorn_app(), self._hypercorn_config(), shutdown_trigger=shutdown.wait)


@contextlib.contextmanager
def serve(app: ASGIApp, kind: str, lifespan: bool = False) -> Iterator[RunningServer]:
    """Run ``app`` on a real server of ``kind`` on 127.0.0.1 for the duration of the block."""
    sock = _listening_socket()
    server = RunningServer(kind=kind, port=sock.getsockname()[1])
    collector = _LogCollector(server.log_records)
    loggers = [logging.getLogger(name) for name in _WATCHED_LOGGERS]
    for logger in loggers:
        logger.addHandler(collector)
    runner = _Runner(_wrap_app(app, server, lifespan), kind, sock)
    thread_errors: list[BaseException] = []

    def target() -> None:
        try:
            runner.run()
        except BaseException as exc:
            thread_errors.append(exc)

    thread = threading.Thread(target=target, name=f"server-{kind}", daemon=True)
    thread.start()
    try:
        _wait_until_ready(server, thread_errors)
        yield server
    finally:
        runner.stop()
        thread.join(SHUTDOWN_TIMEOUT)
        for logger in loggers:
            logger.removeHandler(collector)
        sock.close()
        if thread.is_alive():
            raise AssertionError(f"{kind} did not shut down within {SHUTDOWN_TIMEOUT} s")
        if thread_errors:
            raise AssertionError(f"{kind} failed: {thread_errors[0]!r}") from thread_errors[0]


def _wait_until_ready(server: RunningServer, thread_errors: list[BaseException]) -> None:
    # The socket listens already, so the probe's connection waits in the backlog until the server
    # accepts it: one request, bounded by its timeout, tells that the server serves.
    try:
        response = fetch(server.port, READY_PATH, timeout=STARTUP_TIMEOUT)
    except OSError as exc:
        raise AssertionError(f"{server.kind} did not start: {thread_errors or exc!r}") from exc
    assert response.status == 204, response


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 clients


@dataclasses.dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


def _connect(port: int, timeout: float = CLIENT_TIMEOUT, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _send_request(
    sock: socket.socket, path: str, headers: Sequence[tuple[str, str]] | None, method: str = "GET"
) -> None:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in headers or ()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _read_head(sock: socket.socket) -> tuple[Response, bytes]:
    """Read the status line and headers; return them and whatever body bytes came along."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed before the response head ended: {buffer!r}")
        buffer += data
    head, rest = buffer.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = []
    for line in header_lines:
        key, value = line.split(":", 1)
        headers.append((key.strip().lower(), value.strip()))
    return Response(status, headers, b""), rest


def _read_all(sock: socket.socket, buffer: bytes) -> bytes:
    chunks = [buffer]
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def _decode_chunked(data: bytes) -> bytes:
    body: list[bytes] = []
    position = 0
    while True:
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";", 1)[0], 16)
        start = line_end + 2
        if size == 0:
            return b"".join(body)
        body.append(data[start : start + size])
        if data[start + size : start + size + 2] != b"\r\n":
            raise ValueError("malformed chunked body")
        position = start + size + 2


def fetch(
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]] | None = None,
    method: str = "GET",
    timeout: float = CLIENT_TIMEOUT,
) -> Response:
    """Send ``method`` ``path`` over HTTP/1.1 and read the whole response."""
    with _connect(port, timeout) as sock:
        _send_request(sock, path, headers, method)
        response, rest = _read_head(sock)
        raw = _read_all(sock, rest)
    length = response.header("content-length")
    if method == "HEAD" or response.status in (204, 304):
        if raw:
            raise ValueError(f"a {method} {response.status} response came with a body: {raw[:100]!r}")
    elif response.header("transfer-encoding") == "chunked":
        response.body = _decode_chunked(raw)
    elif length is not None:
        if len(raw) < int(length):
            raise ConnectionError(f"body ended after {len(raw)} of {length} bytes")
        response.body = raw[: int(length)]
    else:
        response.body = raw
    return response


def _abort(sock: socket.socket, rst: bool) -> None:
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_then_close(
    port: int, path: str, nbytes: int, rst: bool = False, headers: Sequence[tuple[str, str]] | None = None
) -> int:
    """GET ``path``, read at least ``nbytes`` after the header block, close (RST if asked); return the count.

    Raises ``ConnectionError`` if the server closes first.
    """
    sock = _connect(port)
    try:
        _send_request(sock, path, headers)
        _, received = _read_head(sock)
        count = len(received)
        while count < nbytes:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError(f"the server closed after {count} of {nbytes} body bytes")
            count += len(data)
    finally:
        _abort(sock, rst)
    return count


@contextlib.contextmanager
def stalled_client(port: int, path: str, headers: Sequence[tuple[str, str]] | None = None) -> Iterator[Response]:
    """GET ``path`` with a small receive buffer, read the head, then stop reading until exit."""
    sock = _connect(port, rcvbuf=STALLED_RCVBUF)
    try:
        _send_request(sock, path, headers)
        head, _ = _read_head(sock)
        yield head
    finally:
        _abort(sock, rst=True)


# ---------------------------------------------------------------------------------------------
# HTTP/2 clients


class _H2Client:
    """One HTTP/2 cleartext (prior knowledge) connection with one stream, driven synchronously."""

    def __init__(self, port: int, initial_window: int | None = None) -> None:
        self.sock = _connect(port)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.stream_id = 0
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.received = 0
        self.ended = False
        self.reset = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, headers: Sequence[tuple[str, str]] | None = None, method: str = "GET") -> None:
        self.stream_id = self.conn.get_next_available_stream_id()
        request_headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
        request_headers += [(key.lower(), value) for key, value in headers or ()]
        self.conn.send_headers(self.stream_id, request_headers, end_stream=True)
        self._flush()

    def pump(self, acknowledge: bool = True) -> None:
        """Read one batch from the socket and handle its events."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the server closed the HTTP/2 connection")
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == self.stream_id:
                for key, value in event.headers or ():
                    key_text = key.decode() if isinstance(key, bytes) else key
                    value_text = value.decode() if isinstance(value, bytes) else value
                    if key_text == ":status":
                        self.status = int(value_text)
                    else:
                        self.headers.append((key_text, value_text))
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == self.stream_id:
                self.body.append(event.data or b"")
                self.received += len(event.data or b"")
                if acknowledge:
                    self.conn.acknowledge_received_data(event.flow_controlled_length or 0, self.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == self.stream_id:
                self.ended = True
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == self.stream_id:
                self.reset = True
        self._flush()

    def response(self) -> Response:
        assert self.status is not None
        return Response(self.status, list(self.headers), b"".join(self.body))

    def reset_stream(self) -> None:
        self.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()

    def close(self) -> None:
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            self.conn.close_connection()
            self._flush()
        self.sock.close()


def h2_fetch(port: int, path: str, headers: Sequence[tuple[str, str]] | None = None, method: str = "GET") -> Response:
    """Send ``method`` ``path`` over HTTP/2 and read the whole response."""
    client = _H2Client(port)
    try:
        client.request(path, headers, method)
        while not client.ended:
            if client.reset:
                raise ConnectionError("the server reset the stream")
            client.pump()
        return client.response()
    finally:
        client.close()


@contextlib.contextmanager
def h2_read_then_reset(
    port: int, path: str, nbytes: int, headers: Sequence[tuple[str, str]] | None = None
) -> Iterator[int]:
    """Read at least ``nbytes`` of DATA, reset the stream, keep the connection open until exit."""
    client = _H2Client(port)
    try:
        client.request(path, headers)
        while client.received < nbytes:
            if client.ended or client.reset:
                raise ConnectionError(f"the stream ended after {client.received} of {nbytes} bytes")
            client.pump()
        client.reset_stream()
        yield client.received
    finally:
        client.close()


@contextlib.contextmanager
def h2_stalled_client(port: int, path: str, headers: Sequence[tuple[str, str]] | None = None) -> Iterator[Response]:
    """Read the response head, then grant no more flow-control window until exit."""
    client = _H2Client(port, initial_window=STALLED_RCVBUF)
    try:
        client.request(path, headers)
        while client.status is None:
            client.pump(acknowledge=False)
        yield client.response()
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# Transparent choice by server kind


def client_fetch(
    server: RunningServer, path: str, headers: Sequence[tuple[str, str]] | None = None, method: str = "GET"
) -> Response:
    if server.http2:
        return h2_fetch(server.port, path, headers, method)
    return fetch(server.port, path, headers, method)


@contextlib.contextmanager
def partial_read(
    server: RunningServer,
    path: str,
    nbytes: int,
    rst: bool = False,
    headers: Sequence[tuple[str, str]] | None = None,
) -> Iterator[int]:
    """Read part of the body, then leave: close (HTTP/1.1, RST if asked) or reset the stream (HTTP/2)."""
    if server.http2:
        with h2_read_then_reset(server.port, path, nbytes, headers) as count:
            yield count
    else:
        yield read_then_close(server.port, path, nbytes, rst=rst, headers=headers)


@contextlib.contextmanager
def partial_read_with_headers(
    server: RunningServer, path: str, nbytes: int, headers: Sequence[tuple[str, str]] | None, rst: bool = False
) -> Iterator[int]:
    """``partial_read`` with request headers (a Range, say) as a positional argument."""
    with partial_read(server, path, nbytes, rst=rst, headers=headers) as count:
        yield count


@contextlib.contextmanager
def client_stall(server: RunningServer, path: str) -> Iterator[Response]:
    """Read the head, then stop reading while keeping the connection open until exit."""
    if server.http2:
        with h2_stalled_client(server.port, path) as head:
            yield head
    else:
        with stalled_client(server.port, path) as head:
            yield head


__all__ = [
    "HTTP2_KINDS",
    "SERVER_KINDS",
    "UVICORN_INCOMPLETE",
    "Event",
    "Recorder",
    "Response",
    "RunningServer",
    "client_fetch",
    "client_stall",
    "fetch",
    "h2_fetch",
    "h2_read_then_reset",
    "h2_stalled_client",
    "partial_read",
    "partial_read_with_headers",
    "read_then_close",
    "serve",
    "stalled_client",
]


# ---------------------------------------------------------------------------------------------
# Streaming HTTP/1.1 clients for load tests (added for tests/test_load.py and tests/test_faults.py)


@dataclasses.dataclass
class Download:
    """What ``download`` read: the head, the body bytes it decoded, their SHA-256, and whether the
    body ended as its framing said (content-length reached, last chunk seen, or close-delimited EOF)."""

    head: Response
    received: int
    digest: str
    complete: bool


class _BodyDecoder:
    """Incremental content-length, chunked or close-delimited body decoding."""

    def __init__(self, head: Response) -> None:
        self.chunked = head.header("transfer-encoding") == "chunked"
        length = head.header("content-length")
        self.remaining: int | None = None if self.chunked or length is None else int(length)
        self.done = self.remaining == 0
        self._buffer = bytearray()
        self._state = "size"
        self._chunk_left = 0

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        if self.done:
            if data:
                raise ValueError(f"{len(data)} bytes after the end of the body")
            return []
        if not self.chunked:
            if self.remaining is None:
                return [data]
            if len(data) > self.remaining:
                raise ValueError(f"{len(data) - self.remaining} bytes beyond the content-length")
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return [data]
        self._buffer += data
        out: list[bytes | memoryview] = []
        while not self.done:
            if self._state == "size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self._buffer[:end]).split(b";", 1)[0], 16)
                del self._buffer[: end + 2]
                self._state, self._chunk_left = ("trailer", 0) if size == 0 else ("data", size)
            elif self._state == "data":
                if not self._buffer:
                    break
                piece = bytes(self._buffer[: self._chunk_left])
                del self._buffer[: len(piece)]
                out.append(piece)
                self._chunk_left -= len(piece)
                if self._chunk_left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise ValueError("malformed chunked body")
                del self._buffer[:2]
                self._state = "size"
            else:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                trailer = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                self.done = trailer == b""
        return out


def download(
    port: int,
    path: str,
    limit: int | None = None,
    rst: bool = False,
    headers: Sequence[tuple[str, str]] | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> Download:
    """GET ``path`` and hash the decoded body as it arrives, keeping no more than one read in memory.

    ``limit=None`` reads to the end of the body, then to the server's close of the connection (so
    the server's socket is closed when this returns); an ``int`` stops once at least that many body
    bytes were read and closes (RST if asked). A server that closes first ends the read early, with
    ``complete`` false. Reads go into one buffer per call, so that many concurrent downloads do not
    churn the allocator of the process they measure.
    """
    sock = _connect(port, timeout)
    buffer = bytearray(256 * 1024)
    try:
        _send_request(sock, path, headers)
        head, rest = _read_head(sock)
        decoder = _BodyDecoder(head)
        hasher = hashlib.sha256()
        received = 0
        data: bytes | memoryview = rest
        while True:
            for piece in decoder.feed(data):
                hasher.update(piece)
                received += len(piece)
            if limit is not None and received >= limit and not decoder.done:
                break
            try:
                count = sock.recv_into(buffer)
            except ConnectionResetError:
                break
            if not count:
                if decoder.remaining is None and not decoder.chunked:
                    decoder.done = True
                break
            data = memoryview(buffer)[:count]
    finally:
        _abort(sock, rst)
    return Download(head, received, hasher.hexdigest(), decoder.done)


def request_then_leave(
    port: int, path: str, rst: bool = False, headers: Sequence[tuple[str, str]] | None = None
) -> None:
    """Send a GET for ``path`` and close at once (RST if asked), without reading anything."""
    sock = _connect(port)
    try:
        _send_request(sock, path, headers)
    finally:
        _abort(sock, rst)


__all__ += ["Download", "download", "request_then_leave"]


@contextlib.contextmanager
def open_response(
    port: int, path: str, headers: Sequence[tuple[str, str]] | None = None
) -> Iterator[tuple[Response, socket.socket, bytes]]:
    """GET ``path`` over HTTP/1.1 and read the response head; yield it, the socket (to read on, or to
    leave open while the test waits for the app) and the body bytes that came with the head. Closes
    the socket on exit."""
    sock = _connect(port)
    try:
        _send_request(sock, path, headers)
        head, rest = _read_head(sock)
        yield head, sock, rest
    finally:
        sock.close()


def leave_when(server: RunningServer, recorder: Recorder, event: str, path: str = "/") -> None:
    """Request ``path``, read the response head (a 200), and close once the app recorded ``event``."""
    with open_response(server.port, path) as (head, _, _):
        assert head.status == 200
        recorder.wait_for(event, timeout=CLIENT_TIMEOUT)


__all__ += ["leave_when", "open_response"]


# Shared by the FileResponse test modules (the ``opened`` fixture lives in conftest.py).


class OpenedFiles:
    """The descriptors opened for files under one directory, recorded by the ``opened`` fixture."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)
        self.fds: list[tuple[int, os.stat_result]] = []

    def only(self) -> int:
        assert len(self.fds) == 1, self.fds
        return self.fds[0][0]

    def closed(self) -> bool:
        """Whether every recorded descriptor is closed (or reused for some other file since)."""
        for fd, opened in self.fds:
            try:
                now = os.fstat(fd)
            except OSError as exc:
                assert exc.errno == errno.EBADF
                continue
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                return False
        return True


__all__ += ["OpenedFiles"]


# ---------------------------------------------------------------------------------------------
# Raw ASGI


def http_scope(
    headers: Sequence[tuple[str, str]] | Sequence[tuple[bytes, bytes]] = (),
    method: str = "GET",
    spec_version: str | None = "2.3",
    http_version: str = "1.1",
    extensions: dict[str, object] | None = None,
    path: str = "/",
) -> Scope:
    asgi = {"version": "3.0"}
    if spec_version is not None:
        asgi["spec_version"] = spec_version
    scope: Scope = {
        "type": "http",
        "asgi": asgi,
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [_header(name, value) for name, value in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def _header(name: str | bytes, value: str | bytes) -> tuple[bytes, bytes]:
    if isinstance(name, str):
        name = name.lower().encode("latin-1")
    if isinstance(value, str):
        value = value.encode("latin-1")
    return name, value
