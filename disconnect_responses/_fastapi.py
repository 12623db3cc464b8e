"""FastAPI's generator endpoints: reaching the endpoint's own generator, and FastAPI's event encoding.

Private. A FastAPI endpoint that ``yield``s, with one of the library's classes as its
``response_class``, is streamed through that class: FastAPI calls it with the endpoint's
generator. Two things about that call rest on FastAPI's private shapes, so they live here, each
detected before it is relied on, with one warning naming the FastAPI version where the shape is not
found, and a working fallback:

- ``endpoint_source`` takes the endpoint's own async generator out of FastAPI's relay, so that the
  response closes the generator itself and its ``finally`` runs before the background task
  (closing the relay leaves the generator to the garbage collector).
- ``event_encoder`` encodes what an ``EventSourceResponse`` endpoint yields as ``fastapi.sse``
  does: ``fastapi.sse.ServerSentEvent`` items by their fields, anything else validated against the
  item type of the endpoint's return annotation and sent as JSON in ``data``.

FastAPI is imported only when a response meets one of its endpoints. Changes when FastAPI's routing
changes. Pinned assumptions (``tests/test_assumptions.py``), checked on FastAPI 0.134.0, 0.135.0
and 0.165.0:

F1. For an async generator endpoint FastAPI calls ``response_class(content=relay, ...)`` where
    ``relay`` is an async generator of ``fastapi/routing.py`` named ``_async_stream_raw``, not yet
    started, whose frame holds the endpoint's generator as the local ``async_gen``. A sync
    generator endpoint's generator is passed as it is.
F2. ``scope["route"]`` is the ``APIRoute``, with ``endpoint``, ``unique_id``, ``response_model``
    (``None`` for a generator endpoint with a stream annotation) and the ``response_model_*``
    options; ``fastapi.dependencies.utils`` has ``get_typed_return_annotation`` and
    ``get_stream_item_type``, ``fastapi.utils`` has ``create_model_field``, whose field has
    ``validate(value, values, loc=)`` and ``serialize_json(value, include=, ...)``.
F3. ``fastapi.sse`` (0.135+) encodes an event as ``format_sse_event`` does: comment, event, data,
    id and retry lines, in that order, each ending in ``"\\n"``, and the blank line.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from starlette.types import Scope

Encoder = Callable[[Any], bytes]
# Per endpoint function, then per route (a route is not hashable): built once, as FastAPI builds its own.
_encoders: weakref.WeakKeyDictionary[Any, dict[int, Encoder]] = weakref.WeakKeyDictionary()
_warned: set[str] = set()


def endpoint_source(content: Any) -> Any:
    """The endpoint's own generator if ``content`` is FastAPI's relay of it (F1), else ``content``."""
    code = getattr(content, "ag_code", None)
    if code is None or code.co_name != "_async_stream_raw" or not code.co_filename.endswith("routing.py"):
        return content
    frame = content.ag_frame
    source = frame.f_locals.get("async_gen") if frame is not None else None
    if not isinstance(source, types.AsyncGeneratorType):
        _warn_once("relay", "the endpoint's generator is closed by FastAPI's relay, maybe after the background task")
        return content
    return source


def event_encoder(scope: Scope) -> Encoder | None:
    """FastAPI's encoding for the events of a generator endpoint of FastAPI's routing, or ``None``
    for any other caller (who gets sse-starlette's encoding)."""
    route = scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    if endpoint is None or not _is_generator_function(endpoint) or not _is_api_route(route):
        return None
    per_route = _encoders.setdefault(endpoint, {})
    encoder = per_route.get(id(route))
    if encoder is None:
        encoder = per_route[id(route)] = _encoder_for(route)
    return encoder


def encode_fastapi_event(event: Any) -> bytes:
    """A ``fastapi.sse.ServerSentEvent`` as ``fastapi.sse`` sends it: its data as JSON (a pydantic
    model's own), or its ``raw_data`` as it is; not validated, as in FastAPI."""
    if event.raw_data is not None:
        data: str | None = event.raw_data
    elif event.data is None:
        data = None
    elif hasattr(event.data, "model_dump_json"):
        data = event.data.model_dump_json()
    else:
        data = _json(event.data)
    return format_event(data, event.event, event.id, event.retry, event.comment)


def format_event(
    data: str | None,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """An event in FastAPI's layout (F3)."""
    lines: list[str] = []
    if comment is not None:
        lines.extend(f": {line}" for line in _split_lines(comment))
    if event is not None:
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {line}" for line in _split_lines(data))
    if id is not None:
        lines.append(f"id: {id}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    lines.append("\n")
    return "\n".join(lines).encode("utf-8")


PING = b": ping\n\n"


def _split_lines(value: str) -> list[str]:
    return value.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _encoder_for(route: Any) -> Encoder:
    serialize = _item_serializer(route)

    def encode(item: Any) -> bytes:
        if type(item).__name__ == "ServerSentEvent" and type(item).__module__ == "fastapi.sse":
            return encode_fastapi_event(item)
        return format_event(serialize(item).decode("utf-8"))

    return encode


def _item_serializer(route: Any) -> Callable[[Any], bytes]:
    """Validates an item against the endpoint's stream item type and dumps it as FastAPI does (F2)."""
    try:
        from fastapi.dependencies.utils import get_stream_item_type, get_typed_return_annotation
        from fastapi.exceptions import ResponseValidationError
        from fastapi.utils import create_model_field

        item_type = None
        if route.response_model is None:
            item_type = get_stream_item_type(get_typed_return_annotation(route.endpoint))
        if item_type is None or _is_fastapi_event_class(item_type):
            return _plain_json
        field = create_model_field(name="StreamItem_" + route.unique_id, type_=item_type, mode="serialization")
        options = {
            "include": route.response_model_include,
            "exclude": route.response_model_exclude,
            "by_alias": route.response_model_by_alias,
            "exclude_unset": route.response_model_exclude_unset,
            "exclude_defaults": route.response_model_exclude_defaults,
            "exclude_none": route.response_model_exclude_none,
        }
    except (ImportError, AttributeError, TypeError):
        _warn_once("validation", "items are sent as JSON without validation against the return annotation")
        return _plain_json

    def serialize(item: Any) -> bytes:
        value, errors = field.validate(item, {}, loc=("response",))
        if errors:
            raise ResponseValidationError(errors=errors, body=item)
        dumped: bytes = field.serialize_json(value, **options)
        return dumped

    return serialize


def _plain_json(item: Any) -> bytes:
    return _json(item).encode("utf-8")


def _json(value: Any) -> str:
    from fastapi.encoders import jsonable_encoder

    return json.dumps(_finite(jsonable_encoder(value)))


def _finite(data: Any) -> Any:
    # As FastAPI 0.146+: a NaN or an infinity is sent as null, which JSON can carry.
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_finite(value) for value in data]
    return data


def _is_fastapi_event_class(item_type: Any) -> bool:
    return isinstance(item_type, type) and any(
        cls.__name__ == "ServerSentEvent" and cls.__module__ == "fastapi.sse" for cls in item_type.__mro__
    )


def _is_api_route(route: Any) -> bool:
    # An app's own route class (FastAPI's route_class=) subclasses APIRoute.
    return any(cls.__name__ == "APIRoute" and cls.__module__ == "fastapi.routing" for cls in type(route).__mro__)


def _is_generator_function(function: Any) -> bool:
    function = inspect.unwrap(function)
    return inspect.isasyncgenfunction(function) or inspect.isgeneratorfunction(function)


def _warn_once(what: str, consequence: str) -> None:
    if what in _warned:
        return
    _warned.add(what)
    try:
        from fastapi import __version__ as version
    except ImportError:
        version = "(unknown version)"
    warnings.warn(
        f"disconnect_responses does not recognise how FastAPI {version} streams a generator endpoint: {consequence}",
        RuntimeWarning,
        stacklevel=3,
    )
