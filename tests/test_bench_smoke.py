"""The benchmark runs end to end on tiny sizes; its figures are not checked, only that every case reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sse_benchmark
from benchmarks.bench import main


def test_every_case_reports_both_implementations(tmp_path: Path) -> None:
    json_path, markdown_path = tmp_path / "results.json", tmp_path / "results.md"
    argv = "--size 2M --repeat 1 --seconds 0.2 --readers 4 --memory-seconds 0.2 --client python --no-nginx".split()
    argv += ["--cache-dir", str(tmp_path), "--json", str(json_path), "--markdown", str(markdown_path)]

    assert main(argv) == 0

    rows = json.loads(json_path.read_text())["rows"]
    cases = " ".join(row["case"] for row in rows)
    expected = [
        "stream from memory",
        "sync iterator",
        "disconnect, sync iterator",
        "1 KiB streamed",
        "4 KiB file responses",
        "4 concurrent downloads",
        "16 concurrent downloads",
        "during 4 file downloads",
        "small requests",
        "file, single range",
        "disconnect, file",
        "slow readers of the file",
    ]
    for case in expected:
        assert case in cases
    assert "pread + send floor" in {row["baseline"] for row in rows}
    for row in rows:
        assert len(row["baseline_values"]) == len(row["ours"]) == 1, row
    assert "| case | unit | baseline |" in markdown_path.read_text()


def test_the_sse_benchmark_reports_a_run() -> None:
    ours = [name for name in sse_benchmark.contenders() if name.endswith("+ ours")]
    if not ours:
        pytest.skip("the SSE benchmark needs FastAPI 0.135+ or sse-starlette")

    result = sse_benchmark.run_in_child(ours[0], "awaiting")

    assert sorted(result) == ["background", "bytes", "finally"]
