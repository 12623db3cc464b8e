"""Prove that an endpoint stops when its client leaves: drive any ASGI app in-process with a
scripted client, on asyncio or trio.

``request()`` calls the app once, as a server would, with a client that reads the whole body,
leaves after some bytes or events, stops reading, or is gone before the body starts; it can also
simulate the server's shutdown signal for this library's responses. The ``Result`` says what the
client got, what the app did after the client left and how the response ended. Every wait is
bounded by ``timeout``; an app that does not return in time fails with an ``AssertionError`` that
says what it was doing. Works with any app (FastAPI, Starlette, with or without this library's
responses), so a test can also show what an app gets without it::

    from disconnect_responses.testing import Client, request

    async def test_tokens_stop_when_the_client_leaves() -> None:
        result = await request(app, "GET", "/tokens", client=Client(leaves_after_bytes=1024))
        assert result.bytes_after_disconnect == 0
        assert result.outcome is Outcome.DISCONNECTED

The lifespan is not run: use a lifespan manager around the call where the app needs one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote

import anyio
import anyio.lowlevel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Scope

from ._race import Guarded, Outcome, observer
from ._shutdown import shutdown_watch

__all__ = ["Client", "Result", "request"]


@dataclasses.dataclass(frozen=True)
class Client:
    """What the scripted client does; at most one of the fields, all counted in what it received.

    By default it reads the whole body. ``leaves_after_bytes`` / ``leaves_after_events``: it
    disconnects once it has received at least that many body bytes / Server-Sent Events (an event is
    a block with a ``data`` field; the message that crosses the count is received whole).
    ``stalls_after_bytes``: it stops reading but stays connected, so the app's ``send()`` blocks
    from then on (for ``send_timeout``). ``leaves_before_body``: it is gone before the response
    starts (the request itself was sent).
    """

    leaves_after_bytes: int | None = None
    leaves_after_events: int | None = None
    stalls_after_bytes: int | None = None
    leaves_before_body: bool = False

    def __post_init__(self) -> None:
        chosen = [field.name for field in dataclasses.fields(self) if getattr(self, field.name) not in (None, False)]
        if len(chosen) > 1:
            raise ValueError(f"a Client does one thing; got {', '.join(chosen)}")


@dataclasses.dataclass
class Result:
    """What one ``request()`` saw. Its ``repr`` tells the story, so a failing ``assert`` explains itself."""

    status: int | None
    """The response's status, or ``None`` if no ``http.response.start`` was sent."""
    headers: Headers
    body: bytes
    """The body bytes the client received (all of them, or up to where it left or stalled)."""
    complete: bool
    """Whether the client received the response's last message."""
    left_after: int | None
    """The body bytes the client had received when it left or stalled; ``None`` if it did neither."""
    bytes_after_disconnect: int
    """Body bytes the app handed to ``send()`` after the client left: what went into a dead socket."""
    returned_after: float | None
    """Seconds from the client leaving or stalling to the app's return."""
    error: BaseException | None
    """The exception that escaped the app, if any."""
    outcome: Outcome | None
    """How this library's response ended (``None`` for other responses)."""
    bytes_sent: int | None
    """Body bytes this library's response handed to the server (``None`` for other responses)."""

    def __repr__(self) -> str:
        story = [f"status {self.status}", f"{len(self.body)} body bytes received"]
        if self.complete:
            story.append("the response completed")
        if self.left_after is not None:
            story.append(f"the client left or stalled after {self.left_after} bytes")
            story.append(f"the app then handed {self.bytes_after_disconnect} more body bytes to send()")
            if self.returned_after is not None:
                story.append(f"and returned {self.returned_after * 1000:.1f} ms later")
        if self.error is not None:
            story.append(f"the app raised {self.error!r}")
        if self.outcome is not None:
            story.append(f"outcome {self.outcome.value} after {self.bytes_sent} bytes sent")
        return f"Result({'; '.join(story)})"


