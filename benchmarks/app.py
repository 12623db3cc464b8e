"""The ASGI application under test, and the server process that runs it.

One server process serves one implementation: ``python -m benchmarks.app --impl ours --server
uvicorn --port 8000 --file big.bin``. Both implementations run the same code below; only the two
response classes differ. Routes:

- ``/file``: ``FileResponse`` on the benchmark file (a ``Range`` header is honoured as usual).
- ``/stream?kind=never|await|sync&chunk=N&size=N``: a body of ``size`` bytes in ``chunk``-sized
  pieces, all the same bytes object, from an async generator that never awaits, one that awaits
  ``anyio.sleep(0)`` before each chunk, or a sync generator.
- ``/small``: a 1 KiB body streamed from a never-awaiting async generator.
- ``/smallfile``: ``FileResponse`` on a 4 KiB file (``--small-file``), what most download
  endpoints serve.
- ``/disconnect?id=X&kind=never|await|sync|file&chunk=N&size=N``: as ``/stream`` or ``/file``, but
  recording a ``time.monotonic()`` timestamp and size for every body message handed to ``send()``,
  when ``http.disconnect`` arrived, when the body iterator was closed and when the background task
  started. ``/records?id=X`` returns that record as JSON, with ``done`` once the background task ran.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from urllib.parse import parse_qs

import anyio.lowlevel
import starlette.responses
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SMALL_BODY = b"x" * 1024


@dataclass
class Record:
    sends: list[tuple[float, int]] = field(default_factory=list)
    disconnect_at: float | None = None
    closed_at: float | None = None
    background_at: float | None = None
    closed_before_background: bool | None = None


def response_classes(
    impl: str,
) -> tuple[type[starlette.responses.StreamingResponse], type[starlette.responses.FileResponse] | None]:
    if impl == "starlette":
        return starlette.responses.StreamingResponse, starlette.responses.FileResponse
    if impl == "ours":
        import disconnect_responses

        file_response: type[starlette.responses.FileResponse] | None = getattr(
            disconnect_responses, "FileResponse", None
        )
        return disconnect_responses.StreamingResponse, file_response
    raise ValueError(f"unknown implementation {impl!r}")


@cache
def block(size: int) -> bytes:
    return b"x" * size


async def never_awaiting(chunk: bytes, count: int, record: Record | None = None) -> AsyncIterator[bytes]:
    try:
        for _ in range(count):
            yield chunk
    finally:
        if record is not None:
            record.closed_at = time.monotonic()


async def awaiting(chunk: bytes, count: int, record: Record | None = None) -> AsyncIterator[bytes]:
    try:
        for _ in range(count):
            await anyio.lowlevel.checkpoint()
            yield chunk
    finally:
        if record is not None:
            record.closed_at = time.monotonic()


def sync_iterator(chunk: bytes, count: int, record: Record | None = None) -> Iterator[bytes]:
    try:
        for _ in range(count):
            yield chunk
    finally:
        if record is not None:
            record.closed_at = time.monotonic()


Producer = Callable[[bytes, int, "Record | None"], AsyncIterator[bytes] | Iterator[bytes]]
PRODUCERS: dict[str, Producer] = {"never": never_awaiting, "await": awaiting, "sync": sync_iterator}


def file_is_open(path: str) -> bool:
    """Whether this process holds a descriptor on ``path`` (Linux ``/proc/self/fd``)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def build_app(impl: str, file_path: str, small_file_path: str) -> ASGIApp:
    streaming_response, file_response = response_classes(impl)
    file_path = os.path.realpath(file_path)
    records: dict[str, Record] = {}

    def body(params: dict[str, str], record: Record | None = None) -> Response:
        kind = params.get("kind", "never")
        if kind == "file":
            if file_response is None:
                return PlainTextResponse("FileResponse is not available", status_code=501)
            return file_response(file_path)
        chunk = int(params.get("chunk", 65536))
        count = max(1, int(params.get("size", chunk)) // chunk)
        return streaming_response(PRODUCERS[kind](block(chunk), count, record), media_type="application/octet-stream")

    async def background(record: Record, kind: str) -> None:
        record.background_at = time.monotonic()
        if kind == "file":
            # No generator of ours to observe: look for a descriptor still open on the file.
            record.closed_before_background = not file_is_open(file_path)
        else:
            record.closed_before_background = record.closed_at is not None

    async def recorded(params: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
        record = records[params["id"]] = Record()
        response = body(params, record)

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and record.disconnect_at is None:
                record.disconnect_at = time.monotonic()
            return message

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                record.sends.append((time.monotonic(), len(message.get("body", b""))))
            await send(message)

        response.background = BackgroundTask(background, record, params.get("kind", "never"))
        await response(scope, recording_receive, recording_send)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        params = {key: values[-1] for key, values in parse_qs(scope["query_string"].decode()).items()}
        if path == "/small":
            response: Response = streaming_response(never_awaiting(SMALL_BODY, 1), media_type="text/plain")
        elif path == "/file":
            response = body({"kind": "file"})
        elif path == "/smallfile" and file_response is not None:
            response = file_response(small_file_path)
        elif path == "/stream":
            response = body(params)
        elif path == "/disconnect":
            await recorded(params, scope, receive, send)
            return
        elif path == "/records":
            found = records.get(params.get("id", ""))
            if found is None:
                response = PlainTextResponse("no such record", status_code=404)
            else:
                done = found.background_at is not None
                if done:
                    del records[params["id"]]
                response = JSONResponse({"done": done, **asdict(found)})
        else:
            response = PlainTextResponse("not found", status_code=404)
        await response(scope, receive, send)

    return app


def exit_with_parent(parent: int) -> None:
    # A benchmark killed with SIGKILL cannot stop its servers: they stop themselves.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def serve(app: ASGIApp, server: str, port: int) -> None:
    if server in ("uvicorn", "uvicorn-h11"):
        import uvicorn

        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools" if server == "uvicorn" else "h11",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        uvicorn.Server(config).run()
        return
    from hypercorn.config import Config

    hypercorn_config = Config()
    hypercorn_config.bind = [f"127.0.0.1:{port}"]
    hypercorn_config.backlog = 1024
    hypercorn_config.graceful_timeout = 1
    hypercorn_config.accesslog = None
    if server == "hypercorn":
        import asyncio

        from hypercorn.asyncio import serve as asyncio_serve

        asyncio.run(asyncio_serve(app, hypercorn_config))  # type: ignore[arg-type]
    elif server == "hypercorn-trio":
        from functools import partial

        import trio
        from hypercorn.trio import serve as trio_serve

        trio.run(partial(trio_serve, app, hypercorn_config))  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown server {server!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["starlette", "ours"], required=True)
    parser.add_argument("--server", default="uvicorn")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--small-file", required=True)
    parser.add_argument("--parent", type=int, help="exit when this process is no longer the parent")
    args = parser.parse_args()
    if args.parent:
        exit_with_parent(args.parent)
    serve(build_app(args.impl, args.file, args.small_file), args.server, args.port)


if __name__ == "__main__":
    main()
