"""FastAPI's generator endpoints with ``response_class=EventSourceResponse``: FastAPI's bytes, the
library's guarantees.

Called in-process with ``disconnect_responses.testing.request``. The same endpoints are served with
``fastapi.sse.EventSourceResponse`` (FastAPI 0.135+): the events must be byte for byte the same, and
where FastAPI's own streaming falls short (the generator's ``finally`` after the background task, or
never; an ``ExceptionGroup`` for a validation error) the test shows both. Real servers are in
``test_sse_servers.py``; FastAPI's private shapes are pinned in ``test_assumptions.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import fastapi
import pytest
from fastapi import APIRouter, BackgroundTasks, FastAPI
from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel

from disconnect_responses import EventSourceResponse, Outcome, StreamingResponse, _fastapi
from disconnect_responses._fastapi import endpoint_source
from disconnect_responses.testing import Client, request

from .servers import Recorder

FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        FASTAPI_VERSION < (0, 134), reason=f"FastAPI {fastapi.__version__} has no generator endpoints (added in 0.134)"
    ),
]
needs_fastapi_sse = pytest.mark.skipif(
    FASTAPI_VERSION < (0, 135), reason=f"FastAPI {fastapi.__version__} has no fastapi.sse (added in 0.135)"
)


class Item(BaseModel):
    name: str
    price: float


def fastapi_events() -> list[Any]:
    from fastapi.sse import ServerSentEvent

    return [
        ServerSentEvent(data={"x": [1, "two", None]}, event="update", id="7", retry=1500, comment="a\ncomment"),
        ServerSentEvent(raw_data="<p>raw\nhtml</p>"),
        ServerSentEvent(data=Item(name="model", price=1)),
        ServerSentEvent(comment="just a comment"),
        ServerSentEvent(data="a string, quoted"),
    ]


ITEMS: dict[str, Any] = {
    "models": lambda: [Item(name="a", price=1), {"name": "b", "price": "2.5"}, Item(name="ünï\ncode", price=0.1)],
    "events": fastapi_events,
}


def sse_app(response_class: type, recorder: Recorder, items: list[Any]) -> FastAPI:
    """Endpoints for one response class: ``/async`` and ``/sync`` yield ``items``, ``/endless/<shape>``
    yields models forever (``awaiting``, ``never-awaiting`` or ``sync``), ``/untyped`` yields plain
    JSON-able values; each records "iterator closed" and "background"."""
    app = FastAPI()

    @app.get("/async", response_class=response_class)
    async def async_items(background_tasks: BackgroundTasks) -> AsyncIterable[Item]:
        background_tasks.add_task(recorder.record, "background")
        try:
            for item in items:
                await anyio.lowlevel.checkpoint()
                yield item
        finally:
            recorder.record("iterator closed")

    @app.get("/sync", response_class=response_class)
    def sync_items(background_tasks: BackgroundTasks) -> Iterable[Item]:
        background_tasks.add_task(recorder.record, "background")
        try:
            yield from items
        finally:
            recorder.record("iterator closed")

    @app.get("/untyped", response_class=response_class)
    async def untyped() -> AsyncIterator[Any]:
        for value in [1, 2.5, "text", None, [1, {"a": b"bytes"}], {"nested": {"list": [True]}}]:
            yield value

    @app.get("/endless/awaiting", response_class=response_class)
    async def awaiting(background_tasks: BackgroundTasks) -> AsyncIterable[Item]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                await anyio.lowlevel.checkpoint()
                yield Item(name="tick", price=0)
        finally:
            recorder.record("iterator closed")

    @app.get("/endless/never-awaiting", response_class=response_class)
    async def never_awaiting(background_tasks: BackgroundTasks) -> AsyncIterable[Item]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                yield Item(name="tick", price=0)
        finally:
            recorder.record("iterator closed")

    @app.get("/endless/sync", response_class=response_class)
    def sync_endless(background_tasks: BackgroundTasks) -> Iterator[Item]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                yield Item(name="tick", price=0)
        finally:
            recorder.record("iterator closed")

    return app


@needs_fastapi_sse
@pytest.mark.parametrize("path", ["/async", "/sync"])
@pytest.mark.parametrize("items", ITEMS.values(), ids=ITEMS.keys())
async def test_the_same_events_as_fastapi_sse(items: Any, path: str) -> None:
    from fastapi.sse import EventSourceResponse as FastAPIEventSourceResponse

    bodies = []
    for response_class in (EventSourceResponse, FastAPIEventSourceResponse):
        result = await request(sse_app(response_class, Recorder(), items()), "GET", path)
        assert result.status == 200 and result.complete and result.error is None
        bodies.append(result.body)
    assert bodies[0] == bodies[1]


@needs_fastapi_sse
async def test_the_same_json_for_untyped_items() -> None:
    from fastapi.sse import EventSourceResponse as FastAPIEventSourceResponse

    bodies = [
        (await request(sse_app(response_class, Recorder(), []), "GET", "/untyped")).body
        for response_class in (EventSourceResponse, FastAPIEventSourceResponse)
    ]
    assert bodies[0] == bodies[1]


async def test_items_are_json_in_fastapis_layout() -> None:
    """Also on FastAPI 0.134, which has no ``fastapi.sse``: its layout, ``\\n`` line endings."""
    result = await request(sse_app(EventSourceResponse, Recorder(), ITEMS["models"]()), "GET", "/async")
    assert result.body == (
        b'data: {"name":"a","price":1.0}\n\ndata: {"name":"b","price":2.5}\n\n'
        b'data: {"name":"\xc3\xbcn\xc3\xaf\\ncode","price":0.1}\n\n'
    )
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"


@pytest.mark.parametrize("path", ["/async", "/sync"])
async def test_an_item_that_fails_validation_ends_the_stream_with_fastapis_error(path: str) -> None:
    recorder = Recorder()
    items = [Item(name="fine", price=1), {"name": "no price"}, Item(name="never", price=2)]
    result = await request(sse_app(EventSourceResponse, recorder, items), "GET", path)
    assert isinstance(result.error, ResponseValidationError)  # not inside an ExceptionGroup
    assert result.outcome is Outcome.ERROR
    assert result.body == b'data: {"name":"fine","price":1.0}\n\n'
    assert recorder.names() == ["iterator closed", "background"]


@pytest.mark.parametrize("shape", ["awaiting", "never-awaiting", "sync"])
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_divergence_16_the_generator_is_closed_before_the_background_task(shape: str, spec_version: str) -> None:
    recorder = Recorder()
    app = sse_app(EventSourceResponse, recorder, [])
    result = await request(
        app, "GET", f"/endless/{shape}", client=Client(leaves_after_events=3), spec_version=spec_version
    )
    assert result.outcome is Outcome.DISCONNECTED and result.error is None
    assert result.bytes_after_disconnect == 0
    assert recorder.names() == ["iterator closed", "background"]


@pytest.mark.parametrize("shape", ["awaiting", "never-awaiting", "sync"])
async def test_divergence_16_streaming_response_class_closes_the_endpoints_generator_itself(shape: str) -> None:
    """``response_class=StreamingResponse`` on a generator endpoint: FastAPI relays an async
    generator through one of its own, which the response unwraps (divergence 16)."""
    recorder = Recorder()
    app = FastAPI()

    @app.get("/awaiting", response_class=StreamingResponse)
    async def awaiting(background_tasks: BackgroundTasks) -> AsyncIterator[bytes]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                await anyio.lowlevel.checkpoint()
                yield b"x" * 1024
        finally:
            recorder.record("iterator closed")

    @app.get("/never-awaiting", response_class=StreamingResponse)
    async def never_awaiting(background_tasks: BackgroundTasks) -> AsyncIterator[bytes]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                yield b"x" * 1024
        finally:
            recorder.record("iterator closed")

    @app.get("/sync", response_class=StreamingResponse)
    def sync(background_tasks: BackgroundTasks) -> Iterator[bytes]:
        background_tasks.add_task(recorder.record, "background")
        try:
            while True:
                yield b"x" * 1024
        finally:
            recorder.record("iterator closed")

    result = await request(app, "GET", f"/{shape}", client=Client(leaves_after_bytes=64 * 1024))
    assert result.outcome is Outcome.DISCONNECTED
    assert recorder.names() == ["iterator closed", "background"]


class TimedRoute(APIRoute):
    """An app's own route class."""


