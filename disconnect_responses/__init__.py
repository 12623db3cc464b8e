"""Starlette responses that stop promptly, close their source and run their background task when
the client goes away."""

from ._race import Outcome, stopping
from ._sse import JSONServerSentEvent, ServerSentEvent
from .responses import EventSourceResponse, FileResponse, StreamingResponse

__version__ = "0.1.0"

__all__ = [
    "EventSourceResponse",
    "FileResponse",
    "JSONServerSentEvent",
    "Outcome",
    "ServerSentEvent",
    "StreamingResponse",
    "__version__",
    "stopping",
]
