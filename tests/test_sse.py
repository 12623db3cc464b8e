"""EventSourceResponse called as a raw ASGI app: the guarantees of StreamingResponse, for events.

Every producer shape stops when the client leaves, on every spec version; the iterator is closed
before the background task, which runs once; the ping takes turns with the events and never keeps
a departed or stalled client; a stream the library ends (shutdown, send timeout) ends between
events; what cannot be sent as an event is refused with a clear error. The divergences from
sse-starlette (17 to 21) are named in the tests. Real servers are in ``test_sse_servers.py``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.background import BackgroundTask
from starlette.types import Message

from disconnect_responses import EventSourceResponse, Outcome, ServerSentEvent, stopping
from disconnect_responses.testing import Client, request

from .asgi import SHAPES, WATCHDOG, FakeServer, call, call_then_cancel, producer_of
from .servers import Recorder

pytestmark = pytest.mark.anyio

EVENT = b"data: tick\r\n\r\n"
SPEC_VERSIONS = [None, "2.3", "2.4"]


def recorded_response(recorder: Recorder, content: Any, **options: Any) -> EventSourceResponse:
    return EventSourceResponse(content, background=BackgroundTask(recorder.record, "background"), **options)


def endless(shape: str, recorder: Recorder) -> AsyncIterator[bytes] | Iterator[bytes]:
    return producer_of(shape, itertools.repeat(EVENT), lambda: recorder.record("iterator closed"))


def waiting_on_upstream(recorder: Recorder) -> AsyncIterator[str]:
    async def produce() -> AsyncIterator[str]:
        try:
            yield "first"
            await anyio.sleep_forever()
        finally:
            recorder.record("iterator closed")

    return produce()


def assert_whole_events(body: bytes) -> None:
    """The body of an endless stream of ``EVENT``s ends between two of them."""
    assert body.replace(EVENT, b"") == b"", f"the body does not end between events: {body[-40:]!r}"


@pytest.mark.parametrize("spec_version", SPEC_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
async def test_divergence_17_client_leaves_mid_stream(spec_version: str | None, shape: str) -> None:
    recorder = Recorder()
    server = FakeServer(spec_version, leave_after=3)
    response = recorded_response(recorder, endless(shape, recorder))
    await call(response, server)
    assert response.outcome is Outcome.DISCONNECTED
    assert recorder.names() == ["iterator closed", "background"]
    assert server.sent_after_disconnect_received == []
    assert_whole_events(server.body)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("ping", [0, 0.01])
async def test_a_producer_idle_on_its_upstream_stops(spec_version: str, ping: float) -> None:
    recorder = Recorder()
    response = recorded_response(recorder, waiting_on_upstream(recorder), ping=ping)
    result = await request(response, client=Client(leaves_after_events=1), spec_version=spec_version)
    assert result.outcome is Outcome.DISCONNECTED and result.error is None
    assert result.bytes_after_disconnect == 0
    assert recorder.names() == ["iterator closed", "background"]


async def test_a_client_gone_before_the_first_event() -> None:
    # sse-starlette #156: a disconnect before the first item
    recorder = Recorder()
    response = recorded_response(recorder, waiting_on_upstream(recorder))
    result = await request(response, client=Client(leaves_before_body=True))
    assert result.outcome is Outcome.DISCONNECTED and result.error is None
    assert recorder.names() == ["background"]  # the generator never started: nothing to close


async def test_divergence_20_a_ping_only_after_a_quiet_period() -> None:
    """A ping goes out once ``ping`` seconds passed without an event, and takes turns with the
    events: no send overlaps another, and each message is one whole event."""
    pinged = anyio.Event()
    in_send = 0
    most_in_send = 0

    async def on_body(server: FakeServer, message: Message) -> None:
        nonlocal in_send, most_in_send
        in_send += 1
        most_in_send = max(most_in_send, in_send)
        if message["body"].startswith(b":"):
            pinged.set()
        elif message["body"] == b"data: slow\r\n\r\n":
            await anyio.sleep(0.05)  # a slow send, during which a ping falls due and must wait
        in_send -= 1

    async def produce() -> AsyncIterator[str]:
        yield "slow"
        await pinged.wait()
        yield "after"

    server = FakeServer(on_body=on_body)
    await call(EventSourceResponse(produce(), ping=0.01), server)
    bodies = [message["body"] for message in server.body_messages]
    assert most_in_send == 1
    assert bodies[0] == b"data: slow\r\n\r\n" and bodies[-2:] == [b"data: after\r\n\r\n", b""]
    assert all(re.fullmatch(rb": ping - [^\r\n]+\r\n\r\n", body) for body in bodies[1:-2])


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_divergence_20_a_ping_to_a_client_that_left_unnoticed_ends_the_stream(spec_version: str) -> None:
    """No ``http.disconnect`` ever arrives (a half-open connection, sse-starlette #173): on spec 2.4
    the ping's ``send()`` raises and ends the stream; before 2.4 only ``send_timeout`` can."""
    recorder = Recorder()
    if spec_version == "2.4":
        server = FakeServer(spec_version, silent=True, leave_after=1)
    else:
        server = FakeServer(spec_version, silent=True, block_after=2)  # the first ping blocks
    response = recorded_response(recorder, waiting_on_upstream(recorder), ping=0.01, send_timeout=0.05)
    await call(response, server)
    expected = Outcome.DISCONNECTED if spec_version == "2.4" else Outcome.SEND_TIMEOUT
    assert response.outcome is expected
    assert recorder.names() == ["iterator closed", "background"]


async def test_divergence_17_send_timeout_ends_between_events() -> None:
    recorder = Recorder()
    response = recorded_response(recorder, endless("awaiting", recorder), send_timeout=0.05)
    result = await request(response, client=Client(stalls_after_bytes=10 * len(EVENT)))
    assert result.outcome is Outcome.SEND_TIMEOUT
    assert_whole_events(result.body)
    assert recorder.names() == ["iterator closed", "background"]


@pytest.mark.parametrize("shape", SHAPES)
async def test_divergence_17_shutdown_ends_between_events_with_a_last_chunk(shape: str) -> None:
    recorder = Recorder()
    response = recorded_response(recorder, endless(shape, recorder))
    result = await request(response, shutdown_after_events=3)
    assert result.outcome is Outcome.SHUTDOWN and result.complete
    assert_whole_events(result.body)
    assert recorder.names() == ["iterator closed", "background"]


async def test_divergence_21_shutdown_grace_period_lets_the_generator_say_goodbye() -> None:
    """sse-starlette's ``shutdown_grace_period`` is ``shutdown_grace``; ``stopping()`` replaces its
    ``shutdown_event`` (sse-starlette #167)."""

    async def produce() -> AsyncIterator[ServerSentEvent]:
        while not stopping().is_set():
            yield ServerSentEvent("tick")
            await anyio.sleep(0.001)
        yield ServerSentEvent("bye", event="shutdown", retry=2000)

    response = EventSourceResponse(produce(), shutdown_grace_period=WATCHDOG)
    result = await request(response, shutdown_after_events=2)
    assert result.outcome is Outcome.COMPLETED and result.complete
    assert result.body.endswith(b"event: shutdown\r\ndata: bye\r\nretry: 2000\r\n\r\n")


@pytest.mark.parametrize(
    ("option", "replacement"),
    [("client_close_handler_callable", "response.outcome"), ("shutdown_event", "stopping()")],
)
def test_divergence_21_replaced_options_are_refused(option: str, replacement: str) -> None:
    options: dict[str, Any] = {option: object()}
    with pytest.raises(TypeError, match=re.escape(replacement)):
        EventSourceResponse(iter([]), **options)


def test_divergence_21_cleanup_timeout() -> None:
    assert EventSourceResponse(iter([])).cleanup_timeout == 5.0
    assert EventSourceResponse(iter([]), cleanup_timeout=None).cleanup_timeout == math.inf
    with pytest.raises(ValueError, match="cleanup_timeout"):
        EventSourceResponse(iter([]), cleanup_timeout=-1)


@pytest.mark.parametrize("ping", [float("nan"), True])
def test_divergence_20_an_unusable_ping_interval_is_refused(ping: float) -> None:
    with pytest.raises((TypeError, ValueError), match="ping interval"):
        EventSourceResponse(iter([]), ping=ping)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"data": "x", "colour": "red"}, "unexpected keyword argument 'colour'"),
        ({"data": "x", "retry": "soon"}, "retry argument must be int"),
        (ServerSentEvent("x", retry=1.5), "retry argument must be int"),  # type: ignore[arg-type]
    ],
)
@pytest.mark.parametrize("shape", ["async", "sync"])
async def test_an_item_that_is_no_event_is_refused_clearly(item: object, reason: str, shape: str) -> None:
    recorder = Recorder()

    def sync_items() -> Iterator[object]:
        try:
            yield "fine"
            yield item
            yield "never sent"
        finally:
            recorder.record("iterator closed")

    async def async_items() -> AsyncIterator[object]:
        for each in sync_items():
            yield each

    content = async_items() if shape == "async" else sync_items()
    result = await request(recorded_response(recorder, content))
    assert isinstance(result.error, TypeError)
    assert re.search(r"Cannot send .* as a server-sent event: .*" + re.escape(reason), str(result.error))
    assert result.outcome is Outcome.ERROR
    assert result.body == b"data: fine\r\n\r\n"
    assert recorder.names() == ["iterator closed", "background"]


