"""HTTP/1.1 over trio streams, through h11: one request from a client, a loop of requests for a
server. h11 parses and frames (chunked bodies, ``Content-Length``, keep-alive, HEAD, HTTP/1.0
peers); this module only moves its bytes and bounds what a peer can make us hold.

The balancer's HTTP health checks, the metrics server and the lab's small servers and client
all go through here, so there is one HTTP implementation, not one per caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import attrs
import h11
import trio

__all__ = ["HttpError", "Reply", "Request", "Response", "request", "serve_connection"]

log = logging.getLogger(__name__)
#: the most a request or reply head (request line or status line, and headers) may take
MAX_HEAD = 8192
_CHUNK = 65536


class HttpError(Exception):
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


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, *,
                      closed_early: str | None = None) -> h11.Event | type[h11.PAUSED]:
    """The next event, reading from ``stream`` as h11 needs more bytes. The end of the stream
    is h11's to judge (it ends an HTTP/1.0 body), or an :class:`HttpError` saying
    ``closed_early`` if given."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        data = bytes(await stream.receive_some(_CHUNK))
        if not data and closed_early:
            raise HttpError(closed_early)
        conn.receive_data(data)
    return cast("h11.Event | type[h11.PAUSED]", event)  # mypy cannot narrow on ``is`` a class


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, max_body: int) -> bytes:
    """Read a message's body up to its end; :class:`HttpError` past ``max_body`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        if not isinstance(event, h11.Data):
            raise HttpError(f"unexpected {type(event).__name__} in a body")
        size += len(event.data)
        if size > max_body:
            raise HttpError(f"body longer than {max_body} bytes")
        parts.append(event.data)


async def request(stream: trio.abc.Stream, method: str, target: str, *, host: str,
                  body: bytes = b"", read_body: bool = True, max_body: int = 16 * 1024 * 1024) -> Reply:
    """Send one request on ``stream`` (``Connection: close``) and read the reply: its status,
    and its body unless ``read_body`` is false (then only the head is read: enough for a health
    check, however big the page). Raises :class:`HttpError` for a reply that breaks the
    protocol, is longer than ``max_body`` or ends early, and whatever the stream raises
    (``BrokenResourceError``, ``OSError``). No timeout of its own: callers bound it."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    name = f"[{host}]" if ":" in host else host
    headers = [("Host", name), ("User-Agent", "caplance"), ("Connection", "close")]
    if body or method not in ("GET", "HEAD"):
        headers.append(("Content-Length", str(len(body))))
    try:
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        await stream.send_all(_encode(conn, *events, h11.EndOfMessage()))
        while True:
            event = await _next_event(conn, stream, closed_early="closed before the reply's head ended")
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
    """Answer the requests on one connection with ``handle`` until the client closes it (or
    after the first one, without ``keep_alive``); each request must arrive whole within
    ``timeout`` seconds. A request that breaks the protocol or carries more than ``max_body``
    bytes gets a 400 (or 413), one whose handler raises gets a 500 (logged), and the connection
    is closed. Never raises for what the client does; closes ``stream``."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    async with stream:
        try:
            while True:
                asked: Request | Response | None = None
                with trio.move_on_after(timeout):
                    asked = await _read_request(conn, stream, max_body)
                if asked is None or isinstance(asked, Response):
                    if asked is not None:
                        await _send(conn, stream, asked, close=True, head_only=False)
                    return
                try:
                    answer = await handle(asked)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop a server
                    log.warning("HTTP handler failed", extra={"target": asked.target.decode(errors="replace"),
                                                              "error": repr(exc)})
                    answer, keep_alive = Response(500, b"internal error\n"), False
                await _send(conn, stream, answer, close=not keep_alive, head_only=asked.method == b"HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # one of us asked to close
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            return


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream,
                        max_body: int) -> Request | Response | None:
    """The next request whole; a :class:`Response` to send back if it is bad; None when the
    client closed (or timed out) between requests."""
    try:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            return Response(400, b"bad request\n")
        try:
            body = await _read_body(conn, stream, max_body)
        except HttpError:
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
    events: list[h11.Event] = [h11.Response(status_code=answer.status, headers=headers)]
    if answer.body and not head_only:
        events.append(h11.Data(data=answer.body))
    await stream.send_all(_encode(conn, *events, h11.EndOfMessage()))


def _encode(conn: h11.Connection, *events: h11.Event) -> bytes:
    """The bytes for ``events`` in turn."""
    return b"".join(conn.send(event) or b"" for event in events)
