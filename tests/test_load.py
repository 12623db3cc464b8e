"""Load with random disconnects, and stalled clients, against real servers on loopback.

``test_load_with_random_disconnects`` sends ``REQUESTS`` requests per server, ``CONCURRENCY`` at a
time from raw-socket client threads, mixing a plain file, one range, several ranges, a stream whose
producer awaits, one that never awaits and a sync iterator. Each client reads a random amount and
closes (FIN or RST), reads to the end, or leaves right after sending its request. The request id
is in the path, so that the app's log (a ``Recorder``) can be checked per request afterwards. The
RNG is seeded; the seed is printed and ``DISCONNECT_RESPONSES_LOAD_SEED`` replays it.

The servers run in this process (``tests/servers.py``), so the process's descriptors, threads and
memory are the server's, plus the client threads, which are gone when they are counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import logging
import os
import random
import sys
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio.lowlevel
import pytest
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from disconnect_responses import FileResponse, Outcome, StreamingResponse

from .servers import (
    SERVER_KINDS,
    UVICORN_INCOMPLETE,
    Download,
    Event,
    Recorder,
    client_fetch,
    client_stall,
    download,
    request_then_leave,
    serve,
)

LOAD_KINDS = ("uvicorn-httptools", "hypercorn-asyncio", "hypercorn-trio")
REQUESTS = 1000
WARM_UP = 100
CONCURRENCY = 50
FILE_SIZE = 3 * 1024 * 1024 + 12345
ENDPOINTS = ("file", "range", "multirange", "stream-await", "stream-never", "sync")
SETTLE = 30.0
RSS_TOLERANCE = 32 * 1024 * 1024
SEED_VARIABLE = "DISCONNECT_RESPONSES_LOAD_SEED"

# A stream of 40 chunks of 8 to 120 KiB (about 2.5 MiB), the same on every run.
_chunk_rng = random.Random(0)
STREAM_CHUNKS = [_chunk_rng.randbytes(_chunk_rng.randrange(8 * 1024, 120 * 1024)) for _ in range(40)]
STREAM = b"".join(STREAM_CHUNKS)
STREAM_DIGEST = hashlib.sha256(STREAM).hexdigest()


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The app


class _TrackedAsync:
    """An async body iterator over ``STREAM_CHUNKS`` that records each call of ``aclose``."""

    def __init__(self, recorder: Recorder, rid: str, awaits: bool) -> None:
        self.recorder = recorder
        self.rid = rid
        self.awaits = awaits
        self.index = 0

    def __aiter__(self) -> _TrackedAsync:
        return self

    async def __anext__(self) -> bytes:
        if self.awaits:
            await anyio.lowlevel.checkpoint()
        if self.index == len(STREAM_CHUNKS):
            raise StopAsyncIteration
        self.index += 1
        return STREAM_CHUNKS[self.index - 1]

    async def aclose(self) -> None:
        self.recorder.record("closed", self.rid)


class _TrackedSync:
    """A sync body iterator over ``STREAM_CHUNKS`` that records each call of ``close``."""

    def __init__(self, recorder: Recorder, rid: str) -> None:
        self.recorder = recorder
        self.rid = rid
        self.chunks = iter(STREAM_CHUNKS)

    def __iter__(self) -> _TrackedSync:
        return self

    def __next__(self) -> bytes:
        return next(self.chunks)

    def close(self) -> None:
        self.recorder.record("closed", self.rid)


class LoadApp:
    """Serves ``/<endpoint>/<request id>``; records "start", "closed" (streams), "background",
    "outcome" and "end" with the request id."""

    def __init__(self, path: Path, recorder: Recorder, send_timeout: float | None = None) -> None:
        self.path = path
        self.recorder = recorder
        self.send_timeout = send_timeout

    def response(self, endpoint: str, rid: str) -> StreamingResponse | FileResponse:
        background = BackgroundTask(self.recorder.record, "background", rid)
        if endpoint in ("file", "range", "multirange"):
            return FileResponse(self.path, background=background, send_timeout=self.send_timeout)
        content: _TrackedAsync | _TrackedSync
        headers = None
        if endpoint == "sync":
            content = _TrackedSync(self.recorder, rid)
        else:
            content = _TrackedAsync(self.recorder, rid, awaits=endpoint == "stream-await")
        if endpoint == "stream-never":
            headers = {"content-length": str(len(STREAM))}
        return StreamingResponse(
            content,
            headers=headers,
            media_type="application/octet-stream",
            background=background,
            send_timeout=self.send_timeout,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _, endpoint, rid = scope["path"].split("/")
        self.recorder.record("start", rid)
        try:
            response = self.response(endpoint, rid)
            await response(scope, receive, send)
            self.recorder.record("outcome", (rid, response.outcome))
        finally:
            self.recorder.record("end", rid)


# ---------------------------------------------------------------------------------------------
# The clients


@dataclasses.dataclass
class Job:
    rid: str
    endpoint: str
    mode: str  # "full", "partial", "partial-rst", "leave", "leave-rst"
    limit: int
    ranges: list[tuple[int, int]]  # inclusive, as in the Range header

    @property
    def headers(self) -> list[tuple[str, str]]:
        if not self.ranges:
            return []
        return [("Range", "bytes=" + ",".join(f"{first}-{last}" for first, last in self.ranges))]


@dataclasses.dataclass
class Result:
    job: Job
    answer: Download | None


def plan(rng: random.Random, prefix: str, count: int) -> list[Job]:
    jobs = []
    for number in range(count):
        endpoint = rng.choice(ENDPOINTS)
        ranges: list[tuple[int, int]] = []
        length = len(STREAM)
        if endpoint == "file":
            length = FILE_SIZE
        elif endpoint == "range":
            first = rng.randrange(FILE_SIZE)
            ranges = [(first, rng.randrange(first, FILE_SIZE))]
        elif endpoint == "multirange":
            half = FILE_SIZE // 2
            first = rng.randrange(half - 2)
            second = rng.randrange(half, FILE_SIZE)
            ranges = [(first, rng.randrange(first, half - 2)), (second, rng.randrange(second, FILE_SIZE))]
        if ranges:
            length = sum(last - first + 1 for first, last in ranges)
        # The last clients all read to the end: a request sent and dropped at the very end could still
        # be on its way into the server when the counts are taken.
        weights = [30, 30, 30, 5, 5] if number < count - CONCURRENCY else [1, 0, 0, 0, 0]
        mode = rng.choices(["full", "partial", "partial-rst", "leave", "leave-rst"], weights)[0]
        jobs.append(Job(f"{prefix}{number}", endpoint, mode, rng.randrange(length + 1), ranges))
    return jobs


def run_client(port: int, job: Job) -> Result:
    path = f"/{job.endpoint}/{job.rid}"
    if job.mode.startswith("leave"):
        request_then_leave(port, path, rst=job.mode == "leave-rst", headers=job.headers)
        return Result(job, None)
    limit = None if job.mode == "full" else job.limit
    return Result(job, download(port, path, limit, rst=job.mode == "partial-rst", headers=job.headers))


def run_clients(port: int, jobs: list[Job]) -> list[Result]:
    with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="load-client") as executor:
        return list(executor.map(lambda job: run_client(port, job), jobs))


def expected(job: Job, answer: Download, data: bytes) -> tuple[int, str]:
    """The status and body digest a complete answer to ``job`` must have (hashed without copies)."""
    view = memoryview(data)
    if job.endpoint == "file":
        return 200, sha256(data)
    if job.endpoint == "range":
        [(first, last)] = job.ranges
        return 206, sha256(view[first : last + 1])
    if job.endpoint == "multirange":
        content_type = answer.head.header("content-type") or ""
        boundary = content_type.removeprefix("multipart/byteranges; boundary=")
        hasher = hashlib.sha256()
        for first, last in job.ranges:
            hasher.update(
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n".encode()
            )
            hasher.update(view[first : last + 1])
            hasher.update(b"\r\n")
        hasher.update(f"--{boundary}--".encode())
        return 206, hasher.hexdigest()
    return 200, STREAM_DIGEST


# ---------------------------------------------------------------------------------------------
# Resource counts


def descriptors() -> list[str]:
    """What each open descriptor of this process points at."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def rss(trim: bool = True) -> int:
    """The resident set size; with ``trim``, after glibc returned the free heap to the OS
    (``malloc_trim``), so that it says what is in use, not what the allocator kept from the peak:
    with 50 client and up to 40 worker threads, glibc keeps per-thread arenas of freed memory."""
    if trim and _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


