"""A tiny HTTP server that answers with its name, and a client that counts who answered."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from caplance.httpio import HttpError, Request, Response, request, serve_connection

__all__ = ["KEPT_FAILURES", "Attempt", "FetchResult", "fetch_many", "format_served", "serve_name"]

_MAX_BODY = 16 * 1024 * 1024


async def _serve_tcp(handle: Callable[[trio.SocketStream], Awaitable[None]], port: int,
                     task_status: trio.TaskStatus[None]) -> None:
    """Serve ``handle`` on ``port`` (every address); started once listening."""
    listeners = await trio.open_tcp_listeners(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


async def serve_name(name: str, *, port: int = 80,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every HTTP request on ``port`` (all addresses, IPv4 and IPv6) with ``name``,
    reading a POST's body whole first."""
    answer = Response(200, name.encode())

    async def respond(_: Request) -> Response:
        return answer

    await _serve_tcp(functools.partial(serve_connection, handle=respond, timeout=10, max_body=_MAX_BODY),
                     port, task_status)


@attrs.frozen
class Attempt:
    """One request: the client's source port, who answered (None on failure), the error, and
    the source address when the request picked one."""

    source_port: int
    served_by: str | None
    error: str | None = None
    source: str | None = None


#: how many failures a :class:`FetchResult` keeps the text of (it counts all of them)
KEPT_FAILURES = 100


@attrs.define
class FetchResult:
    """What :func:`fetch_many` saw, added up as the requests finish, so its size does not grow
    with their number: requests served per backend name, the number that failed, the text of
    the first :data:`KEPT_FAILURES` failures -- and every :class:`Attempt` only with
    ``keep=True`` (empty otherwise)."""

    keep: bool = False
    served: dict[str, int] = attrs.field(factory=dict)
    failed: int = 0
    failures: list[str] = attrs.field(factory=list)
    attempts: list[Attempt] = attrs.field(factory=list)

    def add(self, attempt: Attempt) -> None:
        """Count one finished request."""
        if attempt.served_by is not None:
            self.served[attempt.served_by] = self.served.get(attempt.served_by, 0) + 1
        else:
            self.failed += 1
            if len(self.failures) < KEPT_FAILURES:
                self.failures.append(f"port {attempt.source_port}: {attempt.error}")
        if self.keep:
            self.attempts.append(attempt)

    @property
    def requests(self) -> int:
        """Requests finished: served and failed."""
        return sum(self.served.values()) + self.failed


async def _bound_socket(host: str, kind: int, port: int = 0, address: str | None = None) -> trio.socket.SocketType:
    """A socket for talking to ``host``, bound to ``port`` (0: an ephemeral one) and
    ``address`` (None: any) first, so its source port is known even if the connection never
    opens."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, kind)
    try:
        await sock.bind((address or ("::" if family == trio.socket.AF_INET6 else "0.0.0.0"), port))
    except OSError:
        sock.close()
        raise
    return sock


async def _fetch_once(host: str, port: int, timeout: float, body: int = 0, source: str | None = None) -> Attempt:
    sock = await _bound_socket(host, trio.socket.SOCK_STREAM, address=source)
    source_port = sock.getsockname()[1]
    try:
        with trio.fail_after(timeout):
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            async with stream:
                reply = await request(stream, "POST" if body else "GET", "/", host=host, body=b"x" * body)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, HttpError) as exc:
        return Attempt(source_port, None, repr(exc), source)
    finally:
        sock.close()
    if reply.status != 200:
        return Attempt(source_port, None, f"unexpected reply: status {reply.status}", source)
    return Attempt(source_port, reply.body.decode(errors="replace"), None, source)


async def fetch_many(host: str, *, count: int, port: int = 80, concurrency: int = 16,
                     timeout: float = 5.0, rate: float | None = None, body: int = 0,
                     sources: Sequence[str] = (), keep: bool = False) -> FetchResult:
    """Make ``count`` HTTP requests to ``host``, each on a new TCP connection (so each from a
    new ephemeral source port), ``concurrency`` at a time, starting at most ``rate`` per
    second if given; with ``body`` bytes, as POSTs; from the ``sources`` addresses in turn,
    if given. Never raises for a failed request: each is counted in the :class:`FetchResult`
    (and kept as an :class:`Attempt` with ``keep=True``).

    ``concurrency`` tasks take the requests' numbers in turn, so memory stays the same
    whatever ``count`` is. Cancelled, it cancels the requests in flight and raises."""
    result = FetchResult(keep=keep)
    numbers = iter(range(count))
    next_start = trio.current_time()

    async def worker() -> None:
        nonlocal next_start
        for number in numbers:  # shared: each number goes to one worker
            if rate:  # reserve the next start slot (no checkpoint between reading and writing it)
                start = max(next_start, trio.current_time())
                next_start = start + 1 / rate
                await trio.sleep_until(start)
            result.add(await _fetch_once(host, port, timeout, body,
                                         sources[number % len(sources)] if sources else None))

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, min(concurrency, count))):
            nursery.start_soon(worker)
    return result


def format_served(served: dict[str, int], names: Sequence[str]) -> str:
    """The demo's last line: ``served: be1=N be2=N be3=N``."""
    return "served: " + " ".join(f"{name}={served.get(name, 0)}" for name in names)


