"""Messages between a balancer and its own child processes (selector builds, data-plane
workers): a 4-byte big-endian length, then a pickle.

Only for pipes between processes of one balancer, which trust each other; never for a
socket anyone else can reach (pickles run code when loaded).
"""

from __future__ import annotations

import pickle
import struct
from typing import IO, Any

import trio

__all__ = ["Channel", "encode", "read_message", "write_message"]

_LENGTH = struct.Struct("!I")
_CHUNK = 1 << 20


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class Channel:
    """Framed messages over a pair of trio streams (a child's stdout and stdin, or our own
    fds 0 and 1 in the child)."""

    def __init__(self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream) -> None:
        self._receive = receive
        self._send = send
        self._buffer = bytearray()
        self._lock = trio.Lock()

    async def send(self, message: Any) -> None:
        """Send one message; concurrent senders take turns. Raises ``trio.BrokenResourceError``
        when the other side has gone."""
        data = encode(message)
        async with self._lock:
            await self._send.send_all(data)

    async def receive(self) -> Any:
        """The next message. Raises ``EOFError`` when the other side closed its end."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer)
                end = _LENGTH.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[_LENGTH.size:end])
                    del self._buffer[:end]
                    return pickle.loads(body)
            chunk = await self._receive.receive_some(_CHUNK)
            if not chunk:
                raise EOFError("the other process closed the pipe")
            self._buffer += chunk


def read_message(stream: IO[bytes]) -> Any:
    """Blocking read of one message from a binary file; ``EOFError`` at its end."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("end of input")
    (length,) = _LENGTH.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("input ended inside a message")
    return pickle.loads(body)


def write_message(stream: IO[bytes], message: Any) -> None:
    """Blocking write of one message to a binary file, flushed."""
    stream.write(encode(message))
    stream.flush()
