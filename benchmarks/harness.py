"""What every benchmark shares: servers as subprocesses, clients, repetitions and the report."""

from __future__ import annotations

import json
import math
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("starlette", "ours")
MiB = 1024 * 1024
SMALL_FILE = 4096  # bytes of /smallfile
Measure = Callable[[str], Mapping[str, float]]


@cache
def cpus() -> tuple[int, int] | None:
    """The (server, client) CPUs when there are two to pin to, else None; decided once per process."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or shutil.which("taskset") is None:
        return None
    return allowed[0], allowed[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not listening on port {port} after {timeout} s")


@dataclass
class Server:
    name: str
    pid: int
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def subprocess_server(name: str, argv: list[str], port: int, log: Path) -> Iterator[Server]:
    """Run ``argv`` pinned to the server CPU until the block ends; stop it on any exit."""
    pinned = cpus()
    prefix = ["taskset", "-c", str(pinned[0])] if pinned else []
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            prefix + argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        try:
            wait_for_port(port, process, timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}; log:\n{log.read_text(errors='replace')[-2000:]}") from None
        yield Server(name, process.pid, port)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def app_server(impl: str, server: str, file: Path, workdir: Path) -> AbstractContextManager[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.app", "--impl", impl, "--server", server, "--port", str(port)]
    small_file = ensure_file(file.with_name(f"random-{SMALL_FILE}.bin"), SMALL_FILE)
    argv += ["--file", str(file), "--small-file", str(small_file), "--parent", str(os.getpid())]
    return subprocess_server(impl, argv, port, workdir / f"{impl}-{server}.log")


def floor_server(file: Path, workdir: Path) -> AbstractContextManager[Server]:
    """The pread + send loop of ``floor_server.py``: the floor of CPU per GB without zero-copy."""
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.floor_server", "--port", str(port), "--file", str(file)]
    return subprocess_server("floor", argv, port, workdir / "floor.log")


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /file {{ alias {file}; }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_server(nginx: str, file: Path, workdir: Path) -> AbstractContextManager[Server]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, file=file))
    argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]
    return subprocess_server("nginx", argv, port, workdir / "nginx.log")


def ensure_file(path: Path, size: int) -> Path:
    """Random (incompressible, not sparse) bytes, written once and reused while the size matches."""
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    partial.replace(path)
    return path


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Clients. All talk HTTP/1.1 to 127.0.0.1; the raw-socket ones count bytes after the header
# (chunked framing included: under 0.3% of the body even with 4 KiB chunks).


def request_bytes(path: str, headers: Mapping[str, str], keep_alive: bool = False) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def python_download(port: int, path: str, headers: Mapping[str, str], timeout: float) -> tuple[int, int, float]:
    """(status, body bytes, seconds from request sent to end of body)."""
    buffer = bytearray(4 * MiB)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        started = time.perf_counter()
        sock.sendall(request_bytes(path, headers))
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(buffer)
            if not n:
                raise ConnectionError("connection closed before the response header")
            head += bytes(buffer[:n])
        header, _, rest = head.partition(b"\r\n\r\n")
        total = len(rest)
        while n := sock.recv_into(buffer):
            total += n
        elapsed = time.perf_counter() - started
    return int(header.split(None, 2)[1]), total, elapsed


def timed_download(port: int, path: str, seconds: float) -> int:
    """Read a response for ``seconds`` at most, as fast as possible; the bytes received."""
    buffer = bytearray(4 * MiB)
    total = 0
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        sock.sendall(request_bytes(path, {}))
        while time.monotonic() < deadline and (n := sock.recv_into(buffer)):
            total += n
    return total


def curl_download(url: str, headers: Mapping[str, str], timeout: float) -> tuple[int, int, float]:
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", str(timeout)]
    argv += ["-w", "%{http_code} %{size_download} %{time_pretransfer} %{time_total}", url]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5, check=False).stdout.split()
    status, size, pretransfer, total = int(out[0]), int(out[1]), float(out[2]), float(out[3])
    return status, size, total - pretransfer


def read_then_close(port: int, path: str, read: int, timeout: float) -> float:
    """Read ``read`` bytes of a response body, close the socket and return ``time.monotonic()`` of the close.

    Closing with unread data makes Linux send a RST, as a browser or curl aborting a download does.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request_bytes(path, {}))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the response header")
            data += chunk
        got = len(data.partition(b"\r\n\r\n")[2])
        while got < read:
            chunk = sock.recv(min(65536, read - got))
            if not chunk:
                raise ConnectionError(f"connection closed after {got} body bytes")
            got += len(chunk)
    finally:
        closed_at = time.monotonic()
        sock.close()
    return closed_at


