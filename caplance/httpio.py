"""HTTP/1.1 over trio streams, through h11: one request from a client, a loop of requests for a
server. h11 parses and frames (chunked bodies, ``Content-Length``, keep-alive, HEAD,
``Expect: 100-continue``, HTTP/1.0 peers); this module only moves its bytes and bounds what a
peer can make us hold or wait for: a head larger than its bound is refused however the bytes
arrive, a body larger than ``max_body`` before it is read, and every request on a server has one
deadline for reading it, answering it and sending the answer.

The balancer's HTTP health checks, the metrics server and the lab's small servers and client
all go through here, so there is one HTTP implementation, not one per caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import cast

import attrs
import h11
import trio

from caplance.errors import CaplanceError

__all__ = ["HttpError", "Reply", "Request", "Response", "request", "serve_connection"]

log = logging.getLogger(__name__)
#: the most a request's head (request line and headers) may take on our servers
MAX_HEAD = 8192
#: the most a reply's head may take: a backend's health page is not ours to keep small
MAX_REPLY_HEAD = 65536
#: requests one connection may make before the server closes it (each renders, say, /metrics)
MAX_REQUESTS = 100
_CHUNK = 65536


class HttpError(CaplanceError):
    """The peer broke the protocol, sent more than allowed, or closed too early."""


@attrs.frozen
class Reply:
    """What a server answered: the status, its headers (names lower-case, as h11 gives them),
    and the body (empty when it was not read)."""

    status: int
    headers: Sequence[tuple[bytes, bytes]] = ()
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), None if absent."""
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class Request:
    """What a client asked: method and target as sent (bytes, as h11 gives them), and the body."""

    method: bytes
    target: bytes
    body: bytes = b""

    @property
    def path(self) -> bytes:
        """The target without its query string."""
        return self.target.partition(b"?")[0]


@attrs.frozen
class Response:
    """What a server's handler answers with."""

    status: int
    body: bytes = b""
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: Sequence[tuple[bytes, bytes]] = ()


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, *, head_limit: int,
                      closed_early: str | None = None) -> h11.Event | type[h11.PAUSED]:
    """The next event, reading from ``stream`` as h11 needs more bytes. While a head is
    incomplete, no more than ``head_limit`` + 1 bytes are buffered, so a head over the limit is
    refused (by h11) whether it came in one piece or many. The end of the stream is h11's to
    judge (it ends an HTTP/1.0 body), or an :class:`HttpError` saying ``closed_early`` if given."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        buffered = len(conn.trailing_data[0])
        size = max(1, head_limit + 1 - buffered) if _in_head(conn) else _CHUNK
        data = bytes(await stream.receive_some(size))
        if not data and closed_early:
            raise HttpError(closed_early)
        conn.receive_data(data)
    return cast("h11.Event | type[h11.PAUSED]", event)  # mypy cannot narrow on ``is`` a class


def _in_head(conn: h11.Connection) -> bool:
    """Whether the peer's next bytes are a head (not a body)."""
    return conn.their_state is (h11.SEND_RESPONSE if conn.our_role is h11.CLIENT else h11.IDLE)


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, max_body: int) -> bytes:
    """Read a message's body up to its end; :class:`HttpError` past ``max_body`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream, head_limit=0)
        if isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        if not isinstance(event, h11.Data):
            raise HttpError(f"unexpected {type(event).__name__} in a body")
        size += len(event.data)
        if size > max_body:
            raise HttpError(f"body longer than {max_body} bytes")
        parts.append(event.data)


async def request(stream: trio.abc.Stream, method: str, target: str, *, host: str, port: int | None = None,
                  body: bytes = b"", read_body: bool = True, max_body: int = 16 * 1024 * 1024) -> Reply:
    """Send one request on ``stream`` (``Connection: close``; ``Host`` is ``host``, with
    ``port`` if given) and read the reply: its status and headers, and its body unless
    ``read_body`` is false (then only the head is read: enough for a health check, however big
    the page). Raises :class:`HttpError` for a reply that breaks the protocol, has a head over
    :data:`MAX_REPLY_HEAD` or a body over ``max_body``, or ends early, and whatever the stream
    raises (``BrokenResourceError``, ``OSError``). No timeout of its own: callers bound it, and
    cancelling it leaves ``stream`` for the caller to close."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REPLY_HEAD)
    name = f"[{host}]" if ":" in host else host
    headers = [("Host", name if port is None else f"{name}:{port}"), ("User-Agent", "caplance"),
               ("Connection", "close")]
    if body or method not in ("GET", "HEAD"):
        headers.append(("Content-Length", str(len(body))))
    try:
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        await stream.send_all(_encode(conn, *events, h11.EndOfMessage()))
        while True:
            event = await _next_event(conn, stream, head_limit=MAX_REPLY_HEAD,
                                      closed_early="closed before the reply's head ended")
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):  # a 100 Continue: wait on
                raise HttpError(f"unexpected {type(event).__name__} before the reply")
        got = tuple((key, value) for key, value in event.headers)
        if not read_body:
            return Reply(event.status_code, got)
        return Reply(event.status_code, got, await _read_body(conn, stream, max_body))
    except h11.ProtocolError as exc:
        raise HttpError(f"bad reply: {exc}") from exc


