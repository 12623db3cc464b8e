"""The floor of a file's server CPU per GB without zero-copy: ``python -m benchmarks.floor_server
--port N --file F``.

An HTTP/1.1 server in one thread that answers each request, one connection at a time, with the
whole file by ``os.pread`` into a new 4 MiB buffer and ``socket.sendall``: the two copies every
non-sendfile server makes, and nothing else (no event loop, no worker threads, no ASGI).
"""

from __future__ import annotations

import argparse
import os
import socket

CHUNK = 4 * 1024 * 1024


def serve(port: int, path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    header = f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n".encode()
    with socket.create_server(("127.0.0.1", port), backlog=64) as listener:
        while True:
            connection, _ = listener.accept()
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    received = connection.recv(65536)
                    if not received:
                        break
                    request += received
                else:
                    try:
                        connection.sendall(header)
                        offset = 0
                        while offset < size:
                            chunk = os.pread(fd, CHUNK, offset)
                            connection.sendall(chunk)
                            offset += len(chunk)
                    except OSError:
                        pass  # the client left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    args = parser.parse_args()
    serve(args.port, args.file)


if __name__ == "__main__":
    main()
