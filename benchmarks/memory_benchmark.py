"""Memory: peak server RSS while many clients read the file slowly."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from .harness import Bench, MiB, Row, at_most, column, proc_status, ratios, slow_readers

READ = 4096  # bytes each reader takes per round
EVERY = 0.005  # seconds between rounds: about 800 KB/s per reader


def peak_rss(bench: Bench, impl: str) -> Mapping[str, float]:
    """Start a fresh server, so VmHWM (the peak RSS of its life) covers this run only."""
    with bench.fresh_server(impl) as server:
        idle = proc_status(server.pid, "VmRSS")
        reading = slow_readers(server.port, "/file", bench.readers, bench.memory_seconds, READ, EVERY)
        if reading < bench.readers:
            bench.notes.append(f"memory, {impl}: only {reading} of {bench.readers} readers received data")
        peak = proc_status(server.pid, "VmHWM")
    return {"MiB": peak / MiB, "growth": (peak - idle) / MiB}


def run(bench: Bench) -> list[Row]:
    if not bench.has_file_response:
        return []
    case = f"{bench.readers} slow readers of the file"
    results = bench.paired(case, partial(peak_rss, bench))
    starlette, ours = column(results, "starlette", "MiB"), column(results, "ours", "MiB")
    vs_starlette = ratios(ours, starlette)
    growth_starlette, growth_ours = column(results, "starlette", "growth"), column(results, "ours", "growth")
    return [
        Row(f"{case}: peak server RSS", "MiB", "Starlette", starlette, ours, vs_starlette, "<= 1.05x",
            at_most(vs_starlette, 1.05)),
        Row(f"{case}: RSS growth over idle", "MiB", "Starlette", growth_starlette, growth_ours,
            ratios(growth_ours, growth_starlette)),
    ]  # fmt: skip
