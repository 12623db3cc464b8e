"""The token stream's own tests, as a user of this library writes them with
``disconnect_responses.testing``: in-process, no server, on asyncio and trio."""

from __future__ import annotations

import fastapi
import pytest

from disconnect_responses import Outcome
from disconnect_responses.testing import Client, request

if tuple(int(part) for part in fastapi.__version__.split(".")[:2]) < (0, 134):
    pytest.skip(f"FastAPI {fastapi.__version__} has no generator endpoints (added in 0.134)", allow_module_level=True)

from examples.token_stream import create_app

pytestmark = pytest.mark.anyio


async def test_the_generator_stops_and_usage_is_recorded_when_the_client_leaves_after_1_kib() -> None:
    seen: list[str] = []
    app = create_app(token_interval=0.001, gap=0.01, observe=seen.append)
    result = await request(app, "GET", "/tokens", client=Client(leaves_after_bytes=1024))
    assert result.bytes_after_disconnect == 0 and result.outcome is Outcome.DISCONNECTED
    assert seen[-2:] == ["closed", "usage recorded"]


async def test_a_client_that_leaves_while_the_model_thinks_stops_the_generator_there() -> None:
    """Tokens a minute apart: unless the generator is stopped where it waits, the request hangs and
    ``request`` fails, saying so."""
    seen: list[str] = []
    app = create_app(token_interval=60.0, observe=seen.append)
    result = await request(app, "GET", "/tokens", client=Client(leaves_after_events=1))
    assert result.outcome is Outcome.DISCONNECTED
    assert seen == ["token", "closed", "usage recorded"]


async def test_a_deploy_ends_the_stream_on_an_event_boundary() -> None:
    seen: list[str] = []
    app = create_app(token_interval=0.001, gap=0.01, observe=seen.append)
    result = await request(app, "GET", "/tokens", shutdown_after_events=5)
    assert result.outcome is Outcome.SHUTDOWN and result.complete
    assert result.body.count(b'data: {"index":') >= 5 and result.body.endswith(b"\n\n")
    assert seen[-2:] == ["closed", "usage recorded"]
