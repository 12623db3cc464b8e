"""Event-loop fairness: latency of small requests while one or four clients download a large body."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping
from functools import partial

from .harness import Bench, Row, Server, at_most, column, latencies, percentile, python_download, ratios

PAUSE = 0.002  # seconds between two small requests
TARGET = 1.5


def download_until(bench: Bench, server: Server, path: str, stop: threading.Event) -> None:
    """Download ``path`` again and again until ``stop`` is set."""
    while not stop.is_set():
        if bench.client == "curl":
            with subprocess.Popen(
                ["nice", "-n", "19", "curl", "-s", "-o", "/dev/null", "--max-time", "120", server.url(path)]
            ) as curl:
                while curl.poll() is None and not stop.wait(0.01):
                    pass
                if curl.poll() is None:
                    curl.kill()
        else:
            python_download(server.port, path, {}, timeout=120)


def small_request_latency(bench: Bench, path: str, count: int, impl: str) -> Mapping[str, float]:
    server = bench.servers[impl]
    stop = threading.Event()
    downloaders = [
        threading.Thread(target=download_until, args=(bench, server, path, stop), daemon=True) for _ in range(count)
    ]
    for downloader in downloaders:
        downloader.start()
    try:
        stop.wait(0.2)  # let the downloads get going
        samples = latencies(server.port, "/small", bench.seconds, PAUSE)
    finally:
        stop.set()
        for downloader in downloaders:
            downloader.join(130)
    return {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "max": max(samples)}


def run(bench: Bench) -> list[Row]:
    variants = {"a stream that never awaits": (f"/stream?kind=never&chunk=65536&size={bench.size}", 1)}
    if bench.has_file_response:
        variants = {"a file": ("/file", 1), "4 file": ("/file", 4), **variants}
    rows = []
    for label, (path, count) in variants.items():
        case = f"small requests during {label} download{'s' if count > 1 else ''}"
        results = bench.paired(case, partial(small_request_latency, bench, path, count), show="p99")
        for key in ("p50", "p99", "max"):
            starlette, ours = column(results, "starlette", key), column(results, "ours", key)
            vs_starlette = ratios(ours, starlette)
            if key == "p50" or path != "/file":
                rows.append(Row(f"{case}: {key} latency", "ms", "Starlette", starlette, ours, vs_starlette))
            else:
                rows.append(
                    Row(f"{case}: {key} latency", "ms", "Starlette", starlette, ours, vs_starlette,
                        f"<= {TARGET:g}x", at_most(vs_starlette, TARGET))
                )  # fmt: skip
    return rows