async def test_divergence_21_data_sender_callable_pushes_the_events() -> None:
    send_events, receive_events = anyio.create_memory_object_stream[str](1)

    async def push() -> None:
        async with send_events:
            for number in range(3):
                await send_events.send(f"event {number}")

    response = EventSourceResponse(receive_events, data_sender_callable=push)
    result = await request(response)
    assert result.body == b"data: event 0\r\n\r\ndata: event 1\r\n\r\ndata: event 2\r\n\r\n"
    assert result.outcome is Outcome.COMPLETED


async def test_divergence_21_a_failing_data_sender_ends_the_stream_with_its_error() -> None:
    send_events, receive_events = anyio.create_memory_object_stream[str](1)
    recorder = Recorder()

    async def push() -> None:
        async with send_events:
            raise LookupError("upstream gone")

    response = recorded_response(recorder, receive_events, data_sender_callable=push)
    result = await request(response)
    assert isinstance(result.error, LookupError) and result.outcome is Outcome.ERROR
    assert recorder.names() == ["background"]


async def test_divergence_19_a_pydantic_model_is_sent_as_its_json() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Token(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        text: str
        index: int

    result = await request(EventSourceResponse(iter([Token(text="hi", index=1)])))
    assert result.body == b'data: {"text":"hi","index":1}\r\n\r\n'


async def test_divergence_19_fastapi_events_are_sent_as_fastapi_sends_them() -> None:
    fastapi_sse = pytest.importorskip("fastapi.sse")
    items = [
        fastapi_sse.ServerSentEvent(data={"a": [1, "b"]}, event="e", id="1"),
        fastapi_sse.ServerSentEvent(raw_data="raw"),
    ]
    result = await request(EventSourceResponse(iter(items)))
    assert result.body == b'event: e\ndata: {"a": [1, "b"]}\nid: 1\n\ndata: raw\n\n'


async def test_no_ping_after_the_stream_ended() -> None:
    server = FakeServer(leave_after=1)
    response = EventSourceResponse(waiting_on_upstream(Recorder()), ping=0.001)
    await call(response, server)
    assert response.outcome is Outcome.DISCONNECTED
    sent = len(server.messages)
    await anyio.sleep(0.01)
    assert len(server.messages) == sent


@pytest.mark.parametrize("options", [{"ping": 0.01}, {"send_timeout": 10}], ids=["ping", "send_timeout"])
async def test_a_cancellation_from_outside_is_not_taken_for_the_end_of_a_shutdown_grace(
    anyio_backend: str, options: dict[str, float]
) -> None:
    """On trio a cancellation from outside can reach a task beside the body (the ping, the send
    watchdog) first, which makes the race's nursery cancel its own scope: still ``CANCELLED``, so
    the background task runs shielded."""
    for _ in range(20 if anyio_backend == "trio" else 1):  # which task trio wakes first varies
        recorder = Recorder()
        server = FakeServer()
        response = recorded_response(recorder, waiting_on_upstream(recorder), **options)
        await call_then_cancel(response, server, when=anyio.wait_all_tasks_blocked)
        assert response.outcome is Outcome.CANCELLED
        assert recorder.names() == ["iterator closed", "background"]
