"""A tiny HTTP server that answers with its name, and a client that counts who answered."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import attrs
import trio

__all__ = ["serve_name", "fetch_many", "FetchResult"]

_MAX_REQUEST = 8192


async def serve_name(name: str, *, port: int = 80,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every HTTP request on ``port`` (all addresses, IPv4 and IPv6) with ``name``."""
    body = name.encode()
    response = (
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
            await stream.send_all(response)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


@attrs.frozen
class FetchResult:
    served: dict[str, int]
    failures: list[str]

    @property
    def total(self) -> int:
        return sum(self.served.values()) + len(self.failures)


async def _fetch_once(host: str, port: int, timeout: float) -> str:
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise ValueError(f"unexpected reply {head[:40]!r}")
    return body.decode()


async def fetch_many(host: str, *, count: int, port: int = 80, concurrency: int = 16,
                     timeout: float = 5.0) -> FetchResult:
    """Make ``count`` HTTP requests to ``host``, each on a new TCP connection (so each from a
    new ephemeral source port), ``concurrency`` at a time. Counts bodies; records failures."""
    served: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    limit = trio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        async with limit:
            try:
                served[await _fetch_once(host, port, timeout)] += 1
            except (OSError, trio.TooSlowError, ValueError, trio.BrokenResourceError) as exc:
                failures.append(f"request {index}: {exc!r}")

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return FetchResult(served=dict(served), failures=failures)


def format_served(served: dict[str, int], names: Sequence[str]) -> str:
    """The demo's last line: ``served: be1=N be2=N be3=N``."""
    return "served: " + " ".join(f"{name}={served.get(name, 0)}" for name in names)
