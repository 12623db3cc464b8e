"""An LLM-style token stream as Server-Sent Events: bursts of tokens separated by idle gaps of seconds.

FastAPI's own idiom for SSE (a generator endpoint, FastAPI 0.134+), with this library's
``EventSourceResponse`` as its ``response_class``: each yielded ``Token`` is validated against the
return annotation and sent as JSON in an event, as ``fastapi.sse`` sends it. Run it from the
repository root and interrupt curl during a pause: the generator is closed at once, not at the end
of the pause (``TOKEN_GAP`` sets the pause, in seconds)::

    uvicorn examples.token_stream:app --port 8000
    curl -N http://127.0.0.1:8000/tokens

The response listens for the disconnect while the generator waits, so a producer waiting on its
model (here ``anyio.sleep``) is cancelled there, and its ``finally`` runs (the place to cancel the
generation upstream), followed by the background task, which records usage either way. On a deploy
the stream ends between two events, with a proper end, so the browser's ``EventSource`` reconnects
after the ``retry`` sent first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterable, Callable

import anyio
from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

from disconnect_responses import EventSourceResponse

logger = logging.getLogger("examples.token_stream")

Observer = Callable[[str], None]


class Token(BaseModel):
    index: int
    text: str


def _log(event: str) -> None:
    logger.info("%s", event)


def create_app(*, burst: int = 20, token_interval: float = 0.01, gap: float = 3.0, observe: Observer = _log) -> FastAPI:
    """``GET /tokens``: endless bursts of ``burst`` tokens, ``token_interval`` s apart, ``gap`` s between bursts.

    ``observe`` is told "token", "idle" (a gap begins), "closed" (the generator's ``finally``) and
    "usage recorded" (the background task).
    """
    app = FastAPI()

    @app.get("/tokens", response_class=EventSourceResponse)
    async def tokens(background_tasks: BackgroundTasks) -> AsyncIterable[Token]:
        background_tasks.add_task(observe, "usage recorded")
        try:
            count = 0
            while True:
                for _ in range(burst):
                    count += 1
                    observe("token")
                    yield Token(index=count, text=f"token {count}")
                    await anyio.sleep(token_interval)
                observe("idle")
                await anyio.sleep(gap)
        finally:
            # Cancel the generation upstream here: the client is gone or the stream ended.
            observe("closed")

    return app


app = create_app(gap=float(os.environ.get("TOKEN_GAP", "3.0")))
