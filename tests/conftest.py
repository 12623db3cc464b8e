from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from .servers import OpenedFiles, Recorder


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


@pytest.fixture
def file(tmp_path: Path, data: bytes) -> Path:
    """``data`` (each module sizes its own) written to a file under ``tmp_path``."""
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def library_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the library's INFO lines (one per interrupted response) as well."""
    caplog.set_level(logging.INFO, logger="disconnect_responses")
    return caplog
