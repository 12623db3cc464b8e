"""Disconnect reaction: a client reads 1 MiB, closes, and the server's records say what followed."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from functools import partial
from typing import cast

from .harness import Bench, MiB, Row, column, get_json, read_then_close

CHUNK = 65536
KINDS = {
    "await": "async producer that awaits",
    "never": "async producer that never awaits",
    "sync": "sync iterator",
    "file": "file",
}
KEYS = ("chunks", "after told", "bytes", "ms", "closed")
WAIT = 30  # seconds to wait for the background task after the close
_ids = itertools.count()


def disconnect_once(bench: Bench, kind: str, impl: str) -> Mapping[str, float]:
    server, size = bench.servers[impl], bench.size
    request_id = f"{server.name}-{next(_ids)}"
    path = f"/disconnect?id={request_id}&kind={kind}&chunk={CHUNK}&size={size}"
    closed_at = read_then_close(server.port, path, read=min(MiB, size // 4), timeout=30)
    deadline = time.monotonic() + WAIT
    while not (record := get_json(server.port, f"/records?id={request_id}"))["done"]:
        if time.monotonic() > deadline:
            bench.notes.append(f"disconnect, {kind}, {impl}: no background task within {WAIT} s of the close.")
            break
        time.sleep(0.02)
    sends = cast("list[list[float]]", record["sends"])
    after = [n for at, n in sends if at > closed_at and n]
    background_at = cast("float | None", record["background_at"]) or math.inf
    # The listener may never be told (nothing was left to send when it ran): count up to the background task.
    told_at = cast("float | None", record["disconnect_at"]) or background_at
    return {
        "chunks": len(after),
        "after told": sum(1 for at, n in sends if at > told_at and n),
        "bytes": sum(after),
        "ms": (background_at - closed_at) * 1000,
        "closed": float(record["closed_before_background"] is True),
    }


def run(bench: Bench) -> list[Row]:
    rows = []
    for kind, label in KINDS.items():
        if kind == "file" and not bench.has_file_response:
            continue
        case = f"disconnect, {label}"
        measure = partial(disconnect_once, bench, kind)
        results = bench.paired(case, measure, show="ms")
        starlette = {key: column(results, "starlette", key) for key in KEYS}
        ours = {key: column(results, "ours", key) for key in KEYS}
        rows += [
            # The target counts from when the server reported the disconnect (the core issue's
            # definition): before that, nothing the app can see has changed.
            Row(f"{case}: chunks sent after http.disconnect reached the app", "chunks", "Starlette",
                starlette["after told"], ours["after told"], target="<= 1", passed=max(ours["after told"]) <= 1),
            Row(f"{case}: chunks sent after the close", "chunks", "Starlette", starlette["chunks"], ours["chunks"]),
            Row(f"{case}: bytes sent after the close", "bytes", "Starlette", starlette["bytes"], ours["bytes"]),
            Row(f"{case}: close to background task", "ms", "Starlette", starlette["ms"], ours["ms"],
                target="<= 5 ms", passed=max(ours["ms"]) <= 5),
            Row(f"{case}: iterator closed before background", "yes", "Starlette", starlette["closed"],
                ours["closed"], target="always", passed=all(ours["closed"])),
        ]  # fmt: skip
    return rows
