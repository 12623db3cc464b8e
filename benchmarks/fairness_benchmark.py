"""Event-loop fairness: latency of small requests while one client downloads a large body."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping
from functools import partial

from .harness import Bench, Row, Server, column, latencies, percentile, python_download, ratios

PAUSE = 0.002  # seconds between two small requests


def download_until(bench: Bench, server: Server, path: str, stop: threading.Event) -> None:
    """Download ``path`` again and again until ``stop`` is set."""
    while not stop.is_set():
        if bench.client == "curl":
            with subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--max-time", "120", server.url(path)]) as curl:
                while curl.poll() is None and not stop.wait(0.01):
                    pass
                if curl.poll() is None:
                    curl.kill()
        else:
            python_download(server.port, path, {}, timeout=120)


def small_request_latency(bench: Bench, path: str, impl: str) -> Mapping[str, float]:
    server = bench.servers[impl]
    stop = threading.Event()
    downloader = threading.Thread(target=download_until, args=(bench, server, path, stop), daemon=True)
    downloader.start()
    try:
        stop.wait(0.2)  # let the download get going
        samples = latencies(server.port, "/small", bench.seconds, PAUSE)
    finally:
        stop.set()
        downloader.join(130)
    return {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "max": max(samples)}


def run(bench: Bench) -> list[Row]:
    variants = {"stream that never awaits": f"/stream?kind=never&chunk=65536&size={bench.size}"}
    if bench.has_file_response:
        variants = {"file": "/file", **variants}
    rows = []
    for label, path in variants.items():
        case = f"small requests during a {label} download"
        results = bench.paired(case, partial(small_request_latency, bench, path), show="p99")
        for key in ("p50", "p99"):
            starlette, ours = column(results, "starlette", key), column(results, "ours", key)
            rows.append(Row(f"{case}: {key} latency", "ms", "Starlette", starlette, ours, ratios(ours, starlette)))
    return rows
