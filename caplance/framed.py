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
        #: the seal on this session's frames, once sealed
        self.sealing: codec.Seal | None = None

    def seal(self, key: bytes, side: str, *, early_refusal: bool = False) -> None:
        """Seal every frame from now on, both ways (see :class:`codec.Seal`)."""
        self.sealing = codec.Seal(key, side, early_refusal=early_refusal)

    async def send(self, msg: dict[str, Any]) -> None:
        if self.sealing is not None:
            msg = self.sealing.seal(msg)
        await self.stream.send_all(codec.encode(msg, self._max_frame))

    async def receive(self) -> dict[str, Any]:
        """The next message. Raises :class:`codec.ProtocolError` on bad input (a bad seal, or
        the connection closed mid-frame: ``truncated``) and ``trio.BrokenResourceError`` when
        the peer closes."""
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                if self._decoder.pending:
                    raise codec.ProtocolError("truncated", f"closed with {self._decoder.pending} bytes of a frame")
                raise trio.BrokenResourceError("connection closed by peer")
            self._ready.extend(self._decoder.feed(data))
        msg = self._ready.pop(0)
        return msg if self.sealing is None else self.sealing.open(msg)

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
