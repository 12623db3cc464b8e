"""Overhead: requests per second for small responses, where the race's fixed cost per response shows."""

from __future__ import annotations

from .harness import Bench, Row, at_least, column, ratios, requests_per_second

CONNECTIONS = 16
TARGET = 0.97


def rate_row(bench: Bench, case: str, path: str) -> Row:
    results = bench.taking_turns(
        case, "req/s", lambda ports: requests_per_second(ports, path, CONNECTIONS, bench.seconds)
    )
    starlette, ours = column(results, "starlette", "req/s"), column(results, "ours", "req/s")
    vs_starlette = ratios(ours, starlette)
    return Row(
        case, "req/s", "Starlette", starlette, ours, vs_starlette, f">= {TARGET}x", at_least(vs_starlette, TARGET)
    )


def run(bench: Bench) -> list[Row]:
    rows = [rate_row(bench, "1 KiB streamed responses, keep-alive", "/small")]
    if bench.has_file_response:
        rows.append(rate_row(bench, "4 KiB file responses, keep-alive", "/smallfile"))
    return rows
