"""The control codec over a trio stream, for both sides of the control channel and ctl.

The protocol itself (framing, messages, HMAC proofs) is the pure
:mod:`caplance.control_codec`; this moves its frames over a stream, so a hostile or stalled
peer costs one connection and nothing else.
"""

from __future__ import annotations

from typing import Any

import trio

from caplance import control_codec as codec
from caplance.errors import CaplanceError

__all__ = ["LOST", "FramedStream", "Refused", "session_error"]

#: what a vanished peer raises
LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Refused(CaplanceError):
    """The other side refused us (or failed to prove the secret)."""


class FramedStream:
    """Length-prefixed JSON messages over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = codec.MAX_FRAME) -> None:
        self.stream = stream
        self._max_frame = max_frame
        self._decoder = codec.FrameDecoder(max_frame)
        self._ready: list[dict[str, Any]] = []

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(codec.encode(msg, self._max_frame))

    async def receive(self) -> dict[str, Any]:
        """The next message. Raises :class:`codec.ProtocolError` on bad input and
        ``trio.BrokenResourceError`` when the peer closes."""
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("connection closed by peer")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next message, which must be of type ``kind`` (``refused`` raises :class:`Refused`)."""
        msg = await self.receive()
        if msg["type"] == "refused" and kind != "refused":
            raise Refused(msg["reason"])
        if msg["type"] != kind:
            raise codec.ProtocolError("unexpected_message", f"wanted {kind}, got {msg['type']}")
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


def session_error(raised: BaseException) -> Exception:
    """The one error that ended a session, out of any exception groups around it.

    Re-raises ``raised`` if it holds anything that is not an ``Exception`` (cancellation,
    KeyboardInterrupt): those must keep propagating. A session's boundary handles what this
    returns, so no peer can take the server down with it.
    """
    leaves: list[BaseException] = []
    pending = [raised]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    if not all(isinstance(leaf, Exception) for leaf in leaves):
        raise raised
    return leaves[0]  # type: ignore[return-value]