def get_json(port: int, path: str, timeout: float = 5) -> dict[str, object]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        result: dict[str, object] = json.loads(connection.getresponse().read())
        return result
    finally:
        connection.close()


def slow_readers(port: int, path: str, count: int, seconds: float, read: int, every: float) -> int:
    """``count`` connections that each read ``read`` bytes every ``every`` s; returns how many got data."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request_bytes(path, {}))
            sock.setblocking(False)
            socks.append(sock)
        got = [0] * count
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                try:
                    got[i] += len(sock.recv(read))
                except BlockingIOError:
                    pass
            time.sleep(every)
        return sum(1 for g in got if g)
    finally:
        for sock in socks:
            sock.close()


SLICE = 0.1


def requests_per_second(ports: Mapping[str, int], path: str, connections: int, seconds: float) -> dict[str, float]:
    """Keep-alive GETs on ``connections`` sockets per server, each sent once the last reply ended.

    The servers take turns in slices of ``SLICE`` seconds, in the order ABBA starting with the
    first of ``ports``, until each had at least ``seconds``: a change in the machine's load
    (another tenant, the CPU's clock) then hits them alike, where two runs one after the other saw
    ratios from 0.8 to 1.05. A slice stops sending at its end and lasts until its last reply; each
    server's replies over the summed length of its slices give its rate. A reply ends after its
    ``content-length``, or with the empty chunk ``0\\r\\n\\r\\n`` of a streamed body.
    """
    request = request_bytes(path, {}, keep_alive=True)
    selector = selectors.DefaultSelector()
    pools = {
        name: [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
        for name, port in ports.items()
    }
    try:
        for sock in (sock for pool in pools.values() for sock in pool):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, bytearray())
        return _take_turns(list(pools), seconds, lambda name, length: _slice(selector, pools[name], request, length))
    finally:
        for pool in pools.values():
            for sock in pool:
                selector.unregister(sock)
                sock.close()
        selector.close()


def _take_turns(
    names: Sequence[str], seconds: float, turn: Callable[[str, float], tuple[float, float]]
) -> dict[str, float]:
    """What each of ``names`` counted per second, taking turns in the order ABBA until each had at
    least ``seconds``; ``turn(name, length)`` runs one turn of about ``length`` seconds and returns
    (what it counted, how long it took). A first turn of each (at most 0.5 s) warms the server up
    and is not counted."""
    for name in names:
        turn(name, min(0.5, seconds / 4))
    counted = dict.fromkeys(names, 0.0)
    elapsed = dict.fromkeys(names, 0.0)
    order = list(names)
    while min(elapsed.values()) < seconds:
        for name in order:
            amount, took = turn(name, SLICE)
            counted[name] += amount
            elapsed[name] += took
        order.reverse()
    return {name: counted[name] / elapsed[name] for name in names}


STREAM_SKIP = 16 * MiB  # read at the start of a slice, not counted: what the socket buffers held


def stream_rates(ports: Mapping[str, int], path: str, seconds: float) -> dict[str, float]:
    """MB/s of one client reading a streamed body from each server, the servers taking turns.

    As in ``requests_per_second``, the servers take turns in slices of ``SLICE`` seconds (ABBA)
    until each had at least ``seconds``, so that a change in the machine's load hits them alike
    (one download after the other saw either side's rate swing by 1.5x on the development VM).
    A server waits on flow control while it is not read; each slice first reads ``STREAM_SKIP``
    bytes uncounted (what the socket buffers filled with meanwhile, read at memory speed), then
    counts for ``SLICE`` seconds. A body that ends is asked for again on the same connection.
    """
    request = request_bytes(path, {}, keep_alive=True)
    socks = {name: socket.create_connection(("127.0.0.1", port), timeout=10) for name, port in ports.items()}
    tails = dict.fromkeys(socks, b"")
    buffer = memoryview(bytearray(MiB))

    def read(name: str, until: float, limit: float) -> int:
        sock, received = socks[name], 0
        while received < limit and time.perf_counter() < until:
            got = sock.recv_into(buffer)
            if not got:
                raise ConnectionError(f"{name} closed the connection")
            received += got
            tails[name] = (tails[name] + bytes(buffer[max(0, got - 7) : got]))[-7:]
            if tails[name] == b"\r\n0\r\n\r\n":
                sock.sendall(request)
        return received

    def turn(name: str, length: float) -> tuple[float, float]:
        read(name, math.inf, STREAM_SKIP)  # bounded by the socket's timeout
        started = time.perf_counter()
        received = read(name, started + length, math.inf)
        return received / 1e6, time.perf_counter() - started

    try:
        for sock in socks.values():
            sock.sendall(request)
        return _take_turns(list(socks), seconds, turn)
    finally:
        for sock in socks.values():
            sock.close()


def _slice(
    selector: selectors.BaseSelector, pool: Sequence[socket.socket], request: bytes, seconds: float
) -> tuple[int, float]:
    """Keep ``pool`` busy for ``seconds``, then until its last reply: (replies, seconds it took)."""
    started = time.perf_counter()
    deadline = started + seconds
    for idle in pool:
        idle.send(request)
    waiting = len(pool)
    replies = 0
    while waiting:
        events = selector.select(timeout=10)
        if not events:
            raise TimeoutError("no reply in 10 s")
        for key, _ in events:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            buffer: bytearray = key.data
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed a keep-alive connection")
            buffer += data
            if _reply_complete(buffer):
                replies += 1
                buffer.clear()
                if time.perf_counter() < deadline:
                    sock.send(request)
                else:
                    waiting -= 1
    return replies, time.perf_counter() - started


def _reply_complete(buffer: bytearray) -> bool:
    """Whether ``buffer`` holds a whole reply: its ``content-length``, or else the last chunk."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in bytes(buffer[:head_end]).lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(buffer) - head_end - 4 >= int(line.split(b":", 1)[1])
    return buffer.endswith(b"\r\n0\r\n\r\n")


def latencies(port: int, path: str, seconds: float, pause: float) -> list[float]:
    """Sequential keep-alive GETs for ``seconds``; the milliseconds each took."""
    request = request_bytes(path, {}, keep_alive=True)
    samples: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + seconds
        while not samples or time.monotonic() < deadline:
            started = time.perf_counter()
            sock.sendall(request)
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed a keep-alive connection")
                data += chunk
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(pause)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# Results


@dataclass
class Row:
    """One line of the table: ours against a baseline, over the repetitions."""

    case: str
    unit: str
    baseline: str
    baseline_values: list[float]
    ours: list[float]
    ratios: list[float] | None = None
    target: str = ""
    passed: bool | None = None


def fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        for scale, name in ((MiB, "MiB"), (1024, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    if unit == "yes":
        return "yes" if value else "no"
    if unit in ("ms",):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summary(values: Sequence[float], unit: str, suffix: str = "") -> str:
    if not values:
        return "—"
    if unit == "yes":
        return f"{sum(1 for v in values if v)}/{len(values)} yes"
    median = fmt(statistics.median(values), unit) + suffix
    if len(values) == 1:
        return median
    return f"{median} ({fmt(min(values), unit)}–{fmt(max(values), unit)})"


def markdown(rows: Sequence[Row], environment: Mapping[str, str], notes: Sequence[str]) -> str:
    lines = [
        "Environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()) + ".",
        "",
        "Values: median (min–max) over the repetitions; ratio per pair of runs in the same repetition.",
        "",
        "| case | unit | baseline | baseline value | ours | ours / baseline | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = {True: "pass", False: "**FAIL**", None: ""}[row.passed]
        ratio = summary(row.ratios, "x", "x") if row.ratios else "—"
        lines.append(
            f"| {row.case} | {row.unit} | {row.baseline} | {summary(row.baseline_values, row.unit)} "
            f"| {summary(row.ours, row.unit)} | {ratio} | {row.target} | {result} |"
        )
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def ratios(ours: Sequence[float], baseline: Sequence[float]) -> list[float]:
    return [o / b if b else float("inf") for o, b in zip(ours, baseline, strict=True)]


def at_least(ratio_values: Sequence[float], target: float) -> bool:
    return statistics.median(ratio_values) >= target


def at_most(ratio_values: Sequence[float], target: float) -> bool:
    return statistics.median(ratio_values) <= target


# The run


@dataclass
class Bench:
    """Configuration and shared state of one run; cases receive it."""

    server: str
    size: int
    repeat: int
    seconds: float
    file: Path
    workdir: Path
    client: str
    readers: int = 200
    memory_seconds: float = 8.0
    progress: Callable[[str], None] = print
    servers: dict[str, Server] = field(default_factory=dict)
    nginx: Server | None = None
    floor: Server | None = None
    has_file_response: bool = False
    notes: list[str] = field(default_factory=list)

    def fresh_server(self, impl: str) -> AbstractContextManager[Server]:
        return app_server(impl, self.server, self.file, self.workdir)

    def download(self, server: Server, path: str, headers: Mapping[str, str] | None = None) -> Mapping[str, float]:
        """One download: MB/s (10^6 bytes per second) and server CPU seconds per GB."""
        headers = headers or {}
        timeout = 120.0
        cpu_before = cpu_seconds(server.pid)
        if self.client == "curl":
            status, size, elapsed = curl_download(server.url(path), headers, timeout)
        else:
            status, size, elapsed = python_download(server.port, path, headers, timeout)
        cpu = cpu_seconds(server.pid) - cpu_before
        if status not in (200, 206) or size < self.size // 2:
            raise RuntimeError(f"{server.name} {path}: status {status}, {size} bytes")
        return {"MB/s": size / elapsed / 1e6, "CPU s/GB": cpu / (size / 1e9)}

    def paired(
        self, label: str, measure: Measure, impls: Sequence[str] = IMPLS, show: str | None = None
    ) -> dict[str, list[Mapping[str, float]]]:
        """Run ``measure(impl)`` ``repeat`` times per implementation, alternating which goes first."""
        results: dict[str, list[Mapping[str, float]]] = {impl: [] for impl in impls}
        for rep in range(self.repeat):
            order = list(impls) if rep % 2 == 0 else list(reversed(impls))
            for impl in order:
                results[impl].append(measure(impl))
            shown = ", ".join(
                f"{impl} {fmt(results[impl][-1][show or next(iter(results[impl][-1]))], 'x')}" for impl in impls
            )
            self.progress(f"  {label}: run {rep + 1}/{self.repeat}: {shown}")
        return results

    def taking_turns(
        self, label: str, unit: str, rates: Callable[[Mapping[str, int]], Mapping[str, float]]
    ) -> dict[str, list[Mapping[str, float]]]:
        """Run ``rates`` (the servers' ports, in the order they take turns, to their rates)
        ``repeat`` times, alternating which server goes first; as ``paired``'s, under ``unit``."""
        results: dict[str, list[Mapping[str, float]]] = {impl: [] for impl in IMPLS}
        for rep in range(self.repeat):
            order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
            measured = rates({impl: self.servers[impl].port for impl in order})
            for impl in IMPLS:
                results[impl].append({unit: measured[impl]})
            shown = ", ".join(f"{impl} {measured[impl]:.0f}" for impl in IMPLS)
            self.progress(f"  {label}: run {rep + 1}/{self.repeat}: {shown}")
        return results


def column(results: Mapping[str, Sequence[Mapping[str, float]]], impl: str, key: str) -> list[float]:
    return [run[key] for run in results[impl]]


def environment(bench: Bench) -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    pinned = cpus()
    server = {
        "uvicorn": f"uvicorn {version('uvicorn')} (httptools {version('httptools')}, uvloop {version('uvloop')})",
        "uvicorn-h11": f"uvicorn {version('uvicorn')} (h11 {version('h11')}, uvloop {version('uvloop')})",
        "hypercorn": f"hypercorn {version('hypercorn')} (asyncio)",
        "hypercorn-trio": f"hypercorn {version('hypercorn')} (trio {version('trio')})",
    }[bench.server]
    if bench.client == "curl":
        client = (
            "curl "
            + subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=10).stdout.split()[1]
        )
    else:
        client = "Python raw sockets"
    import disconnect_responses

    return {
        "disconnect-responses": disconnect_responses.__version__,
        "Starlette": version("starlette"),
        "server": server,
        "Python": platform.python_version(),
        "Linux": platform.release(),
        "CPUs": f"{os.cpu_count()}, server on CPU {pinned[0]} and client on CPU {pinned[1]}" if pinned else
        f"{os.cpu_count()}, unpinned",
        "client": client,
        "file": f"{bench.size / MiB:g} MiB",
        "repetitions": str(bench.repeat),
    }  # fmt: skip


def write_json(path: Path, rows: Sequence[Row], env: Mapping[str, str], notes: Sequence[str]) -> None:
    path.write_text(json.dumps({"environment": env, "notes": notes, "rows": [asdict(r) for r in rows]}, indent=2))


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="disconnect-responses-bench-"))
