from __future__ import annotations

import os
from pathlib import Path

import pytest

from .servers import OpenedFiles


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> OpenedFiles:
    """Records every descriptor opened for a file under ``tmp_path``, by wrapping ``os.open``."""
    files = OpenedFiles(tmp_path)
    real_open = os.open

    def recording_open(path: str, flags: int, *args: int, **kwargs: object) -> int:
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).startswith(files.directory):
            files.fds.append((fd, os.fstat(fd)))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    return files
