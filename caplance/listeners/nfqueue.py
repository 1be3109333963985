"""The ``nfqueue`` listener: whole packets from a netfilter queue, the original Go
Caplance's way of taking traffic without owning the address.

An ``NFQUEUE`` rule in the ``raw`` table's ``PREROUTING`` chain (a chain of our own; iptables
through ``iptables-nft``, because this kernel's nftables has no ``queue`` expression) hands
every packet for a VIP to the balancer before routing; the balancer copies it, answers
*drop* (it has sent its own encapsulated copy on) and forwards. The VIP is not a local
address, so the local stack never answers it; clients reach it by a route via the balancer.

The rule carries ``--queue-bypass``: while no process is bound to the queue (the balancer
stopped, crashed, or has not started yet) packets are not dropped but continue as if the rule
were not there -- routed by the balancer's table, to a fallback route an operator may keep
for the VIP (a plain route to one backend, say). Traffic keeps flowing, unbalanced, rather
than stopping.

Several workers bind queues ``queue``, ``queue + 1``, ... (``--queue-balance``); the kernel
picks one per packet by a hash of its addresses and protocol, so a flow -- and every flow of
one client address -- stays with one worker.

The binding is the maintained ``NetfilterQueue`` package (Cython over Debian's
``libnetfilter_queue``; ``pip install 'caplance[nfqueue]'``). It copies at most about 4 KB of a
packet; the kernel segments offloaded aggregates before queueing, so that fits links up to
that MTU. A longer packet would be cut: it is dropped and counted (``nfqueue_truncated``).
"""

from __future__ import annotations

import collections
import errno
import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from caplance.errors import CaplanceError
from caplance.netops import IPAddress, NetOps
from caplance.packet import ip_length

__all__ = ["NfqueueListener", "NfqueueSource"]

#: packets taken from the queue per receive before the forwarding loop sees them
_PER_READ = 64
_QUEUE_LENGTH = 4096


class _Bounded:
    """What the binding's ``run_socket`` reads from: the queue's socket, but "empty" after
    ``left`` packets, so one call never takes more than a batch (under load the queue would
    otherwise never run dry and the loop would starve)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(max(size, 65536 + 512))


class NfqueueSource:
    """Packets of one netfilter queue: each is copied and dropped from the queue at once."""

    def __init__(self, number: int) -> None:
        try:
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:
            raise CaplanceError("listener 'nfqueue' needs the NetfilterQueue package (pip install"
                                " 'caplance[nfqueue]'; it builds against Debian's libnetfilter-queue-dev)") from exc
        self.number = number
        #: drops before the forwarding loop sees a packet, by reason (the data plane adds them up)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._pending: collections.deque[bytes] = collections.deque()
        self._queue: Any = NetfilterQueue()
        try:
            self._queue.bind(number, self._take, max_len=_QUEUE_LENGTH, mode=COPY_PACKET)
        except OSError as exc:
            raise CaplanceError(f"cannot bind netfilter queue {number}: {exc} (needs root; is another"
                                " process bound to it?)") from exc
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, fileno=os.dup(self._queue.get_fd()))
        self._socket.setblocking(False)
        self._reader = _Bounded(self._socket)

    def _take(self, packet: Any) -> None:
        data = packet.get_payload()
        packet.drop()  # we forward our own copy
        if ip_length(data) > len(data):
            self.dropped["nfqueue_truncated"] += 1
            return
        self._pending.append(data)

    def receive_nowait(self) -> bytes:
        pending = self._pending
        if not pending:
            self._reader.left = _PER_READ
            self._queue.run_socket(self._reader)
            if not pending:
                raise BlockingIOError
        return pending.popleft()

    async def wait_readable(self) -> None:
        if not self._pending:
            await trio.lowlevel.wait_readable(self._socket)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.unbind()
            self._socket.close()
            self._queue = None


class NfqueueListener:
    """Listener ``nfqueue``: queues ``queue`` .. ``queue + workers - 1`` (default 0)."""

    name = "nfqueue"
    max_workers = 64

    def __init__(self, *, queue: int = 0) -> None:
        if isinstance(queue, bool) or not isinstance(queue, int) or not 0 <= queue <= 65535 - 64:
            raise ValueError(f"nfqueue: queue must be an int from 0 to 65471, got {queue!r}")
        self.queue = queue

    def attach(self, vips: Sequence[IPAddress], netops: NetOps, *, workers: int = 1) -> None:
        last = self.queue + workers - 1
        target = (f"NFQUEUE --queue-num {self.queue}" if workers == 1
                  else f"NFQUEUE --queue-balance {self.queue}:{last}") + " --queue-bypass"
        for version in (4, 6):
            mine = [vip for vip in vips if vip.version == version]
            if mine:
                netops.add_iptables_chain("raw", "PREROUTING", [f"-d {vip}/{vip.max_prefixlen} -j {target}"
                                                                for vip in mine], ipv6=version == 6)

    def open(self, worker: int, workers: int) -> list[NfqueueSource]:
        return [NfqueueSource(self.queue + worker)]
