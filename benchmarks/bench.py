"""Run the benchmarks: ``python -m benchmarks.bench [options]`` (``scripts/bench`` sets up a virtualenv first).

Each case runs Starlette's response classes and ours side by side, against real servers started as
subprocesses on 127.0.0.1, and the run ends with a Markdown table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from . import (
    concurrency_benchmark,
    disconnect_benchmark,
    fairness_benchmark,
    memory_benchmark,
    overhead_benchmark,
    throughput_benchmark,
)
from .harness import (
    IMPLS,
    Bench,
    MiB,
    Row,
    cpus,
    ensure_file,
    environment,
    find_nginx,
    floor_server,
    make_workdir,
    markdown,
    nginx_server,
    write_json,
)

CASES = {
    "throughput": throughput_benchmark.run,
    "concurrency": concurrency_benchmark.run,
    "disconnect": disconnect_benchmark.run,
    "memory": memory_benchmark.run,
    "overhead": overhead_benchmark.run,
    "fairness": fairness_benchmark.run,
}
SERVERS = ("uvicorn", "uvicorn-h11", "hypercorn", "hypercorn-trio")


def size(text: str) -> int:
    """``512M``, ``1G``, ``64K`` or a number of bytes; the suffixes are binary (MiB, GiB, KiB)."""
    scale = {"K": 1024, "M": MiB, "G": 1024 * MiB}.get(text[-1:].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disconnect-responses-bench"
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: %(default)s")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn", help="uvicorn is httptools with uvloop")
    parser.add_argument("--size", type=size, default=512 * MiB, help="file and stream size (default 512M)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per implementation and case (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of timed runs (default 2)")
    parser.add_argument("--readers", type=int, default=200, help="slow readers in the memory case (default 200)")
    parser.add_argument("--memory-seconds", type=float, default=8.0, help="length of a memory run (default 8)")
    parser.add_argument("--client", choices=("auto", "curl", "python"), default="auto")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even when installed")
    parser.add_argument("--cache-dir", type=Path, default=cache, help="where the random file is kept")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.size < 1024 * 1024:
        parser.error("--repeat must be at least 1 and --size at least 1M")
    if args.client == "auto":
        args.client = "curl" if shutil.which("curl") else "python"
    return args


Results = tuple[list[Row], dict[str, str], list[str]]


def run(args: argparse.Namespace) -> Results:
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    cases = [case for case in CASES if case in args.cases.split(",")]
    load = os.getloadavg()[0]
    notes = [f"Load average when the run started: {load:.2f}."]
    if load > 0.5:
        notes[0] += " Other processes were using the CPUs: expect noisy figures."
        say(f"warning: load average {load:.2f}; other processes on these CPUs make the figures noisy")
    workdir = make_workdir()
    failed = False
    try:
        return run_cases(args, cases, workdir, notes, say)
    except Exception:
        failed = True
        say(f"failed; the server logs are in {workdir}")
        raise
    finally:
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)


def run_cases(
    args: argparse.Namespace, cases: list[str], workdir: Path, notes: list[str], say: Callable[[str], None]
) -> Results:
    with ExitStack() as stack:
        path = args.cache_dir / f"random-{args.size}.bin"
        if not path.exists():
            say(f"writing {args.size / MiB:g} MiB of random bytes to {path}")
        bench = Bench(
            server=args.server, size=args.size, repeat=args.repeat, seconds=args.seconds,
            file=ensure_file(path, args.size), workdir=workdir, client=args.client,
            readers=args.readers, notes=notes, memory_seconds=args.memory_seconds, progress=say,
        )  # fmt: skip
        import disconnect_responses

        bench.has_file_response = hasattr(disconnect_responses, "FileResponse")
        if not bench.has_file_response:
            bench.notes.append("disconnect_responses.FileResponse is not available yet: the file cases were skipped.")
        say(f"starting {args.server} for {' and '.join(IMPLS)}")
        for impl in IMPLS:
            bench.servers[impl] = stack.enter_context(bench.fresh_server(impl))
        nginx = None if args.no_nginx else find_nginx()
        if "throughput" in cases and bench.has_file_response:
            bench.floor = stack.enter_context(floor_server(bench.file, workdir))
            if nginx is None:
                bench.notes.append("nginx is not installed: no sendfile ceiling.")
            else:
                bench.nginx = stack.enter_context(nginx_server(nginx, bench.file, workdir))
        rows: list[Row] = []
        for case in cases:
            say(f"{case}")
            rows += CASES[case](bench)
        say("done")
        return rows, environment(bench), bench.notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    # Servers run in their own sessions, so Ctrl+C reaches only this process: the ExitStack stops them.
    previous = signal.signal(signal.SIGTERM, terminate)
    affinity = os.sched_getaffinity(0)
    pinned = cpus()
    try:
        if pinned is not None:
            os.sched_setaffinity(0, {pinned[1]})
        rows, env, notes = run(args)
    finally:
        os.sched_setaffinity(0, affinity)
        signal.signal(signal.SIGTERM, previous)
    missed = [row for row in rows if row.passed is False]
    if missed:
        missed_cases = (f"{row.case} (vs {row.baseline})" if row.ratios else row.case for row in missed)
        notes = [*notes, "Missed targets: " + "; ".join(missed_cases) + "."]
    table = markdown(rows, env, notes)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, rows, env, notes)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        sys.exit(130)
