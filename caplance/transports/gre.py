"""GRE (RFC 2784): ``gre-raw`` from user space, and ``gre`` through a kernel GRE device.

Both put the same packets on the wire: outer IP (protocol 47), a 4-byte GRE header whose
protocol type says IPv4 (0x0800) or IPv6 (0x86DD), the inner packet. Overhead: 24 bytes over
IPv4, 44 over IPv6.

* ``gre-raw`` writes the GRE header on a raw IP socket (protocol 47): it works without the
  ``ip_gre`` kernel module on the balancer.
* ``gre`` creates one kernel GRE device per backend over netlink (pyroute2), remote = the
  backend, and sends the inner packets into it through a packet socket; the devices are
  removed on stop. On a kernel without ``ip_gre`` creating the device fails with a
  :class:`~caplance.errors.NetOpsError` that names the module and suggests ``gre-raw``.

On the backend the agent receives GRE on a raw socket (protocol 47) for both, strips the
outer headers and injects the inner packet -- or the backend's own kernel GRE device takes
it (``ip link add gre0 type gre remote BALANCER local BACKEND``, VIP on ``lo``, no agent
in the packet path).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable

from caplance.bpf import reject_all
from caplance.encapsulation import OUTER_IP, gre_decapsulate, gre_encapsulate, strip_outer_ipv4
from caplance.errors import NetOpsError
from caplance.netops import IPAddress, NetOps
from caplance.sockets import (
    SocketSource,
    allow_fragmentation,
    attach_filter,
    family_of,
    open_socket,
)
from caplance.transports.udp import REFUSALS_PER_CALL, SocketSender

__all__ = ["GreRawTransport", "GreTransport", "GreReceiver", "kernel_gre_available"]

_IPPROTO_GRE = 47
_ETH_P = {4: 0x0800, 6: 0x86DD}


class GreReceiver(SocketSource):
    """The agent's side of both GRE transports: a raw socket for protocol 47.

    IPv4 raw sockets show the outer header (its source is checked against ``allowed``);
    IPv6 ones start at the GRE header (the source comes from ``recvfrom``). Junk raises
    ``MalformedPacket`` for the agent to count.
    """

    def __init__(self, sock: socket.socket, allowed: frozenset[str]) -> None:
        super().__init__(sock)
        self.refused = 0
        allowed_packed = frozenset(socket.inet_pton(sock.family, a) for a in allowed if
                                   (":" in a) == (sock.family == socket.AF_INET6))
        recvfrom = sock.recvfrom

        if sock.family == socket.AF_INET:
            recv = sock.recv

            def receive_nowait() -> bytes:
                for _ in range(REFUSALS_PER_CALL):
                    source, payload = strip_outer_ipv4(recv(65535))
                    if allowed and source not in allowed_packed:
                        self.refused += 1
                        continue
                    return gre_decapsulate(payload)
                raise BlockingIOError  # a flood from elsewhere: let the other tasks run
        else:
            def receive_nowait() -> bytes:
                for _ in range(REFUSALS_PER_CALL):
                    payload, address = recvfrom(65535)
                    if allowed and socket.inet_pton(socket.AF_INET6, address[0].split("%")[0]) not in allowed_packed:
                        self.refused += 1
                        continue
                    return gre_decapsulate(payload)
                raise BlockingIOError

        self.receive_nowait = receive_nowait


class _GreBase:
    name = "gre-raw"

    def __init__(self, *, allowed_sources: frozenset[str] = frozenset()) -> None:
        self.allowed_sources = allowed_sources

    def overhead(self, outer_version: int) -> int:
        return OUTER_IP[outer_version] + 4

    def encapsulate(self, packet: bytes, key: bytes) -> bytes:
        return gre_encapsulate(packet)

    def decapsulate(self, data: bytes) -> bytes:
        return gre_decapsulate(data)

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> GreReceiver:
        sock = open_socket(family_of(bind), socket.SOCK_RAW, _IPPROTO_GRE, what="GRE receiver raw socket")
        if not bind.is_unspecified:
            sock.bind((str(bind), 0))
        netops.push_undo(f"close GRE receiver {bind}", sock.close)
        return GreReceiver(sock, self.allowed_sources)


class GreRawTransport(_GreBase):
    """Transport ``gre-raw``: GRE headers written from user space (no options)."""

    name = "gre-raw"

    def open_sender(self, backend: IPAddress) -> SocketSender:
        sock = open_socket(family_of(backend), socket.SOCK_RAW, _IPPROTO_GRE,
                           what="GRE transport raw socket", connect=(str(backend), 0))
        attach_filter(sock, reject_all())  # send only: no copies of incoming GRE
        allow_fragmentation(sock)
        return SocketSender(sock, lambda packet, key: gre_encapsulate(packet))


class KernelGreSender:
    """A kernel GRE device to one backend (made through a :class:`NetOps` of its own, so
    :meth:`close` undoes it like any host change) and a packet socket that feeds it."""

    def __init__(self, backend: IPAddress) -> None:
        self.ifname = f"clgre{secrets.token_hex(4)}"
        self._netops = NetOps()
        try:
            self._netops.create_gre(self.ifname, remote=backend)
            sock = open_socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0, what="GRE device packet socket")
            self._netops.push_undo(f"close the packet socket of {self.ifname}", sock.close)
        except Exception:
            self.close()
            raise
        sendto = sock.sendto
        targets = {4: (self.ifname, _ETH_P[4]), 6: (self.ifname, _ETH_P[6])}
        self.send: Callable[[bytes, bytes], object] = lambda packet, key: sendto(packet, targets[packet[0] >> 4])

    def close(self) -> None:
        self._netops.undo_all()


class GreTransport(_GreBase):
    """Transport ``gre``: one kernel GRE device per backend (needs ``ip_gre``)."""

    name = "gre"

    def open_sender(self, backend: IPAddress) -> KernelGreSender:
        return KernelGreSender(backend)


def kernel_gre_available() -> tuple[bool, str]:
    """Whether this kernel can create GRE devices, and why not: tries one in the current
    network namespace and removes it again."""
    netops = NetOps()
    try:
        netops.create_gre(f"clprobe{secrets.token_hex(3)}", remote=ipaddress.ip_address("192.0.2.1"),
                          local=ipaddress.ip_address("192.0.2.2"))
    except NetOpsError as exc:
        return False, f"this kernel cannot create GRE devices ({exc})"
    finally:
        netops.undo_all()
    return True, ""