async def test_a_routers_default_response_class_and_own_route_class() -> None:
    router = APIRouter(default_response_class=EventSourceResponse, route_class=TimedRoute)

    @router.get("/ticks")
    async def ticks() -> AsyncIterable[Item]:
        yield Item(name="t", price=1)

    app = FastAPI()
    app.include_router(router)
    result = await request(app, "GET", "/ticks")
    assert result.body == b'data: {"name":"t","price":1.0}\n\n'
    assert result.outcome is Outcome.COMPLETED


async def test_a_returned_response_keeps_sse_starlettes_encoding() -> None:
    app = FastAPI()

    @app.get("/returned")
    async def returned() -> EventSourceResponse:
        return EventSourceResponse(iter(["plain", {"data": "d", "event": "e"}]))

    result = await request(app, "GET", "/returned")
    assert result.body == b"data: plain\r\n\r\nevent: e\r\ndata: d\r\n\r\n"


def test_divergence_16_a_changed_relay_is_streamed_as_it_is_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fastapi, "_warned", set())
    namespace: dict[str, Any] = {}
    source = "async def _async_stream_raw(stream):\n    async for chunk in stream:\n        yield chunk\n"
    exec(compile(source, "/site-packages/fastapi/routing.py", "exec"), namespace)

    async def inner() -> AsyncIterator[bytes]:
        yield b"x"

    relay = namespace["_async_stream_raw"](inner())
    with pytest.warns(RuntimeWarning, match=f"FastAPI {fastapi.__version__}"):
        assert endpoint_source(relay) is relay
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert endpoint_source(namespace["_async_stream_raw"](inner())) is not None  # warned once
