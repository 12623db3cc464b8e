"""``disconnect_responses.testing``: each scripted client, what a ``Result`` reports, and a hang
reported as a failure that says what the app was doing, for this library's responses and for
Starlette's own."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import anyio
import pytest
import starlette.responses
from fastapi import FastAPI
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from disconnect_responses import Outcome, StreamingResponse
from disconnect_responses.testing import Client, _events_completed, request

pytestmark = pytest.mark.anyio

CHUNK = b"x" * 4096
EVENT = b"data: tick\n\n"


def awaiting(chunks: int, closed: list[str], chunk: bytes = CHUNK) -> AsyncGenerator[bytes]:
    async def produce() -> AsyncGenerator[bytes]:
        try:
            for _ in range(chunks):
                await anyio.lowlevel.checkpoint()
                yield chunk
        finally:
            closed.append("closed")

    return produce()


def never_awaiting(chunks: int, closed: list[str]) -> AsyncIterator[bytes]:
    async def produce() -> AsyncIterator[bytes]:
        try:
            for _ in range(chunks):
                yield CHUNK
        finally:
            closed.append("closed")

    return produce()


def app_of(make: Callable[[], starlette.responses.Response]) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await make()(scope, receive, send)

    return app


async def test_a_fastapi_endpoint_is_shown_to_stop_when_its_client_leaves() -> None:
    """The README's five lines: a FastAPI endpoint's generator is closed and its background task run
    when the client leaves after 1 KiB, and nothing more is sent."""
    closed: list[str] = []
    app = FastAPI()

    @app.get("/tokens")
    async def tokens() -> StreamingResponse:
        return StreamingResponse(awaiting(1000, closed), background=BackgroundTask(closed.append, "background"))

    result = await request(app, "GET", "/tokens", client=Client(leaves_after_bytes=1024))
    assert result.bytes_after_disconnect == 0 and closed == ["closed", "background"]
    assert result.outcome is Outcome.DISCONNECTED and result.status == 200


async def test_the_same_test_against_starlette_fails_saying_what_happened() -> None:
    """Starlette's ``StreamingResponse`` with a producer that never awaits sends its whole body after
    the client left; the ``Result`` in the assertion says how much."""
    closed: list[str] = []
    app = app_of(lambda: starlette.responses.StreamingResponse(never_awaiting(256, closed)))
    result = await request(app, "GET", "/", client=Client(leaves_after_bytes=1024))
    with pytest.raises(AssertionError, match=r"the app then handed 1044480 more body bytes to send\(\)"):
        assert result.bytes_after_disconnect == 0, result
    assert result.outcome is None and result.bytes_sent is None


async def test_a_result_tells_what_the_client_got() -> None:
    app = app_of(lambda: StreamingResponse(awaiting(3, []), headers={"x-kind": "test"}))
    result = await request(app, "GET", "/")
    assert (result.status, result.headers["x-kind"], result.body) == (200, "test", CHUNK * 3)
    assert result.complete and result.left_after is None and result.returned_after is None
    assert (result.outcome, result.bytes_sent, result.error) == (Outcome.COMPLETED, 3 * len(CHUNK), None)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_gone_before_the_body(spec_version: str) -> None:
    closed: list[str] = []
    app = app_of(lambda: StreamingResponse(awaiting(3, closed)))
    result = await request(app, client=Client(leaves_before_body=True), spec_version=spec_version)
    assert result.body == b"" and not result.complete and result.error is None
    assert result.outcome is Outcome.DISCONNECTED


# Starlette skips its disconnect listener from spec 2.4 on since 0.4x; 0.40 still listens.
STARLETTE_SKIPS_ITS_LISTENER_ON_2_4 = "spec_version" in inspect.getsource(starlette.responses.StreamingResponse)


async def test_spec_2_4_shows_starlette_s_error_escaping() -> None:
    """On spec 2.4 ``send()`` raises once the client has gone: a Starlette that skips its listener
    there lets the error escape, this library ends the response quietly (divergence 2)."""
    client = Client(leaves_after_bytes=1)
    ours = app_of(lambda: StreamingResponse(awaiting(100, [])))
    result = await request(ours, client=client, spec_version="2.4")
    assert result.error is None and result.outcome is Outcome.DISCONNECTED
    if STARLETTE_SKIPS_ITS_LISTENER_ON_2_4:
        theirs = app_of(lambda: starlette.responses.StreamingResponse(awaiting(100, [])))
        assert (await request(theirs, client=client, spec_version="2.4")).error is not None


async def test_a_stalled_client_is_let_go_by_send_timeout() -> None:
    closed: list[str] = []
    app = app_of(lambda: StreamingResponse(awaiting(1000, closed), send_timeout=0.05))
    result = await request(app, client=Client(stalls_after_bytes=3 * len(CHUNK)))
    assert result.outcome is Outcome.SEND_TIMEOUT and closed == ["closed"]
    assert result.left_after == 3 * len(CHUNK) and result.returned_after is not None


async def test_a_client_leaves_after_a_number_of_events() -> None:
    app = app_of(lambda: StreamingResponse(awaiting(100, [], chunk=b": ping\n\n" + EVENT)))
    result = await request(app, client=Client(leaves_after_events=3))
    assert result.body == (b": ping\n\n" + EVENT) * 3 and result.outcome is Outcome.DISCONNECTED


async def test_a_simulated_shutdown_ends_an_open_ended_stream() -> None:
    closed: list[str] = []
    app = app_of(lambda: StreamingResponse(awaiting(10**6, closed, chunk=EVENT)))
    result = await request(app, shutdown_after_events=2)
    assert result.outcome is Outcome.SHUTDOWN and result.complete and closed == ["closed"]


async def test_an_app_that_never_ends_is_reported_not_hung() -> None:
    content = awaiting(10**9, [], chunk=EVENT)
    app = app_of(lambda: starlette.responses.StreamingResponse(content))
    with pytest.raises(AssertionError, match="did not return within 0.2 s; the client had received"):
        await request(app, timeout=0.2)
    await content.aclose()  # Starlette never closes it


async def test_an_app_that_never_yields_is_stopped_at_its_next_send() -> None:
    async def endless() -> AsyncGenerator[bytes]:
        while True:
            yield CHUNK

    content = endless()
    app = app_of(lambda: starlette.responses.StreamingResponse(content))
    with pytest.raises(AssertionError, match="more body bytes to send\\(\\); it was still sending, never giving"):
        await request(app, client=Client(leaves_after_bytes=1), timeout=0.2)
    await content.aclose()  # Starlette never closes it


def test_a_client_does_one_thing() -> None:
    with pytest.raises(ValueError, match="leaves_after_bytes, stalls_after_bytes"):
        Client(leaves_after_bytes=1, stalls_after_bytes=1)


def test_events_are_blocks_with_data() -> None:
    body = b": ping\n\ndata: a\n\nevent: x\r\ndata\r\n\r\nid: 1\rdata: b\r\rdata: incomplete\n"
    assert _events_completed(body, 0) == (3, body.index(b"data: incomplete"))
    counted, start = 0, 0
    for end in range(1, len(body) + 1):  # one byte at a time, as messages may split anything
        new, start = _events_completed(body[:end], start)
        counted += new
    assert (counted, start) == (3, body.index(b"data: incomplete"))
