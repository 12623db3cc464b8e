"""On a normal run, our EventSourceResponse sends exactly the ASGI messages sse-starlette 3.7's sends.

Both classes get the same constructor arguments and content (built fresh for each, with each
library's own event classes), the same scope and a client that stays; the messages they hand to
``send()`` must be equal, in order. Pings are compared on their own: sse-starlette pings on a fixed
period and ours after a quiet period (divergence 20), so only their bytes are compared. What we do
differently on purpose has its own test, named after the divergence.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import starlette
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.background import BackgroundTask
from starlette.types import Message

import disconnect_responses
from disconnect_responses import EventSourceResponse

from .asgi import FakeServer, messages_of
from .servers import http_scope

sse_starlette = pytest.importorskip("sse_starlette")
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not hasattr(sse_starlette.EventSourceResponse, "_listen_for_exit_signal_with_grace"),
        reason=f"parity is with sse-starlette 3.7+, which needs a newer Starlette than {starlette.__version__}",
    ),
]


@pytest.fixture(autouse=True)
def no_exit_flag() -> Iterator[None]:
    # Importing sse-starlette patches uvicorn's exit handler to set this process-wide flag, which
    # ends every sse-starlette stream at once: a server stopped by another test may have set it.
    sse_starlette.sse.AppStatus.should_exit = False
    yield
    sse_starlette.sse.AppStatus.should_exit = False


Items = Callable[[Any, Any], list[Any]]  # (ServerSentEvent, JSONServerSentEvent) -> items


def events_of(module: Any) -> tuple[Any, Any]:
    if module is disconnect_responses:
        return module.ServerSentEvent, module.JSONServerSentEvent
    from sse_starlette.event import JSONServerSentEvent, ServerSentEvent

    return ServerSentEvent, JSONServerSentEvent


ITEMS: dict[str, Items] = {
    "strings": lambda Event, JSONEvent: ["hello", "", "two\nlines", "crlf\r\nand\rcr", "ünïcödé ✓"],
    "bytes": lambda Event, JSONEvent: [b"data: preformatted\n\n", memoryview(b"data: view\r\n\r\n")],
    "dicts": lambda Event, JSONEvent: [
        {"data": "d", "event": "update", "id": "7", "retry": 3000},
        {"data": "multi\nline", "comment": "a\ncomment"},
        {"comment": "only a comment"},
        {"event": "no-data"},
        {"data": "x", "sep": "\n"},
        {"id": "line\nbreak", "event": "an\r\nevent", "data": 1},
    ],
    "events": lambda Event, JSONEvent: [
        Event("plain"),
        Event(data={"a": 1}, event="e", id="i", retry=10, comment="c"),
        Event(data="sep", sep="\n"),
        Event(),
        JSONEvent({"text": "ünï", "n": [1, 2.5, None]}),
        JSONEvent(None, event="empty"),
    ],
    "objects": lambda Event, JSONEvent: [1, 2.5, None, True, ["a", "b"]],
}


def content_of(items: list[Any], kind: str) -> AsyncIterator[Any] | Iterator[Any]:
    if kind == "sync":
        return iter(items)

    async def produce() -> AsyncIterator[Any]:
        for item in items:
            await anyio.lowlevel.checkpoint()
            yield item

    return produce()


async def both(
    items: Items, kind: str = "async", method: str = "GET", **kwargs: Any
) -> tuple[list[Message], list[Message]]:
    sent = []
    for module, cls in (
        (disconnect_responses, EventSourceResponse),
        (sse_starlette, sse_starlette.EventSourceResponse),
    ):
        response = cls(content_of(items(*events_of(module)), kind), ping=0, **kwargs)
        sent.append(await messages_of(response, http_scope(method=method)))
    return sent[0], sent[1]


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("items", ITEMS.values(), ids=ITEMS.keys())
async def test_the_same_messages(items: Items, kind: str) -> None:
    ours, theirs = await both(items, kind)
    assert ours == theirs


@pytest.mark.parametrize("sep", [None, "\r\n", "\r", "\n"])
@pytest.mark.parametrize("items", ITEMS.values(), ids=ITEMS.keys())
async def test_the_same_messages_with_each_separator(items: Items, sep: str | None) -> None:
    ours, theirs = await both(items, sep=sep)
    assert ours == theirs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"status_code": 201},
        {"headers": {"Cache-Control": "no-cache"}},
        {"headers": {"X-Accel-Buffering": "yes", "Connection": "close", "X-Custom": "1"}},
        {"media_type": "text/plain"},
        {"media_type": "application/x-ndjson", "headers": {"content-type": "text/event-stream"}},
    ],
    ids=["defaults", "status", "cache-control", "forced-headers", "media-type", "content-type-header"],
)
async def test_the_same_start(options: dict[str, Any]) -> None:
    ours, theirs = await both(ITEMS["strings"], **options)
    assert ours == theirs


async def test_divergence_18_head_sends_headers_and_an_empty_body() -> None:
    # the same as sse-starlette (its #218); Starlette's StreamingResponse streams on HEAD
    ours, theirs = await both(ITEMS["strings"], method="HEAD")
    assert ours == theirs
    assert [message["type"] for message in ours] == ["http.response.start", "http.response.body"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_the_background_task_runs_once(method: str) -> None:
    runs: list[str] = []
    for module, cls in (
        (disconnect_responses, EventSourceResponse),
        (sse_starlette, sse_starlette.EventSourceResponse),
    ):
        response = cls(iter(["a"]), ping=0, background=BackgroundTask(runs.append, module.__name__))
        await messages_of(response, http_scope(method=method))
    assert runs == ["disconnect_responses", "sse_starlette"]


@settings(max_examples=60, deadline=None)
@given(
    data=st.one_of(st.none(), st.text(), st.integers()),
    event=st.one_of(st.none(), st.text()),
    id=st.one_of(st.none(), st.text()),
    retry=st.one_of(st.none(), st.integers(min_value=0)),
    comment=st.one_of(st.none(), st.text()),
    sep=st.sampled_from([None, "\r\n", "\r", "\n"]),
)
def test_any_event_fields(
    data: str | int | None, event: str | None, id: str | None, retry: int | None, comment: str | None, sep: str | None
) -> None:
    fields = {"data": data, "event": event, "id": id, "retry": retry, "comment": comment}

    def items(Event: Any, JSONEvent: Any) -> list[Any]:
        return [Event(**fields, sep=sep), fields, data]

    ours, theirs = anyio.run(lambda: both(items, sep=sep))
    assert ours == theirs


@pytest.mark.parametrize(
    "arguments",
    [{"sep": "\r\n\r\n"}, {"sep": ""}, {"ping": -1}, {"ping": "15"}],
    ids=["long-sep", "empty-sep", "negative-ping", "string-ping"],
)
def test_the_same_refusals(arguments: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)) as theirs:
        sse_starlette.EventSourceResponse(iter([]), **arguments)
    with pytest.raises(type(theirs.value)):
        EventSourceResponse(iter([]), **arguments)


async def test_a_bad_retry_is_refused_alike() -> None:
    for module in (disconnect_responses, sse_starlette):
        Event, _ = events_of(module)
        with pytest.raises(TypeError, match="retry argument must be int"):
            Event("x", retry="10").encode()


@pytest.mark.parametrize("factory", [None, "custom"])
async def test_the_same_ping(factory: str | None) -> None:
    pings: list[bytes] = []
    for module, cls in (
        (disconnect_responses, EventSourceResponse),
        (sse_starlette, sse_starlette.EventSourceResponse),
    ):
        Event, _ = events_of(module)
        pinged = anyio.Event()

        async def on_body(server: FakeServer, message: Message, pinged: anyio.Event = pinged) -> None:
            if message["body"].startswith(b":"):
                pinged.set()

        async def produce(pinged: anyio.Event = pinged) -> AsyncIterator[str]:
            yield "before"
            await pinged.wait()
            yield "after"

        make_ping = None if factory is None else (lambda Event=Event: Event(comment="keep\nalive", event="ping"))
        server = FakeServer(on_body=on_body)
        response = cls(produce(), ping=0.01, ping_message_factory=make_ping)
        with anyio.fail_after(5):
            await response(server.scope(), server.receive, server.send)
        bodies = [message["body"] for message in server.body_messages]
        assert [body for body in bodies if not body.startswith(b":")] == [
            b"data: before\r\n\r\n",
            b"data: after\r\n\r\n",
            b"",
        ]
        pings.append(next(body for body in bodies if body.startswith(b":")))
    if factory is None:
        assert all(
            re.fullmatch(rb": ping - \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+00:00\r\n\r\n", ping) for ping in pings
        )
    else:
        assert pings[0] == pings[1] == b": keep\r\n: alive\r\nevent: ping\r\n\r\n"