class _AppHung(Exception):
    """Raised into an app that is still sending when ``timeout`` has passed without its yielding."""


class _Connection:
    """One connection's ``receive`` and ``send``, as a server drives them, played by the client."""

    def __init__(self, client: Client, spec_version: str, body: bytes, shutdown: tuple[str, int] | None) -> None:
        self.client = client
        self.raises_when_gone = tuple(int(part) for part in spec_version.split(".")) >= (2, 4)
        self.request_body: bytes | None = body
        self.shutdown = shutdown
        self.over = anyio.Event()
        self.gone = client.leaves_before_body
        self.left_at: float | None = time.monotonic() if self.gone else None
        self.left_after: int | None = 0 if self.gone else None
        self.status: int | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.events = 0
        self._unscanned = 0  # where the body's last incomplete event block starts
        self.complete = False
        self.bytes_after_leaving = 0
        self.waiting_in: str | None = None
        self.receive_woken = anyio.Event()
        self.deadline = float("inf")
        self.timeout = 0.0
        self.hung = False

    async def receive(self) -> Message:
        if self.request_body is not None:
            body, self.request_body = self.request_body, None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.gone and not self.complete:
            self.waiting_in = "receive()"
            try:
                await self.over.wait()
            finally:
                self.waiting_in = None
                self.receive_woken.set()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if time.monotonic() > self.deadline:
            # Past the timeout and still sending: the watchdog's cancellation lands here, or, if it
            # cannot (the app never gave the event loop a turn, so no timeout could fire), this does.
            self.hung = True
            await anyio.lowlevel.checkpoint()
            raise _AppHung("disconnect_responses.testing: the app is still sending after the timeout")
        if self.gone and self.raises_when_gone:
            raise OSError(errno.EPIPE, "the client has gone")
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.raw_headers = list(message.get("headers", ()))
            return
        if message["type"] != "http.response.body":
            return
        chunk = bytes(message.get("body", b""))
        if self.gone:
            self.bytes_after_leaving += len(chunk)
            return
        self.body += chunk
        if not message.get("more_body", False):
            self.complete = True
            self.over.set()
            return
        listening = self.waiting_in == "receive()"
        self._on_received()
        if self.gone and listening:
            # As a server that notices the departure tells a waiting receive() before it takes any
            # more: the app's listener runs before this send returns. Shielded, so that the app gets
            # no more chances to be cancelled here than a real send() gives it (none).
            with anyio.move_on_after(self.timeout, shield=True):
                await self.receive_woken.wait()
        if self.client.stalls_after_bytes is not None and len(self.body) >= self.client.stalls_after_bytes:
            self.left_after = len(self.body)
            self.left_at = time.monotonic()
            self.waiting_in = "send(), which the stalled client blocks"
            await anyio.sleep_forever()

    def _on_received(self) -> None:
        received = len(self.body)
        new, self._unscanned = _events_completed(self.body, self._unscanned)
        events = self.events = self.events + new
        if self.shutdown is not None:
            unit, count = self.shutdown
            if (received if unit == "bytes" else events) >= count:
                self.shutdown = None
                shutdown_watch.shut_down()
        client = self.client
        if (client.leaves_after_bytes is not None and received >= client.leaves_after_bytes) or (
            client.leaves_after_events is not None and events >= client.leaves_after_events
        ):
            self.gone = True
            self.left_after = received
            self.left_at = time.monotonic()
            self.over.set()

    def what_the_app_was_doing(self, timeout: float) -> str:
        said = [f"the app did not return within {timeout} s"]
        if self.left_at is not None:
            said.append(f"the client had left or stalled after {self.left_after} body bytes")
            if self.bytes_after_leaving:
                said.append(f"and the app then handed {self.bytes_after_leaving} more body bytes to send()")
        else:
            said.append(f"the client had received {len(self.body)} body bytes and was still reading")
        if self.hung:
            said.append("it was still sending, never giving the event loop a turn")
        else:
            said.append(f"it was waiting in {self.waiting_in or 'its own code (a producer, a background task)'}")
        return "; ".join(said)


