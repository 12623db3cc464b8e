"""Server-Sent Events: turning what a producer yields into the bytes of one event.

Private, except for the two event classes that ``__init__.py`` exports. ``encode`` follows
sse-starlette 3.7 (its ``ensure_bytes`` and ``ServerSentEvent.encode``), byte for byte, for what its
users yield; FastAPI's generator endpoints get FastAPI's own encoding from ``_fastapi.py``. Each
event is one ``send()``, so a stream that stops always stops between events. Changes when the
event-stream format the library speaks changes.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
SEPARATORS = ("\r\n", "\r", "\n")


class ServerSentEvent:
    """One event of a stream, as ``sse_starlette.ServerSentEvent``: yield it from the producer of an
    ``EventSourceResponse``.

    ``data`` (any value; ``str()`` of it is sent, one ``data:`` line per line of it), ``event``,
    ``id`` (line breaks in either are dropped), ``retry`` (milliseconds, an ``int``), ``comment``
    and ``sep`` (the line ending: ``"\\r\\n"``, the default, ``"\\r"`` or ``"\\n"``).
    """

    DEFAULT_SEPARATOR = "\r\n"

    def __init__(
        self,
        data: Any | None = None,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
        comment: str | None = None,
        sep: str | None = None,
    ) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment
        self._sep = sep if sep is not None else self.DEFAULT_SEPARATOR

    def encode(self) -> bytes:
        """The event's bytes on the wire, ending with the blank line that dispatches it."""
        sep = self._sep
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(f": {line}{sep}" for line in _LINE_BREAK.split(str(self.comment)))
        if self.id is not None:
            lines.append(f"id: {_LINE_BREAK.sub('', self.id)}{sep}")
        if self.event is not None:
            lines.append(f"event: {_LINE_BREAK.sub('', self.event)}{sep}")
        if self.data is not None:
            lines.extend(f"data: {line}{sep}" for line in _LINE_BREAK.split(str(self.data)))
        if self.retry is not None:
            if not isinstance(self.retry, int):
                raise TypeError("retry argument must be int")
            lines.append(f"retry: {self.retry}{sep}")
        lines.append(sep)
        return "".join(lines).encode("utf-8")

    def __repr__(self) -> str:
        fields = ("data", "event", "id", "retry", "comment")
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields if getattr(self, name) is not None)
        return f"{type(self).__name__}({shown})"


class JSONServerSentEvent(ServerSentEvent):
    """A ``ServerSentEvent`` whose ``data`` is sent as compact JSON, as sse-starlette's."""

    def __init__(self, data: Any | None = None, **fields: Any) -> None:
        if data is not None:
            data = json.dumps(data, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        super().__init__(data, **fields)


def encode(item: Any, sep: str) -> bytes:
    """One yielded item as an event, as sse-starlette encodes it: bytes as they are, a
    ``ServerSentEvent`` (ours, sse-starlette's or FastAPI's) as itself, a mapping as the fields of
    one, a pydantic model as its JSON (divergence 19), anything else as ``str(item)`` in ``data``."""
    if isinstance(item, (bytes, memoryview)):
        return bytes(item)
    try:
        if isinstance(item, str):
            return ServerSentEvent(item, sep=sep).encode()
        if isinstance(item, Mapping):
            return ServerSentEvent(**{**item, "sep": sep}).encode()
        own_encode = getattr(item, "encode", None)
        if own_encode is not None:  # sse-starlette's events and ours
            encoded = own_encode()
            if not isinstance(encoded, bytes):
                raise TypeError(f"its encode() returned {type(encoded).__name__}, not bytes")
            return encoded
        fastapi_event = _fastapi_event(item)
        if fastapi_event is not None:
            return fastapi_event(item)
        dump_json = getattr(item, "model_dump_json", None)
        if dump_json is not None:
            return ServerSentEvent(dump_json(), sep=sep).encode()
        return ServerSentEvent(str(item), sep=sep).encode()
    except Exception as exc:
        raise TypeError(f"Cannot send {reprlib.repr(item)} as a server-sent event: {exc}") from exc


def ping_message(sep: str) -> ServerSentEvent:
    """sse-starlette's keep-alive: a comment with the time, which ``EventSource`` ignores."""
    return ServerSentEvent(comment=f"ping - {datetime.now(timezone.utc)}", sep=sep)


def _fastapi_event(item: Any) -> Callable[[Any], bytes] | None:
    # FastAPI's ServerSentEvent (a pydantic model) is recognised without importing FastAPI.
    if type(item).__name__ == "ServerSentEvent" and type(item).__module__ == "fastapi.sse":
        from ._fastapi import encode_fastapi_event

        return encode_fastapi_event
    return None
