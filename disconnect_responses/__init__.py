"""Starlette responses that stop promptly, close their source and run their background task when
the client goes away."""

from ._race import Outcome, stopping
from .responses import FileResponse, StreamingResponse

__version__ = "0.1.0"

__all__ = ["FileResponse", "Outcome", "StreamingResponse", "__version__", "stopping"]
