"""On a normal run, our StreamingResponse sends exactly the ASGI messages Starlette's sends.

Both classes get the same content (built fresh for each), the same scope and a ``receive()`` that never
reports a disconnect; the messages they hand to ``send()`` must be equal, in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.lowlevel
import pytest
import starlette.responses
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.background import BackgroundTask
from starlette.types import Message, Scope

from disconnect_responses import Outcome, StreamingResponse

pytestmark = pytest.mark.anyio

Chunk = str | bytes | memoryview
Content = Callable[[], AsyncIterator[Chunk] | Iterator[Chunk]]


def scope(type: str = "http", spec_version: str | None = "2.3") -> Scope:
    asgi = {"version": "3.0"}
    if spec_version is not None:
        asgi["spec_version"] = spec_version
    return {
        "type": type,
        "asgi": asgi,
        "method": "GET",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "scheme": "http",
        "http_version": "1.1",
    }


async def messages_of(response: starlette.responses.StreamingResponse, request_scope: Scope) -> list[Message]:
    sent: list[Message] = []
    never = anyio.Event()

    async def receive() -> Message:
        await never.wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await response(request_scope, receive, send)
    return sent


def sync_chunks(*chunks: Chunk) -> Content:
    def content() -> Iterator[Chunk]:
        yield from chunks

    return content


def async_chunks(*chunks: Chunk) -> Content:
    async def content() -> AsyncIterator[Chunk]:
        for chunk in chunks:
            await anyio.lowlevel.checkpoint()
            yield chunk

    return content


def list_chunks(*chunks: Chunk) -> Content:
    return lambda: iter(list(chunks))


CONTENTS = {
    "sync-bytes": sync_chunks(b"hello", b" ", b"world"),
    "async-bytes": async_chunks(b"hello", b" ", b"world"),
    "sync-str": sync_chunks("h\u00e9llo", " w\u00f6rld"),
    "async-str": async_chunks("data: 1\n\n", "data: 2\n\n"),
    "memoryview": async_chunks(memoryview(b"abcdef")[1:4], memoryview(bytearray(b"xyz"))),
    "mixed": sync_chunks(b"a", "b", memoryview(b"c")),
    "list": list_chunks(b"x" * 70000, b"y"),
    "empty-chunks": async_chunks(b"", b"a", b""),
    "empty": sync_chunks(),
}

RESPONSE_ARGS: dict[str, dict[str, object]] = {
    "defaults": {},
    "media-type": {"media_type": "text/event-stream"},
    "text-charset": {"media_type": "text/plain"},
    "headers": {"headers": {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}, "media_type": "text/csv"},
    "content-length": {"headers": {"content-length": "11"}},
    "status-201": {"status_code": 201},
    "status-404": {"status_code": 404, "media_type": "application/json"},
}


def build(
    cls: type[starlette.responses.StreamingResponse], content: Content, args: dict[str, object]
) -> starlette.responses.StreamingResponse:
    status_code = args.get("status_code", 200)
    headers = args.get("headers")
    media_type = args.get("media_type")
    assert isinstance(status_code, int)
    assert headers is None or isinstance(headers, dict)
    assert media_type is None or isinstance(media_type, str)
    return cls(content(), status_code=status_code, headers=headers, media_type=media_type)


@pytest.mark.parametrize("spec_version", [None, "2.3", "2.4"])
@pytest.mark.parametrize("args", RESPONSE_ARGS)
@pytest.mark.parametrize("content", CONTENTS)
async def test_same_messages_as_starlette(content: str, args: str, spec_version: str | None) -> None:
    theirs = build(starlette.responses.StreamingResponse, CONTENTS[content], RESPONSE_ARGS[args])
    ours = build(StreamingResponse, CONTENTS[content], RESPONSE_ARGS[args])
    assert ours.raw_headers == theirs.raw_headers
    expected = await messages_of(theirs, scope(spec_version=spec_version))
    assert await messages_of(ours, scope(spec_version=spec_version)) == expected
    assert isinstance(ours, StreamingResponse)
    assert ours.outcome is Outcome.COMPLETED


async def test_background_task_runs_once_as_in_starlette() -> None:
    runs: list[str] = []
    theirs = starlette.responses.StreamingResponse(iter([b"a"]), background=BackgroundTask(runs.append, "theirs"))
    ours = StreamingResponse(iter([b"a"]), background=BackgroundTask(runs.append, "ours"))
    assert await messages_of(ours, scope()) == await messages_of(theirs, scope())
    assert sorted(runs) == ["ours", "theirs"]


@pytest.mark.skipif(
    not hasattr(starlette.responses.Response, "_wrap_websocket_denial_send"),
    reason="Starlette before 0.42 does not deny websockets with a response",
)
@pytest.mark.parametrize("content", ["sync-bytes", "async-str"])
async def test_websocket_denial_same_messages_as_starlette(content: str) -> None:
    args = {"status_code": 403, "media_type": "text/plain"}
    theirs = build(starlette.responses.StreamingResponse, CONTENTS[content], args)
    ours = build(StreamingResponse, CONTENTS[content], args)
    expected = await messages_of(theirs, scope("websocket"))
    assert [message["type"] for message in expected][0] == "websocket.http.response.start"
    assert await messages_of(ours, scope("websocket")) == expected


chunk_strategy = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32),
    st.binary(max_size=64).map(lambda data: memoryview(data)),
)


@settings(max_examples=50, deadline=None, database=None)
@given(chunks=st.lists(chunk_strategy, max_size=8), asynchronous=st.booleans())
async def test_same_messages_for_any_chunks(chunks: list[Chunk], asynchronous: bool) -> None:
    content = async_chunks(*chunks) if asynchronous else sync_chunks(*chunks)
    theirs = starlette.responses.StreamingResponse(content())
    ours = StreamingResponse(content())
    assert await messages_of(ours, scope()) == await messages_of(theirs, scope())
