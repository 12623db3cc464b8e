"""Drop-in replacements for ``starlette.responses.StreamingResponse`` and ``FileResponse``.

Each class keeps its parent's constructor, headers and body bytes; what changes is how a call
ends. Intentional divergences from Starlette, each covered by a test that names its number:

1. The disconnect listener runs on every ASGI spec version. Starlette skips it from 2.4 on and
   relies on ``send()`` raising, which never happens while a producer waits for its upstream.
2. ``OSError`` or ``ClientDisconnect`` from ``send()`` ends the response quietly as a
   disconnect instead of escaping to the server log: the client is gone, nothing failed.
3. The guarded ``send`` gives the event loop a turn every 256 KiB, so a producer that never
   awaits cannot starve the listener and push the rest of its body into a dead socket; once the
   disconnect is known, no further chunk is handed to the server.
4. The body iterator is always closed (``aclose()``, or ``close()`` in a worker thread for a sync
   iterator), shielded and bounded by ``cleanup_timeout``, before the background task starts.
   Starlette never closes a sync iterator and closes an async one only if a cancellation
   happens to land inside it.
5. A sync iterator's ``next()`` runs in a worker thread that a stopped response abandons instead
   of waiting for; the iterator is closed in that thread as soon as ``next()`` returns.
6. The background task runs after a disconnect, a send timeout and an error, not only after a
   completed body (``background_policy="completed"`` restores the old rule); after an outside
   cancellation it runs shielded, bounded by ``cleanup_timeout``.
7. New keyword-only options and attributes: ``send_timeout``, ``background_policy``,
   ``cleanup_timeout``, and after the call ``outcome`` and ``bytes_sent``. One log line on the
   ``disconnect_responses`` logger records each interrupted response.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from functools import partial

import starlette.responses
from starlette.background import BackgroundTask
from starlette.responses import ContentStream
from starlette.types import Message, Receive, Scope, Send

from ._race import BackgroundPolicy, Outcome, Race, SyncIterator, close_iterator


class StreamingResponse(starlette.responses.StreamingResponse):
    """Starlette's ``StreamingResponse`` that ends promptly and cleanly when the client goes away.

    Extra keyword-only arguments: ``send_timeout`` (seconds one ``send()`` may block before the
    client counts as stalled; ``None``, the default, waits forever) and ``background_policy``
    (``"always"``, the default, or ``"completed"``). After the call, ``outcome`` says how the body
    ended and ``bytes_sent`` how many body bytes were handed to the server.
    """

    cleanup_timeout: float = 5.0

    def __init__(
        self,
        content: ContentStream,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        *,
        send_timeout: float | None = None,
        background_policy: BackgroundPolicy = "always",
    ) -> None:
        super().__init__(content, status_code, headers, media_type, background)
        if not isinstance(content, AsyncIterable):  # divergence 5
            self.body_iterator = SyncIterator(content)
        self.send_timeout = send_timeout
        self.background_policy: BackgroundPolicy = background_policy
        self.outcome: Outcome | None = None
        self.bytes_sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            send = _wrap_websocket_denial_send(send)
        race = Race(scope, receive, send, self.send_timeout)
        try:
            await race.run(self.stream_response)
        finally:
            self.outcome = race.outcome
            self.bytes_sent = race.bytes_sent
            await race.finish(
                partial(close_iterator, self.body_iterator),
                self.background,
                self.background_policy,
                self.cleanup_timeout,
            )
        if race.error is not None:
            raise race.error


def _wrap_websocket_denial_send(send: Send) -> Send:
    # Vendored from Starlette 1.10 (absent before 0.42), which denies a websocket with a response.
    async def wrapped(message: Message) -> None:
        if message["type"] in {"http.response.start", "http.response.body"}:
            message = {**message, "type": "websocket." + message["type"]}
        await send(message)

    return wrapped
