"""Overhead: requests per second for a small streamed response, where the race's fixed cost shows."""

from __future__ import annotations

from collections.abc import Mapping

from .harness import IMPLS, Bench, Row, at_least, column, ratios, requests_per_second

CONNECTIONS = 16


def run(bench: Bench) -> list[Row]:
    case = "1 KiB streamed responses, keep-alive"
    results: dict[str, list[Mapping[str, float]]] = {impl: [] for impl in IMPLS}
    for rep in range(bench.repeat):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        ports = {impl: bench.servers[impl].port for impl in order}
        rates = requests_per_second(ports, "/small", CONNECTIONS, bench.seconds)
        for impl in IMPLS:
            results[impl].append({"req/s": rates[impl]})
        bench.progress(
            f"  {case}: run {rep + 1}/{bench.repeat}: " + ", ".join(f"{impl} {rates[impl]:.0f}" for impl in IMPLS)
        )
    starlette, ours = column(results, "starlette", "req/s"), column(results, "ours", "req/s")
    vs_starlette = ratios(ours, starlette)
    return [Row(case, "req/s", "Starlette", starlette, ours, vs_starlette, ">= 0.95x", at_least(vs_starlette, 0.95))]