_BLOCK_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_DATA_FIELD = re.compile(rb"(?:^|[\r\n])data(?::|[\r\n]|$)")


def _events_completed(body: bytes | bytearray, start: int) -> tuple[int, int]:
    """The Server-Sent Events (blocks ended by a blank line, with a ``data`` field) completed in
    ``body[start:]``, and where the incomplete rest begins: each message is scanned once."""
    *blocks, rest = _BLOCK_END.split(bytes(body[start:]))
    return sum(1 for block in blocks if _DATA_FIELD.search(block)), len(body) - len(rest)


async def request(
    app: ASGIApp,
    method: str = "GET",
    path: str = "/",
    *,
    query_string: str = "",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    client: Client = Client(),
    shutdown_after_bytes: int | None = None,
    shutdown_after_events: int | None = None,
    spec_version: str = "2.3",
    # Not left to the caller's fail_after: an app that never yields can only be stopped in send().
    timeout: float = 5.0,  # noqa: ASYNC109
) -> Result:
    """Call ``app`` once with ``method path?query_string``, ``headers`` and ``body``, the client
    behaving as ``client`` says, and return what happened.

    ``shutdown_after_bytes`` / ``shutdown_after_events`` simulate the server's shutdown signal for
    this library's responses once the client has received that much (no signal is sent).
    ``spec_version`` is the ASGI HTTP spec version the server advertises: from ``"2.4"`` on,
    ``send()`` raises ``OSError`` once the client has gone, as the spec says. ``timeout`` bounds the
    whole call; an app still running then fails the call with an ``AssertionError`` saying what it
    was doing (it is cancelled, or, if it never lets the event loop run, stopped at its next
    ``send()``).
    """
    if shutdown_after_bytes is not None and shutdown_after_events is not None:
        raise ValueError("give shutdown_after_bytes or shutdown_after_events, not both")
    shutdown = (
        ("bytes", shutdown_after_bytes)
        if shutdown_after_bytes is not None
        else ("events", shutdown_after_events)
        if shutdown_after_events is not None
        else None
    )
    connection = _Connection(client, spec_version, body, shutdown)
    responses: list[Guarded] = []
    error: BaseException | None = None
    token = observer.set(responses.append)
    simulation = shutdown_watch.simulation() if shutdown is not None else contextlib.nullcontext()
    try:
        with simulation, anyio.move_on_after(timeout) as watchdog:
            connection.deadline = time.monotonic() + timeout
            connection.timeout = timeout
            try:
                await app(
                    _scope(method, path, query_string, headers, spec_version), connection.receive, connection.send
                )
            except Exception as exc:
                error = exc
    finally:
        observer.reset(token)
    returned_at = time.monotonic()
    if watchdog.cancelled_caught or connection.hung:
        raise AssertionError(connection.what_the_app_was_doing(timeout))
    ours = responses[-1] if responses else None
    return Result(
        status=connection.status,
        headers=Headers(raw=connection.raw_headers),
        body=bytes(connection.body),
        complete=connection.complete,
        left_after=connection.left_after,
        bytes_after_disconnect=connection.bytes_after_leaving,
        returned_after=None if connection.left_at is None else returned_at - connection.left_at,
        error=error,
        outcome=None if ours is None else ours.outcome,
        bytes_sent=None if ours is None else ours.bytes_sent,
    )


def _scope(
    method: str, path: str, query_string: str, headers: Mapping[str, str] | Iterable[tuple[str, str]], spec: str
) -> Scope:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs]
    if not any(name == b"host" for name, _ in raw):
        raw.insert(0, (b"host", b"testserver"))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": quote(path).encode("ascii"),
        "query_string": query_string.encode("latin-1"),
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
