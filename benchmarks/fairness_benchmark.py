"""Event-loop fairness: latency of small requests while one or four clients download a large body."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping
from functools import partial

from .harness import Bench, Row, Server, at_most, column, latencies, percentile, python_download, ratios

PAUSE = 0.002  # seconds between two small requests
TARGET = 1.5
EQUAL_LOAD = "100M"  # curl's --limit-rate (MiB/s) per download: a load that Starlette serves as well
# Downloads per curl process, one after another on its keep-alive connection: a new process per
# download would start and end curls on the latency client's CPU as often as the server is fast.
DOWNLOADS_PER_CURL = 100


def download_until(bench: Bench, server: Server, path: str, rate: str | None, stop: threading.Event) -> None:
    """Download ``path`` again and again until ``stop`` is set (at most ``rate``, curl's notation)."""
    argv = ["nice", "-n", "19", "curl", "-s", "--max-time", "120"]
    if rate is not None:
        argv += ["--limit-rate", rate]
    argv += ["-o", "/dev/null", server.url(path)] * DOWNLOADS_PER_CURL
    while not stop.is_set():
        if bench.client == "curl":
            with subprocess.Popen(argv) as curl:
                while curl.poll() is None and not stop.wait(0.01):
                    pass
                if curl.poll() is None:
                    curl.kill()
        else:
            python_download(server.port, path, {}, timeout=120)


def small_request_latency(bench: Bench, path: str, count: int, rate: str | None, impl: str) -> Mapping[str, float]:
    server = bench.servers[impl]
    stop = threading.Event()
    downloaders = [
        threading.Thread(target=download_until, args=(bench, server, path, rate, stop), daemon=True)
        for _ in range(count)
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
    # What the latency client waits during: the path downloaded, by how many clients, at what rate.
    variants: dict[str, tuple[str, int, str | None]] = {}
    if bench.has_file_response:
        variants["a file download"] = ("/file", 1, None)
        variants["4 file downloads"] = ("/file", 4, None)
        if bench.client == "curl":
            # Informative, no target: a faster server also makes the kernel work more on its core.
            variants["4 file downloads at 100 MiB/s each"] = ("/file", 4, EQUAL_LOAD)
    variants["a stream that never awaits download"] = (f"/stream?kind=never&chunk=65536&size={bench.size}", 1, None)
    rows = []
    for label, (path, count, rate) in variants.items():
        case = f"small requests during {label}"
        results = bench.paired(case, partial(small_request_latency, bench, path, count, rate), show="p99")
        for key in ("p50", "p99", "max"):
            starlette, ours = column(results, "starlette", key), column(results, "ours", key)
            vs_starlette = ratios(ours, starlette)
            if key == "p50" or path != "/file" or rate is not None:
                rows.append(Row(f"{case}: {key} latency", "ms", "Starlette", starlette, ours, vs_starlette))
            else:
                rows.append(
                    Row(f"{case}: {key} latency", "ms", "Starlette", starlette, ours, vs_starlette,
                        f"<= {TARGET:g}x", at_most(vs_starlette, TARGET))
                )  # fmt: skip
    return rows