# -- long-lived streams (connection tracking tests) ----------------------------------------


async def serve_echo(name: str, *, port: int = 8080,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """On each TCP connection: send ``name`` and a newline, then echo every byte back."""
    async def handle(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(name.encode() + b"\n")
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    await _serve_tcp(handle, port, task_status)


@attrs.frozen
class Stream:
    """One long-lived connection: who served it, how many chunks came back intact."""

    source_port: int
    served_by: str | None
    chunks: int
    error: str | None


async def read_greeting(stream: trio.SocketStream, timeout: float = 5) -> tuple[str, bytes]:
    """The echo server's first line (the backend's name) and what came after it."""
    buffered = b""
    with trio.fail_after(timeout):
        while b"\n" not in buffered:
            more = await stream.receive_some(4096)
            if not more:
                raise trio.BrokenResourceError("closed before the greeting")
            buffered += more
    greeting, _, buffered = buffered.partition(b"\n")
    return greeting.decode(errors="replace"), buffered


async def echo_chunk(stream: trio.SocketStream, buffered: bytes, index: int, number: int, *,
                     timeout: float) -> bytes:
    """Send stream ``index``'s chunk ``number`` (64 bytes) and wait for its echo; what came
    after it. Raises ``BrokenResourceError`` (closed), ``TooSlowError`` or ``ValueError``
    (the echo came back changed or out of order)."""
    chunk = f"{index}:{number}:".encode().ljust(64, b".")
    await stream.send_all(chunk)
    with trio.fail_after(timeout):
        while len(buffered) < len(chunk):
            more = await stream.receive_some(4096)
            if not more:
                raise trio.BrokenResourceError("closed by the server")
            buffered += more
    if buffered[:len(chunk)] != chunk:
        raise ValueError(f"chunk {number} came back changed or out of order")
    return buffered[len(chunk):]


async def _one_stream(host: str, port: int, seconds: float, interval: float, index: int) -> Stream:
    sock = await _bound_socket(host, trio.socket.SOCK_STREAM)
    source_port, served_by, chunks = sock.getsockname()[1], None, 0
    try:
        with trio.fail_after(5):
            await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        served_by, buffered = await read_greeting(stream)
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            buffered = await echo_chunk(stream, buffered, index, chunks, timeout=3)
            chunks += 1
            await trio.sleep(interval)
        await stream.aclose()
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as exc:
        return Stream(source_port, served_by, chunks, repr(exc))
    finally:
        sock.close()
    return Stream(source_port, served_by, chunks, None)


async def hold_streams(host: str, *, count: int, port: int = 8080, seconds: float = 10.0,
                       interval: float = 0.1) -> list[Stream]:
    """Open ``count`` connections and exchange a 64-byte chunk on each every ``interval``
    seconds for ``seconds``, checking every echo arrives complete and in order."""
    streams: list[Stream] = []

    async def run(index: int) -> None:
        streams.append(await _one_stream(host, port, seconds, interval, index))

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(run, index)
    return streams


# -- UDP: who answers a given flow (balancer agreement tests) ------------------------------


async def serve_udp_name(name: str, address: str, *, port: int = 9999,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every UDP datagram to ``address:port`` with ``name`` (from that address)."""
    family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((address, port))
        task_status.started()
        while True:
            _, peer = await sock.recvfrom(2048)
            await sock.sendto(name.encode(), peer)


async def ask_udp(host: str, source_ports: Sequence[int], *, port: int = 9999,
                  timeout: float = 1.0, tries: int = 3) -> dict[int, str | None]:
    """From each source port, ask ``host:port`` who answers; port -> name (None: nobody)."""
    answers: dict[int, str | None] = {}
    for source in source_ports:
        with await _bound_socket(host, trio.socket.SOCK_DGRAM, source) as sock:
            answers[source] = None
            for _ in range(tries):
                await sock.sendto(b"who", (host, port))
                with trio.move_on_after(timeout):
                    data, _ = await sock.recvfrom(2048)
                    answers[source] = data.decode(errors="replace")
                    break
    return answers
