"""The private behaviour of AnyIO, asyncio, trio, Starlette and the servers that the library relies on.

Each test pins one assumption listed in a module header (A1-A6 in ``_cancel.py``, S1-S2 in
``_shutdown.py``, R1 in ``_race.py``, F1-F3 in ``_fastapi.py``); its failure message names the assumption, so that a new
release of a dependency fails here, by name, instead of as a puzzling divergence-14 or shutdown test.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import signal
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel
import fastapi
import fastapi.routing
import pydantic
import pytest
import starlette.responses
import trio
from starlette.types import Message

from disconnect_responses._cancel import _cancels, _Uncancellable, asyncio_scope, from_a_cancel_scope, scope_like

pytestmark = pytest.mark.anyio

WATCHDOG = 5.0


def broken(assumption: str, detail: object) -> str:
    return f"Pinned assumption {assumption} no longer holds: {detail}"


def test_a1_anyio_names_the_cancel_scope_in_the_cancellation_message() -> None:
    caught: list[asyncio.CancelledError] = []

    async def main() -> None:
        with anyio.CancelScope() as scope:
            asyncio.get_running_loop().call_soon(scope.cancel)
            try:
                await asyncio.sleep(WATCHDOG)
            except asyncio.CancelledError as exc:
                caught.append(exc)
                raise

    anyio.run(main, backend="asyncio")
    assert from_a_cancel_scope(caught[0]), broken("A1 (AnyIO's cancellation message)", caught[0].args)


def test_a1_asyncio_timeouts_send_no_cancel_scope_message() -> None:
    caught: list[asyncio.CancelledError] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(WATCHDOG)
        except asyncio.CancelledError as exc:
            caught.append(exc)
            raise

    async def main() -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waits(), 0.001)

    asyncio.run(main())
    assert not from_a_cancel_scope(caught[0]), broken("A1 (asyncio's own timeouts)", caught[0].args)


@types.coroutine
def _stepping(coro: Coroutine[Any, Any, None], seen: list[bool]) -> Generator[Any, Any, None]:
    """Drives ``coro`` as ``Race.drive`` does, recording for each resumption whether it cancels."""
    message: Any = None
    error: BaseException | None = None
    while True:
        try:
            suspended = coro.send(message) if error is None else coro.throw(error)
        except StopIteration:
            return
        message = error = None
        try:
            message = yield suspended
        except BaseException as exc:
            error = exc
        seen.append(_cancels(suspended, message, error))


async def test_a2_the_stop_s_cancellation_is_seen_where_the_task_resumes() -> None:
    seen: list[bool] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as task_group:

            async def cancel_once_waiting() -> None:
                await anyio.wait_all_tasks_blocked()
                scope.cancel()

            task_group.start_soon(cancel_once_waiting)
            await _stepping(anyio.sleep(WATCHDOG), seen)
    assert scope.cancelled_caught
    assert seen == [True], broken("A2 (how a task resumes with a cancellation)", seen)


async def test_a3_a_shielded_guard_hides_outer_cancellation_from_the_effective_deadline() -> None:
    # The scopes are looked at, never awaited in: that is what takes_stop does.
    with anyio.CancelScope() as outer:  # noqa: ASYNC100
        with anyio.CancelScope() as guard:  # noqa: ASYNC100
            outer.cancel()
            guard.shield = True
            outside = anyio.current_effective_deadline()
            with anyio.CancelScope() as inner:  # noqa: ASYNC100
                inner.cancel()
                inside = anyio.current_effective_deadline()
            guard.shield = False
    assert (outside, inside) == (math.inf, -math.inf), broken("A3 (current_effective_deadline)", (outside, inside))


async def test_a4_a_scope_of_the_task_group_s_class_works_as_a_cancel_scope() -> None:
    async with anyio.create_task_group() as task_group:
        scope = scope_like(task_group.cancel_scope)
    assert isinstance(scope, anyio.CancelScope), broken("A4 (the scope's class)", type(scope))
    with scope:
        scope.cancel()
        await anyio.sleep(WATCHDOG)
    assert scope.cancelled_caught, broken("A4 (a scope made from the class)", "it caught no cancellation")
    with scope_like(scope) as timed:
        timed.deadline = anyio.current_time()
        await anyio.sleep(WATCHDOG)
    assert timed.cancelled_caught, broken("A4 (a scope made from the class)", "its deadline did not cancel")


def test_a5_asyncio_run_cancels_left_tasks_and_waits_for_them() -> None:
    cancel_calls: list[object] = []
    finished: list[bool] = []

    class Recording(_Uncancellable):
        def cancel(self, msg: object = None) -> bool:
            cancel_calls.append(msg)
            return super().cancel(msg)

    async def cleanup() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        finished.append(True)

    async def main() -> None:
        Recording(cleanup(), loop=asyncio.get_running_loop())

    asyncio.run(main())
    assert cancel_calls and finished == [True], broken(
        "A5 (asyncio.run's teardown)", f"cancel() called {len(cancel_calls)} times, cleanup finished: {finished}"
    )


def test_a6_an_asyncio_scope_works_in_a_plain_task_and_lets_a_native_cancel_through() -> None:
    outcomes: list[str] = []

    async def in_plain_task() -> None:
        with asyncio_scope() as scope:
            asyncio.get_running_loop().call_soon(scope.cancel)
            await asyncio.sleep(WATCHDOG)
        outcomes.append("own cancellation caught" if scope.cancelled_caught else "not caught")
        with asyncio_scope():
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)
            try:
                await asyncio.sleep(WATCHDOG)
            except asyncio.CancelledError:
                outcomes.append("native cancellation passed")
                raise

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(in_plain_task())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WATCHDOG)

    anyio.run(main, backend="asyncio")
    assert outcomes == ["own cancellation caught", "native cancellation passed"], broken(
        "A6 (an AnyIO scope in a plain asyncio task)", outcomes
    )


def _loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    with contextlib.suppress(ImportError):
        import uvloop

        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return factories


@pytest.mark.parametrize("new_loop", _loop_factories())
def test_s1_a_handler_chained_in_front_of_add_signal_handler_keeps_the_loop_s(new_loop: Callable[[], Any]) -> None:
    chained: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        delivered = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, delivered.set)
        try:
            previous = signal.getsignal(signal.SIGUSR1)
            assert callable(previous) and previous is not signal.default_int_handler, broken(
                "S1 (add_signal_handler leaves a Python handler)", previous
            )

            def chain(signum: int, frame: FrameType | None) -> None:
                chained.append(signum)
                previous(signum, frame)

            signal.signal(signal.SIGUSR1, chain)
            os.kill(os.getpid(), signal.SIGUSR1)
            try:
                await asyncio.wait_for(delivered.wait(), WATCHDOG)
            except asyncio.TimeoutError:
                raise AssertionError(broken("S1 (the loop's handler runs behind ours)", "it never ran")) from None
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert chained == [signal.SIGUSR1], broken("S1 (our handler runs first)", chained)


@pytest.mark.parametrize("new_loop", _loop_factories())
def test_s2_a_loop_callback_can_set_a_deadline_in_the_loop_s_clock(new_loop: Callable[[], Any]) -> None:
    async def main() -> anyio.CancelScope:
        loop = asyncio.get_running_loop()
        with anyio.CancelScope() as scope:
            loop.call_soon_threadsafe(lambda: setattr(scope, "deadline", loop.time() + 0.001))
            await anyio.sleep(WATCHDOG)
        return scope

    loop = new_loop()
    try:
        scope = loop.run_until_complete(main())
    finally:
        loop.close()
    assert scope.cancelled_caught and scope.cancel_called, broken(
        "S2 (a deadline set from a loop callback, in loop.time())", (scope.cancelled_caught, scope.cancel_called)
    )


def test_s2_a_trio_callback_can_set_a_deadline_in_trio_s_clock() -> None:
    async def main() -> anyio.CancelScope:
        token = trio.lowlevel.current_trio_token()
        with anyio.CancelScope() as scope:
            token.run_sync_soon(lambda: setattr(scope, "deadline", trio.current_time() + 0.001))
            await anyio.sleep(WATCHDOG)
        return scope

    scope = anyio.run(main, backend="trio")
    assert scope.cancelled_caught and scope.cancel_called, broken(
        "S2 (a deadline set from run_sync_soon, in trio.current_time())", (scope.cancelled_caught, scope.cancel_called)
    )


def test_s2_a_signal_handler_can_hand_work_to_a_trio_loop() -> None:
    async def main() -> None:
        token = trio.lowlevel.current_trio_token()
        delivered = trio.Event()
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: token.run_sync_soon(delivered.set))
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            with trio.move_on_after(WATCHDOG):
                await delivered.wait()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert delivered.is_set(), broken("S2 (run_sync_soon from a signal handler)", "the callback never ran")

    trio.run(main)


async def test_r1_starlette_s_stream_response_is_a_coroutine_the_race_can_step() -> None:
    async def items() -> AsyncIterator[bytes]:
        yield b"a"
        await anyio.lowlevel.checkpoint()
        yield b"b"

    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    response = starlette.responses.StreamingResponse(items())
    coroutine = response.stream_response(send)
    assert inspect.iscoroutine(coroutine), broken("R1 (stream_response is a coroutine)", type(coroutine))
    seen: list[bool] = []
    await _stepping(coroutine, seen)
    bodies = [message.get("body") for message in messages if message["type"] == "http.response.body"]
    assert messages[0]["type"] == "http.response.start" and bodies == [b"a", b"b", b""], broken(
        "R1 (stream_response sends the start, each item, then an empty last message)", messages
    )


# ---------------------------------------------------------------------------------------------
# FastAPI (F1-F3 in _fastapi.py), on FastAPI 0.134+ (generator endpoints)


class Item(pydantic.BaseModel):
    name: str


def fastapi_with_generator_endpoints() -> None:
    if tuple(int(part) for part in fastapi.__version__.split(".")[:2]) < (0, 134):
        pytest.skip(f"FastAPI {fastapi.__version__} has no generator endpoints (added in 0.134)")


async def test_f1_fastapi_hands_an_async_generator_endpoint_over_through_a_relay() -> None:
    fastapi_with_generator_endpoints()
    from disconnect_responses.testing import request

    handed: list[Any] = []

    class Spy(starlette.responses.StreamingResponse):
        def __init__(self, content: Any, **options: Any) -> None:
            handed.append(content)
            super().__init__(content, **options)

    app = fastapi.FastAPI()

    @app.get("/async", response_class=Spy)
    async def async_endpoint() -> AsyncIterator[bytes]:
        yield b"a"

    @app.get("/sync", response_class=Spy)
    def sync_endpoint() -> Any:
        yield b"s"

    await request(app, "GET", "/async")
    await request(app, "GET", "/sync")
    relay, sync_generator = handed
    assert inspect.isasyncgen(relay), broken("F1", f"FastAPI hands the class a {type(relay)}")
    assert relay.ag_code.co_name == "_async_stream_raw", broken("F1", f"the relay is {relay.ag_code.co_name}")
    assert relay.ag_code.co_filename.endswith(os.path.join("fastapi", "routing.py")), broken("F1", relay.ag_code)
    assert inspect.isgenerator(sync_generator), broken("F1", f"a sync generator is handed over as {sync_generator}")


def test_f1_the_relay_holds_the_endpoints_generator_before_it_starts() -> None:
    fastapi_with_generator_endpoints()

    source = inspect.getsource(fastapi.routing)
    assert "async def _async_stream_raw(\n" in source and "async_gen: AsyncIterator[Any]," in source, broken(
        "F1", "the relay's signature changed"
    )


def test_f2_the_route_and_the_helpers_that_build_the_item_field() -> None:
    fastapi_with_generator_endpoints()
    from fastapi.dependencies.utils import get_stream_item_type, get_typed_return_annotation
    from fastapi.utils import create_model_field

    app = fastapi.FastAPI()

    @app.get("/items", response_class=starlette.responses.StreamingResponse)
    async def items() -> AsyncIterator[Item]:
        yield Item(name="x")

    [route] = [route for route in app.routes if isinstance(route, fastapi.routing.APIRoute) and route.path == "/items"]
    assert route.endpoint is items and route.response_model is None, broken("F2", vars(route))
    for option in ("include", "exclude", "by_alias", "exclude_unset", "exclude_defaults", "exclude_none"):
        assert hasattr(route, f"response_model_{option}"), broken("F2", f"no response_model_{option}")
    assert get_stream_item_type(get_typed_return_annotation(items)) is Item, broken("F2", "item type")
    field = create_model_field(name="StreamItem_" + route.unique_id, type_=Item, mode="serialization")
    value, errors = field.validate({"name": "y"}, {}, loc=("response",))
    assert not errors and field.serialize_json(value, include=None, exclude=None) == b'{"name":"y"}', broken(
        "F2", field
    )
    _, errors = field.validate({}, {}, loc=("response",))
    assert errors, broken("F2", "an invalid item validates")


def test_f3_fastapi_sse_lays_an_event_out_as_format_event() -> None:
    fastapi_with_generator_endpoints()
    fastapi_sse = pytest.importorskip("fastapi.sse")
    from disconnect_responses._fastapi import PING, format_event

    cases: list[dict[str, Any]] = [
        {"data_str": "d"},
        {"data_str": "a\nb\r\nc", "event": "e", "id": "1", "retry": 5, "comment": "x\ry"},
        {"comment": "only"},
        {},
    ]
    for fields in cases:
        theirs = fastapi_sse.format_sse_event(**fields)
        ours = format_event(
            fields.get("data_str"), fields.get("event"), fields.get("id"), fields.get("retry"), fields.get("comment")
        )
        assert ours == theirs, broken("F3", f"{fields}: {theirs!r}")
    assert fastapi_sse.KEEPALIVE_COMMENT == PING, broken("F3", fastapi_sse.KEEPALIVE_COMMENT)
