"""A generated file download whose background task deletes the temporary file, however the download ends.

Run it from the repository root; the temporary file is gone after a complete download and after
an interrupted one (``EXPORT_MIB`` sets the size)::

    uvicorn examples.file_download:app --port 8000
    curl -o /dev/null http://127.0.0.1:8000/export
    curl http://127.0.0.1:8000/export | head -c 1000 > /dev/null

``disconnect_responses.FileResponse`` runs its background task after a disconnect too (Starlette's
runs it only after a complete body), at once and exactly once, after the file was closed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable

import anyio.to_thread
from fastapi import BackgroundTasks, FastAPI

from disconnect_responses import FileResponse

logger = logging.getLogger("examples.file_download")

Observer = Callable[[str, str], None]


def _log(event: str, path: str) -> None:
    logger.info("%s %s", event, path)


def _write_export(size: int) -> str:
    with tempfile.NamedTemporaryFile(prefix="export-", suffix=".bin", delete=False) as file:
        block = bytes(range(256)) * 4096
        for _ in range(size // len(block)):
            file.write(block)
        file.write(block[: size % len(block)])
        return file.name


def create_app(*, size: int = 64 * 1024 * 1024, observe: Observer = _log) -> FastAPI:
    """``GET /export``: writes a ``size``-byte temporary file and sends it; ``observe`` is told
    "created" and "deleted" with the file's path."""
    app = FastAPI()

    def delete(path: str) -> None:
        os.unlink(path)
        observe("deleted", path)

    @app.get("/export")
    async def export(background_tasks: BackgroundTasks) -> FileResponse:
        path = await anyio.to_thread.run_sync(_write_export, size)
        observe("created", path)
        background_tasks.add_task(delete, path)
        return FileResponse(path, filename="export.bin")

    return app


app = create_app(size=int(os.environ.get("EXPORT_MIB", "64")) * 1024 * 1024)
