"""Throughput of one fast client: the file (plain and one range), streams from memory, a sync iterator."""

from __future__ import annotations

from collections.abc import Mapping

from .harness import Bench, MiB, Row, at_least, column, ratios, stream_rates

RANGE_START = 12345  # an unaligned offset: the whole file but its first 12345 bytes


def file_rows(bench: Bench, case: str, headers: Mapping[str, str]) -> list[Row]:
    servers = dict(bench.servers)
    if bench.nginx is not None:
        servers["nginx"] = bench.nginx
    if bench.floor is not None and not headers:  # the floor server knows no ranges
        servers["floor"] = bench.floor
    results = bench.paired(case, lambda impl: bench.download(servers[impl], "/file", headers), list(servers))
    starlette, ours = column(results, "starlette", "MB/s"), column(results, "ours", "MB/s")
    vs_starlette = ratios(ours, starlette)
    rows = [Row(case, "MB/s", "Starlette", starlette, ours, vs_starlette, ">= 4x", at_least(vs_starlette, 4))]
    if bench.nginx is not None:
        nginx = column(results, "nginx", "MB/s")
        vs_nginx = ratios(ours, nginx)
        rows.append(Row(case, "MB/s", "nginx sendfile", nginx, ours, vs_nginx, ">= 0.8x", at_least(vs_nginx, 0.8)))
    cpu_ours = column(results, "ours", "CPU s/GB")
    for impl, name in (("starlette", "Starlette"), ("nginx", "nginx sendfile"), ("floor", "pread + send floor")):
        if impl in results:
            cpu = column(results, impl, "CPU s/GB")
            rows.append(Row(f"{case}: server CPU", "s/GB", name, cpu, cpu_ours, ratios(cpu_ours, cpu)))
    return rows


def stream_row(bench: Bench, case: str, kind: str, chunk: int, target: float | None) -> Row:
    path = f"/stream?kind={kind}&chunk={chunk}&size={bench.size}"
    # The two servers take turns on one client: one download after the other swings too much here.
    results = bench.taking_turns(case, "MB/s", lambda ports: stream_rates(ports, path, bench.seconds))
    starlette, ours = column(results, "starlette", "MB/s"), column(results, "ours", "MB/s")
    vs_starlette = ratios(ours, starlette)
    if target is None:
        return Row(case, "MB/s", "Starlette", starlette, ours, vs_starlette)
    return Row(
        case, "MB/s", "Starlette", starlette, ours, vs_starlette, f">= {target}x", at_least(vs_starlette, target)
    )


def run(bench: Bench) -> list[Row]:
    rows = []
    if bench.has_file_response:
        rows += file_rows(bench, "file, plain", {})
        rows += file_rows(bench, "file, single range", {"Range": f"bytes={RANGE_START}-"})
    for chunk, target in ((4096, None), (65536, 0.95), (MiB, None)):
        rows.append(stream_row(bench, f"stream from memory, {chunk // 1024} KiB chunks", "never", chunk, target))
    rows.append(stream_row(bench, "sync iterator, 64 KiB chunks", "sync", 65536, None))
    return rows