# The files whose functions keep a pool's idle worker thread waiting for its next job.
_POOL_FILES = (
    os.path.join("concurrent", "futures", "thread.py"),
    os.path.join("anyio", "_backends", "_asyncio.py"),
    os.path.join("trio", "_core", "_thread_cache.py"),
    os.path.join("trio", "_core", "_entry_queue.py"),
    os.path.join("trio", "_core", "_wakeup_socketpair.py"),
    os.path.join("trio", "_threads.py"),
    os.path.join("outcome", "_impl.py"),
    "threading.py",
    "queue.py",
)


def _frames(frame: types.FrameType | None) -> Iterator[types.FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def busy_threads(ignore: set[int]) -> list[str]:
    """Threads (other than ``ignore``) running anything but a thread pool's wait for work: a thread
    left over by a response would be inside a ``next()``, a ``close()`` or a read."""
    frames = sys._current_frames()
    busy = []
    for thread in threading.enumerate():
        if thread.ident is None or thread.ident in ignore or thread.ident not in frames:
            continue
        files = [frame.f_code.co_filename for frame in _frames(frames[thread.ident])]
        if not all(file.endswith(_POOL_FILES) for file in files):
            busy.append(f"{thread.name}: {files[0]}:{frames[thread.ident].f_code.co_name}")
    return busy


# ---------------------------------------------------------------------------------------------
# Load with random disconnects


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(FILE_SIZE)


@pytest.fixture(scope="module")
def seed() -> int:
    value = os.environ.get(SEED_VARIABLE)
    chosen = int(value) if value else random.SystemRandom().randrange(2**32)
    print(f"\nload seed: {chosen} (replay with {SEED_VARIABLE}={chosen})")
    return chosen


def outcome_by_request(events: list[Event]) -> dict[str, Outcome]:
    found: dict[str, Outcome] = {}
    for event in events:
        if event.name == "outcome":
            value = event.value
            assert isinstance(value, tuple)
            rid, outcome = value
            assert isinstance(rid, str) and isinstance(outcome, Outcome) and rid not in found
            found[rid] = outcome
    return found


def idle_app_run(kind: str) -> None:
    """Start and stop a server of ``kind`` once, so that what a server allocates once per process
    (uvloop keeps a pipe open after its first loop) is in the baseline."""

    async def idle(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("no request expected")

    with serve(idle, kind):
        pass


def settled(recorder: Recorder, must_end: set[str]) -> None:
    """Wait until every request whose client got a head has ended and none is still running."""

    def all_ended(events: list[Event]) -> bool:
        counts = Counter(event.name for event in events)
        ended = {event.value for event in events if event.name == "end"}
        return counts["start"] == counts["end"] and must_end <= ended

    recorder.wait_for(all_ended, timeout=SETTLE)


@pytest.mark.parametrize("kind", LOAD_KINDS)
def test_load_with_random_disconnects(
    kind: str, file: Path, data: bytes, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    """After ``REQUESTS`` requests, 50 at a time, most clients leaving early: each started request ran
    its background task once and closed its iterator once (before it); every complete answer is
    byte-identical to its source and reported COMPLETED; no response, descriptor of the file, or busy
    thread is left, every descriptor is closed once the server stops; memory is back near its
    baseline; the server logged no error, and the library one line per interrupted response."""
    caplog.set_level(logging.INFO, logger="disconnect_responses")
    rng = random.Random(f"{seed}-{kind}")
    context = f"seed {seed}, {kind}"
    recorder = Recorder()
    idle_app_run(kind)
    fds_before = sorted(descriptors())
    threads_before = {thread.ident for thread in threading.enumerate() if thread.ident is not None}

    with serve(LoadApp(file, recorder), kind) as server:
        server_thread = {thread.ident or 0 for thread in threading.enumerate() if thread.name == f"server-{kind}"}
        warm_up = run_clients(server.port, plan(rng, "w", WARM_UP))
        settled(recorder, {result.job.rid for result in warm_up if result.answer is not None})
        gc.collect()
        rss_baseline_raw, rss_baseline = rss(trim=False), rss()

        jobs = plan(rng, "r", REQUESTS)
        results = run_clients(server.port, jobs)
        settled(recorder, {result.job.rid for result in results if result.answer is not None})
        gc.collect()
        rss_after_raw, rss_after = rss(trim=False), rss()
        busy_during = busy_threads(threads_before | server_thread)
        file_fds = [link for link in descriptors() if link.startswith(str(file))]
        print(
            f"{kind}: RSS after warm-up {rss_baseline_raw / 2**20:.1f} MiB ({rss_baseline / 2**20:.1f} trimmed), "
            f"after the load {rss_after_raw / 2**20:.1f} MiB ({rss_after / 2**20:.1f} trimmed)"
        )

    # The server has stopped: nothing more can start.
    busy_after = busy_threads(threads_before)
    fds_after = sorted(descriptors())
    events = recorder.events
    counts: dict[str, Counter[object]] = {}
    for event in events:
        counts.setdefault(event.name, Counter())[event.value] += 1
    started = set(counts["start"])
    outcomes = outcome_by_request(events)
    endpoint_of = {result.job.rid: result.job.endpoint for result in warm_up + results}

    # Every started request ran its background task and ended exactly once; every stream's
    # iterator was closed exactly once, before that background task.
    assert all(counts["start"][rid] == 1 for rid in started), context
    assert {rid: n for rid, n in counts["background"].items() if n != 1} == {}, context
    assert set(counts["background"]) == started and set(counts["end"]) == started, context
    assert all(counts["end"][rid] == 1 for rid in started), context
    streams = {rid for rid in started if not str(endpoint_of[str(rid)]).endswith(("file", "range"))}
    assert set(counts["closed"]) == streams and set(counts["closed"].values()) <= {1}, context
    order = {(event.name, event.value): index for index, event in enumerate(events)}
    assert all(order["closed", rid] < order["background", rid] for rid in streams), context

    # Every complete answer is whole and the server agrees it completed.
    completed = 0
    for result in warm_up + results:
        if result.answer is None:
            continue
        assert result.job.rid in started, context
        if result.answer.complete:
            completed += 1
            status, digest = expected(result.job, result.answer, data)
            assert (result.answer.head.status, result.answer.digest) == (status, digest), (context, result.job)
            assert outcomes[result.job.rid] is Outcome.COMPLETED, (context, result.job)
    assert completed >= REQUESTS // 5, context

    # Nothing left over.
    assert file_fds == [], context
    assert busy_during == [] and busy_after == [], context
    assert fds_after == fds_before, context
    assert rss_after - rss_baseline < RSS_TOLERANCE, (context, rss_baseline, rss_after)
    server.assert_no_errors()
    interrupted = sum(1 for outcome in outcomes.values() if outcome not in (Outcome.COMPLETED, Outcome.ERROR))
    stopped_lines = [record for record in caplog.records if "stopped:" in record.getMessage()]
    assert len(stopped_lines) == interrupted, context
    assert set(outcomes.values()) <= {Outcome.COMPLETED, Outcome.DISCONNECTED}, context

    left_early = sum(1 for result in results if not (result.answer and result.answer.complete))
    disconnected = sum(
        1 for rid, outcome in outcomes.items() if str(rid).startswith("r") and outcome is Outcome.DISCONNECTED
    )
    print(
        f"{kind}: {len(jobs)} requests (+{WARM_UP} warm-up), {len(jobs) - left_early} read to the end, "
        f"{left_early} left early, {disconnected} seen as disconnects by the server, "
        f"{len(started)} started, leaks 0; descriptors {len(fds_before)} -> {len(fds_after)}"
    )


# ---------------------------------------------------------------------------------------------
# Stalled clients

STALL_TIMEOUT = 0.5
BIG_SIZE = 32 * 1024 * 1024
STALLED = ("stream-await", "stream-never", "sync", "file")


class _Endless(_TrackedAsync):
    async def __anext__(self) -> bytes:
        if self.awaits:
            await anyio.lowlevel.checkpoint()
        return STREAM_CHUNKS[0]


class _EndlessSync(_TrackedSync):
    def __next__(self) -> bytes:
        return STREAM_CHUNKS[0]


class StallApp(LoadApp):
    """``LoadApp`` whose streams never end; every response has ``send_timeout``."""

    def response(self, endpoint: str, rid: str) -> StreamingResponse | FileResponse:
        if endpoint == "file":
            return super().response(endpoint, rid)
        background = BackgroundTask(self.recorder.record, "background", rid)
        content: _TrackedAsync | _TrackedSync
        if endpoint == "sync":
            content = _EndlessSync(self.recorder, rid)
        else:
            content = _Endless(self.recorder, rid, awaits=endpoint == "stream-await")
        return StreamingResponse(content, background=background, send_timeout=self.send_timeout)


# The same server limits as in test_streaming_servers.py's stall test, where they are explained.
STALL_KINDS = [
    *(kind for kind in SERVER_KINDS if kind not in ("hypercorn-trio", "hypercorn-h2")),
    pytest.param(
        "hypercorn-trio",
        marks=pytest.mark.skip(
            reason="hypercorn's trio worker shields its socket writes: a blocked send() cannot "
            "be cancelled (see test_streaming_servers.py)"
        ),
    ),
    pytest.param(
        "hypercorn-h2",
        marks=pytest.mark.skip(
            reason="hypercorn's HTTP/2 stream buffer never blocks send(): no stall to detect "
            "(see test_streaming_servers.py)"
        ),
    ),
]


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return os.urandom(BIG_SIZE)


@pytest.mark.parametrize("kind", STALL_KINDS)
def test_stalled_clients_are_let_go_while_another_downloads(kind: str, tmp_path: Path, big_data: bytes) -> None:
    """Four clients read the head and then stop reading, keeping their connections open; every
    response has ``send_timeout``. Each stalled response ends as SEND_TIMEOUT within a bound, while
    its client is still connected, with its iterator (or file) closed and its background task run;
    meanwhile another client downloads a 32 MiB file through the same kind of response, which
    completes byte-identical: the timeout lets go of the stalled, not of the slow-to-finish."""
    big = tmp_path / "big.bin"
    big.write_bytes(big_data)
    recorder = Recorder()
    stalled_rids = {f"s-{endpoint}" for endpoint in STALLED}

    def stalled_released(events: list[Event]) -> bool:
        ended = {event.value for event in events if event.name == "end"}
        return stalled_rids <= ended

    with serve(StallApp(big, recorder, send_timeout=STALL_TIMEOUT), kind) as server:
        with contextlib.ExitStack() as stalls:
            for endpoint in STALLED:
                head = stalls.enter_context(client_stall(server, f"/{endpoint}/s-{endpoint}"))
                assert head.status == 200
            answer = client_fetch(server, "/file/fast")
            # Waited for while the stalled clients are still connected: the timeout let them go.
            recorder.wait_for(stalled_released, timeout=SETTLE)
        recorder.wait_for("end", count=len(STALLED) + 1, timeout=SETTLE)

    assert answer.status == 200 and answer.body == big_data
    outcomes = outcome_by_request(recorder.events)
    assert outcomes == {**{rid: Outcome.SEND_TIMEOUT for rid in stalled_rids}, "fast": Outcome.COMPLETED}
    assert Counter(recorder.values("background")) == Counter([*stalled_rids, "fast"])
    stream_rids = stalled_rids - {"s-file"}
    assert Counter(recorder.values("closed")) == Counter(stream_rids)
    order = {(event.name, event.value): index for index, event in enumerate(recorder.events)}
    assert all(order["closed", rid] < order["background", rid] for rid in stream_rids)
    assert [link for link in descriptors() if link.startswith(str(big))] == []
    assert [record for record in server.log_records if record.exc_info is not None] == []
    # uvicorn logs one line for each response let go by the timeout (its client is still connected).
    assert server.errors() == ([UVICORN_INCOMPLETE] * len(STALLED) if kind.startswith("uvicorn") else [])
