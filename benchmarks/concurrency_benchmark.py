"""Throughput under concurrency: several fast clients download the file at once from one server core."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Mapping
from functools import partial

from .harness import Bench, Row, at_least, column, cpu_seconds, ratios, timed_download

COUNTS = (4, 16)
TARGET = 3.0


def downloads(bench: Bench, count: int, impl: str) -> Mapping[str, float]:
    """``count`` downloads of ``/file`` at once for ``bench.seconds`` (or until they end): the total
    MB/s and the server's CPU seconds per GB."""
    server = bench.servers[impl]
    cpu_before = cpu_seconds(server.pid)
    started = time.perf_counter()
    if bench.client == "curl":
        argv = ["curl", "-s", "-o", "/dev/null", "--max-time", str(bench.seconds), "-w", "%{size_download}"]
        curls = [
            subprocess.Popen([*argv, server.url("/file")], stdout=subprocess.PIPE, text=True) for _ in range(count)
        ]
        sizes = [int(curl.communicate(timeout=bench.seconds + 30)[0]) for curl in curls]
    else:
        sizes = [0] * count

        def download(index: int) -> None:
            sizes[index] = timed_download(server.port, "/file", bench.seconds)

        threads = [threading.Thread(target=download, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(bench.seconds + 30)
    elapsed = time.perf_counter() - started
    total = sum(sizes)
    return {"MB/s": total / elapsed / 1e6, "CPU s/GB": (cpu_seconds(server.pid) - cpu_before) / (total / 1e9)}


def run(bench: Bench) -> list[Row]:
    if not bench.has_file_response:
        return []
    rows = []
    for count in COUNTS:
        case = f"file, {count} concurrent downloads"
        results = bench.paired(case, partial(downloads, bench, count))
        starlette, ours = column(results, "starlette", "MB/s"), column(results, "ours", "MB/s")
        vs_starlette = ratios(ours, starlette)
        rows.append(
            Row(
                case,
                "MB/s",
                "Starlette",
                starlette,
                ours,
                vs_starlette,
                f">= {TARGET:g}x",
                at_least(vs_starlette, TARGET),
            )
        )
        cpu_starlette, cpu_ours = column(results, "starlette", "CPU s/GB"), column(results, "ours", "CPU s/GB")
        rows.append(
            Row(f"{case}: server CPU", "s/GB", "Starlette", cpu_starlette, cpu_ours, ratios(cpu_ours, cpu_starlette))
        )
    return rows
