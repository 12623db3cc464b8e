"""Overhead: requests per second for small responses, where the race's fixed cost per response shows."""

from __future__ import annotations

from collections.abc import Mapping

from .harness import IMPLS, Bench, Row, at_least, column, ratios, requests_per_second

CONNECTIONS = 16
TARGET = 0.97


def rate_row(bench: Bench, case: str, path: str) -> Row:
    results: dict[str, list[Mapping[str, float]]] = {impl: [] for impl in IMPLS}
    for rep in range(bench.repeat):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        ports = {impl: bench.servers[impl].port for impl in order}
        rates = requests_per_second(ports, path, CONNECTIONS, bench.seconds)
        for impl in IMPLS:
            results[impl].append({"req/s": rates[impl]})
        bench.progress(
            f"  {case}: run {rep + 1}/{bench.repeat}: " + ", ".join(f"{impl} {rates[impl]:.0f}" for impl in IMPLS)
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