Handler = Callable[[Request], Awaitable[Response]]


async def serve_connection(stream: trio.abc.Stream, handle: Handler, *, timeout: float,
                           max_body: int = 0, keep_alive: bool = True) -> None:
    """Answer the requests on one connection with ``handle`` until the client closes it, after
    :data:`MAX_REQUESTS` of them, or after the first one without ``keep_alive``. Each request
    has ``timeout`` seconds from its first byte awaited to its answer sent -- reading it,
    ``handle`` and sending -- else the connection is closed (a client that sends slowly, or
    never reads, holds nothing for long); a connection idle that long is closed too. A request
    that breaks the protocol gets a 400 (431 for a head over :data:`MAX_HEAD`), one with more
    than ``max_body`` bytes of body a 413 before the body is read, one whose handler raises a
    500 (logged with the traceback); then the connection is closed. Never raises for what the
    client does; closes ``stream``; cancelled, it closes the connection and raises."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    async with stream:
        try:
            for number in range(1, MAX_REQUESTS + 1):
                with trio.move_on_after(timeout):
                    if not await _one_request(conn, stream, handle, max_body,
                                              keep_alive and number < MAX_REQUESTS):
                        return
                    conn.start_next_cycle()
                    continue
                return  # the deadline passed
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.RemoteProtocolError):
            return


async def _one_request(conn: h11.Connection, stream: trio.abc.Stream, handle: Handler, max_body: int,
                       keep_alive: bool) -> bool:
    """Read, answer and send one request; whether the connection goes on."""
    asked = await _read_request(conn, stream, max_body)
    if asked is None:
        return False
    if isinstance(asked, Response):
        await _send(conn, stream, asked, close=True, head_only=False)
        await _linger(stream)
        return False
    try:
        answer = await handle(asked)
    except Exception:
        log.warning("HTTP handler failed", exc_info=True,
                    extra={"target": asked.target.decode(errors="replace")})
        answer, keep_alive = Response(500, b"internal error\n"), False
    try:
        await _send(conn, stream, answer, close=not keep_alive, head_only=asked.method == b"HEAD")
    except h11.LocalProtocolError:  # the handler's answer is not one HTTP allows
        log.warning("HTTP handler answered what HTTP does not allow", exc_info=True,
                    extra={"target": asked.target.decode(errors="replace"), "status": answer.status})
        return False
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE  # else one of us asked to close


#: what a refused client may still send, read and dropped, before we close (see :func:`_linger`)
_LINGER_BYTES = 1024 * 1024
_LINGER_SECONDS = 1.0


async def _linger(stream: trio.abc.Stream) -> None:
    """Close our side and read what the client still sends, for a moment: closing a socket
    with unread bytes makes the kernel send a reset, which can destroy the refusal we just
    sent before the client reads it."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    read = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while read < _LINGER_BYTES and (chunk := await stream.receive_some(_CHUNK)):
            read += len(chunk)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream,
                        max_body: int) -> Request | Response | None:
    """The next request whole; a :class:`Response` to send back if it is bad; None when the
    client closed between requests (or broke the protocol past answering)."""
    try:
        event = await _next_event(conn, stream, head_limit=MAX_HEAD)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return Response(400, b"bad request\n")
        declared = dict(event.headers).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > max_body:
            return Response(413, b"request body too large\n")  # refused before it is read
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(_encode(conn, h11.InformationalResponse(status_code=100, headers=[])))
        try:
            body = await _read_body(conn, stream, max_body)
        except HttpError:  # a chunked body over max_body
            return Response(413, b"request body too large\n")
        return Request(event.method, event.target, body)
    except h11.RemoteProtocolError as exc:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return None  # h11 can no longer say anything on this connection
        return Response(exc.error_status_hint, b"bad request\n")


async def _send(conn: h11.Connection, stream: trio.abc.Stream, answer: Response, *, close: bool,
                head_only: bool) -> None:
    """Send ``answer``; its body only if the request was not a HEAD (whose reply carries the
    length, not the bytes)."""
    headers = [(b"Content-Type", answer.content_type), (b"Content-Length", b"%d" % len(answer.body)),
               *answer.headers]
    if close:
        headers.append((b"Connection", b"close"))
    try:
        reason = HTTPStatus(answer.status).phrase.encode()
    except ValueError:
        reason = b""
    events: list[h11.Event] = [h11.Response(status_code=answer.status, headers=headers, reason=reason)]
    if answer.body and not head_only:
        events.append(h11.Data(data=answer.body))
    await stream.send_all(_encode(conn, *events, h11.EndOfMessage()))


def _encode(conn: h11.Connection, *events: h11.Event) -> bytes:
    """The bytes for ``events`` in turn."""
    return b"".join(conn.send(event) or b"" for event in events)
