"""Overhead: requests per second for a small streamed response, where the race's fixed cost shows."""

from __future__ import annotations

from .harness import Bench, Row, at_least, column, ratios, requests_per_second

CONNECTIONS = 16


def run(bench: Bench) -> list[Row]:
    case = "1 KiB streamed responses, keep-alive"
    results = bench.paired(
        case,
        lambda impl: {"req/s": requests_per_second(bench.servers[impl].port, "/small", CONNECTIONS, bench.seconds)},
    )
    starlette, ours = column(results, "starlette", "req/s"), column(results, "ours", "req/s")
    vs_starlette = ratios(ours, starlette)
    return [Row(case, "req/s", "Starlette", starlette, ours, vs_starlette, ">= 0.95x", at_least(vs_starlette, 0.95))]
