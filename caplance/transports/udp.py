"""``udp``: the whole inner IP packet is the payload of one UDP datagram.

The original Go Caplance's choice: no header of our own, any host can receive it with a plain
UDP socket. It needs the Caplance agent on the backend to inject the inner packet. Overhead:
28 bytes over IPv4 (IP 20 + UDP 8), 48 over IPv6. Default port 7001.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final

from caplance.encapsulation import OUTER_IP, flow_source_port, udp_decapsulate, udp_encapsulate
from caplance.netops import IPAddress, NetOps
from caplance.sockets import SocketSource, allow_fragmentation, family_of, open_socket

__all__ = ["DEFAULT_PORT", "UdpTransport", "SocketSender", "DatagramReceiver"]

DEFAULT_PORT: Final = 7001
#: datagrams from refused sources skipped in one receive before yielding to other tasks
REFUSALS_PER_CALL: Final = 64


class SocketSender:
    """A sender over one connected, non-blocking socket; ``frame`` turns (packet, key) into
    the bytes the socket sends (None: the packet as it is)."""

    def __init__(self, sock: socket.socket, frame: Callable[[bytes, bytes], bytes] | None = None) -> None:
        self._sock = sock
        send = sock.send
        if frame is None:
            self.send: Callable[[bytes, bytes], object] = lambda packet, key: send(packet)
        else:
            self.send = lambda packet, key: send(frame(packet, key))

    def close(self) -> None:
        self._sock.close()


class DatagramReceiver(SocketSource):
    """The agent's side of a UDP-based transport: one inner packet per datagram, after
    ``unwrap`` (which raises ``MalformedPacket`` for junk; counted in ``malformed``).

    With ``allowed`` sources, datagrams from any other address are dropped (counted in
    ``refused``): only the balancers may put packets into this host's stack.
    """

    def __init__(self, sock: socket.socket, allowed: frozenset[str],
                 unwrap: Callable[[bytes], bytes] | None = None) -> None:
        super().__init__(sock)
        self.refused = 0
        recvfrom = sock.recvfrom
        if not allowed and unwrap is None:
            return  # the plain socket recv: no Python frame per packet

        def receive_nowait() -> bytes:
            for _ in range(REFUSALS_PER_CALL):
                data, source = recvfrom(65535)
                if allowed and source[0] not in allowed:
                    self.refused += 1
                    continue
                return data if unwrap is None else unwrap(data)
            raise BlockingIOError  # a flood from elsewhere: let the other tasks run

        self.receive_nowait = receive_nowait


class UdpTransport:
    """Transport ``udp``. Option ``port``: the agents' UDP port (default 7001)."""

    name = "udp"

    def __init__(self, *, port: int = DEFAULT_PORT, allowed_sources: frozenset[str] = frozenset()) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{self.name}: port must be an int from 1 to 65535, got {port!r}")
        self.port = port
        self.allowed_sources = allowed_sources

    def overhead(self, outer_version: int) -> int:
        return OUTER_IP[outer_version] + 8

    def encapsulate(self, packet: bytes, key: bytes) -> bytes:
        return udp_encapsulate(packet, flow_source_port(key), self.port)

    def decapsulate(self, data: bytes) -> bytes:
        return udp_decapsulate(data)

    def open_sender(self, backend: IPAddress) -> SocketSender:
        sock = open_socket(family_of(backend), socket.SOCK_DGRAM, what="UDP transport socket",
                           connect=(str(backend), self.port))
        allow_fragmentation(sock)
        return SocketSender(sock)

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> DatagramReceiver:
        sock = open_socket(family_of(bind), socket.SOCK_DGRAM, what="UDP transport receiver",
                           bind=(str(bind), self.port))
        netops.push_undo(f"close UDP receiver {bind}:{self.port}", sock.close)
        return DatagramReceiver(sock, self.allowed_sources)
