"""What is vendored from Starlette 1.10, so that every supported Starlette behaves as 1.10 does.

Private. Starlette 0.40 parsed ranges with a regex, merged them differently, had no cap on their
number and framed multipart bodies with bare ``\\n``; it also had no websocket denial for a
response. Changes when Starlette's own behaviour here changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Message, Send


def websocket_denial_send(send: Send) -> Send:
    """A ``send`` that turns a response into a websocket denial (Starlette 1.10, absent before 0.42)."""

    async def wrapped(message: Message) -> None:
        if message["type"] in {"http.response.start", "http.response.body"}:
            message = {**message, "type": "websocket." + message["type"]}
        await send(message)

    return wrapped


def should_use_range(http_if_range: str, last_modified: str, etag: str) -> bool:
    """Starlette 1.10's ``FileResponse._should_use_range``."""
    if http_if_range.startswith("W/"):
        return False
    return http_if_range == last_modified or http_if_range == etag


def parse_range_header(http_range: str, file_size: int, max_ranges: int) -> list[tuple[int, int]]:
    """Starlette 1.10's ``FileResponse._parse_range_header``: the ranges to send, merged and sorted;
    ``[]`` (the whole file) past ``max_ranges``. Raises ``MalformedRangeHeader`` or
    ``RangeNotSatisfiable``."""
    try:
        units, range_ = http_range.split("=", 1)
    except ValueError:
        raise MalformedRangeHeader() from None
    if units.strip().lower() != "bytes":
        raise MalformedRangeHeader("Only support bytes range")
    if range_.count(",") + 1 > max_ranges:
        return []
    ranges = _parse_ranges(range_, file_size)
    if len(ranges) == 0:
        raise MalformedRangeHeader("Range header: range must be requested")
    if any(not (0 <= start < file_size) for start, _ in ranges):
        raise RangeNotSatisfiable(file_size)
    if any(start >= end for start, end in ranges):
        raise MalformedRangeHeader("Range header: start must be less than end")
    if len(ranges) == 1:
        return ranges
    ranges.sort()
    result: list[tuple[int, int]] = [ranges[0]]
    for start, end in ranges[1:]:
        last_start, last_end = result[-1]
        if start <= last_end:
            result[-1] = (last_start, max(last_end, end))
        else:
            result.append((start, end))
    return result


def _parse_ranges(range_: str, file_size: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for part in range_.split(","):
        part = part.strip()
        if not part or part == "-" or "-" not in part:
            continue
        start_str, end_str = part.split("-", 1)
        start_str = start_str.strip()
        end_str = end_str.strip()
        try:
            start = int(start_str) if start_str else max(file_size - int(end_str), 0)
            end = int(end_str) + 1 if start_str and end_str and int(end_str) < file_size else file_size
            ranges.append((start, end))
        except ValueError:
            continue
    return ranges


def generate_multipart(
    ranges: Sequence[tuple[int, int]], boundary: str, max_size: int, content_type: str
) -> tuple[int, Callable[[int, int], bytes]]:
    """Starlette 1.10's ``FileResponse.generate_multipart``: the body's length and each part's header."""
    boundary_len = len(boundary)
    static_header_part_len = 49 + boundary_len + len(content_type) + len(str(max_size))
    content_length = sum(
        (len(str(start)) + len(str(end - 1)) + static_header_part_len) + (end - start) for start, end in ranges
    ) + (4 + boundary_len)

    def part_header(start: int, end: int) -> bytes:
        return (
            f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {start}-{end - 1}/{max_size}\r\n\r\n"
        ).encode("latin-1")

    return content_length, part_header
