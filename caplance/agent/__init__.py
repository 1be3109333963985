"""The backend agent's data path: receive encapsulated packets, check them, inject them.

The agent puts each VIP on ``lo`` and sets ``arp_ignore=1`` / ``arp_announce=2`` so this host
never answers ARP for a VIP (or clients would bypass the balancer). The inner packets it
injects are addressed to the VIP, so the local stack takes them as its own, and the replies
go from the VIP straight to the client: direct server return.

Injection methods:

* ``raw`` -- an ``IPPROTO_RAW`` socket per VIP, ``send(inner)``. The packet enters the
  stack as locally generated, loops back through ``lo`` and works with strict ``rp_filter``.
* ``tun`` -- written to a TUN device, the packet arrives as if from the wire on that device.
  Strict ``rp_filter`` drops it (the client is not routed via the TUN), and so does loose
  mode on a device without an IPv4 address (the kernel's ``fib_validate_source``). The agent
  therefore gives the device an address (``tun_address``, link-local by default) and sets
  loose mode (``rp_filter=2``) on it; the effective value is the larger of ``all`` and the
  device's, so it works whatever ``all`` is.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
import trio

from caplance import plugins
from caplance.agent.decap import KernelDecap, decap_unavailable
from caplance.agent.health import run_local_check
from caplance.agent.session import Registration
from caplance.config import AgentConfig
from caplance.control_codec import probe_token
from caplance.errors import CaplanceError, MalformedPacket
from caplance.interfaces import Transport
from caplance.netops import NetOps
from caplance.packet import destination, flow_key
from caplance.recovery import undo_dead_runs
from caplance.security import require_control_security
from caplance.sockets import family_of, open_socket, pump

__all__ = ["Agent", "AgentStats"]

log = logging.getLogger(__name__)

BATCH = 256
_NO_PORTS = b"\x00\x00\x00\x00"


@attrs.define
class AgentStats:
    received: int = 0
    injected: int = 0
    #: encapsulated packets from sources that are not our balancers
    refused_sources: int = 0
    dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def snapshot(self) -> dict[str, Any]:
        return {"received": self.received, "injected": self.injected,
                "refused_sources": self.refused_sources, "dropped": dict(self.dropped)}


class Agent:
    """One backend's agent. ``await nursery.start(agent.run)`` returns once the VIPs are on
    ``lo`` and the receiver is bound; with a balancer configured it then registers (and
    re-registers after any disconnection) and sends heartbeats. :meth:`stop` drains,
    deregisters and undoes every change."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stats = AgentStats()
        #: what the local health check last said (reported in heartbeats)
        self.healthy = True
        #: the kernel unwraps our packets (told to the balancer when registering)
        self.kernel_decap = False
        self._decap: KernelDecap | None = None
        self.decap_off_reason: str | None = None
        self._stop = trio.Event()
        #: one registration per balancer (``balancer``, then ``register_with``)
        self.registrations = [Registration(self, endpoint) for endpoint in config.control_endpoints]

    def snapshot(self) -> dict[str, Any]:
        """The agent's counters, and the kernel decapsulation's (``fastpath``)."""
        fastpath: dict[str, Any] = ({"mode": "tc", **self._decap.stats()} if self._decap is not None
                                    else {"mode": "off", "reason": self.decap_off_reason})
        return {**self.stats.snapshot(), "fastpath": fastpath}

    def stop(self) -> None:
        """Ask :meth:`run` to drain (when registered with a balancer), deregister and
        return. Idempotent; returns at once."""
        self._stop.set()

    @property
    def left(self) -> bool:
        """True once every balancer let us go (deregistered by us or by it): no more
        re-registering."""
        return bool(self.registrations) and all(r.left for r in self.registrations)

    @property
    def balancer_state(self) -> str | None:
        """The state the (first) balancer last told us; None before it told us anything."""
        return self.registrations[0].balancer_state if self.registrations else None

    def requests(self) -> trio.MemoryReceiveChannel[str]:
        """State requests for the (first) balancer ("draining", "deregister"), in order."""
        return self.registrations[0].requests()

    def _transport(self) -> Transport:
        options = dict(self.config.transport.options)
        if self.config.allowed_sources:
            options["allowed_sources"] = frozenset(str(b) for b in self.config.allowed_sources)
        return plugins.make_transport(self.config.transport.name, options)

    def _open_injectors(self, netops: NetOps) -> dict[bytes, Callable[[bytes], object]]:
        """One injection callable per VIP (keyed by the packed address)."""
        targets: dict[bytes, Callable[[bytes], object]] = {}
        if self.config.inject == "tun":
            fd = netops.create_tun(self.config.tun_device, mtu=65535)
            netops.add_address(self.config.tun_address, self.config.tun_device)
            netops.set_sysctl(f"net.ipv4.conf.{self.config.tun_device}.rp_filter", "2")
            write = functools.partial(os.write, fd)
            return {vip.packed: write for vip in self.config.vips}
        for vip in self.config.vips:
            sock = open_socket(
                family_of(vip), socket.SOCK_RAW, socket.IPPROTO_RAW, what=f"raw injection socket for {vip}",
                connect=(str(vip), 0),
            )
            netops.push_undo(f"close injection socket for {vip}", sock.close)
            targets[vip.packed] = sock.send
        return targets

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set up VIPs, sysctls and sockets; inject until :meth:`stop`; undo everything."""
        require_control_security(self.config)  # ConfigError before anything changes
        undo_dead_runs()  # what a run that died here (SIGKILL) left behind
        netops = NetOps()
        try:
            netops.set_sysctl("net.ipv4.conf.all.arp_ignore", "1")
            netops.set_sysctl("net.ipv4.conf.all.arp_announce", "2")
            for vip in self.config.vips:
                netops.add_address(vip, self.config.vip_interface)
            targets = self._open_injectors(netops)
            if not self.config.allowed_sources:
                log.warning("no balancer or balancers configured: accepting encapsulated packets"
                            " from any source", extra={"agent": self.config.name})
            source = self._transport().open_receiver(self.config.data_address, netops)
            self._attach_decap(netops)
            log.info("agent ready", extra={"agent": self.config.name,
                                           "vips": [str(v) for v in self.config.vips]})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, source, functools.partial(self._drain, targets, source),
                                   self._receive_error)
                for registration in self.registrations:
                    nursery.start_soon(registration.run)
                if self.config.health is not None:
                    nursery.start_soon(run_local_check, self, self.config.health)
                task_status.started()
                await self._stop.wait()
                await self._leave()
                nursery.cancel_scope.cancel()
        finally:
            problems = netops.undo_all()
            log.info("agent stopped", extra={"agent": self.config.name, "cleanup_problems": problems})

    def _attach_decap(self, netops: NetOps) -> None:
        """Unwrap in the kernel when the config lets us and the kernel can; else say why."""
        mode = self.config.fastpath.mode
        reason = "fastpath mode is off" if mode == "off" else decap_unavailable(self.config)
        if reason is None:
            try:
                decap = KernelDecap(self.config)
                decap.attach(netops)
            except CaplanceError as exc:
                reason = str(exc)
            else:
                self._decap, self.kernel_decap = decap, True
                return
        if mode == "tc":
            raise CaplanceError(f"fastpath mode 'tc' cannot run: {reason}")
        self.decap_off_reason = reason
        if mode == "auto":
            log.info("kernel decapsulation off; the agent injects", extra={"reason": reason})

    async def _leave(self) -> None:
        """Drain with every balancer (new flows go elsewhere while ours finish), then
        deregister."""
        staying = [r for r in self.registrations if not r.left]
        if not staying:
            return
        log.info("agent draining", extra={"agent": self.config.name, "timeout": self.config.drain_timeout})
        for registration in staying:
            registration.request("draining")
        with trio.move_on_after(self.config.drain_timeout):
            for registration in staying:
                await registration.wait_left()
        staying = [r for r in staying if not r.left]
        for registration in staying:
            registration.request("deregister")
        with trio.move_on_after(2):
            for registration in staying:
                await registration.wait_left()

    def _receive_error(self, exc: OSError) -> None:
        self.stats.dropped["receive_error"] += 1
        log.warning("agent receive failed", extra={"error": str(exc)})

    def _drain(self, targets: dict[bytes, Callable[[bytes], object]], source: object,
               receive: Callable[[], bytes]) -> bool:
        stats = self.stats
        dropped = stats.dropped
        stats.refused_sources = getattr(source, "refused", 0)
        for _ in range(BATCH):
            try:
                inner = receive()
            except BlockingIOError:
                return True
            except MalformedPacket as exc:  # the transport could not unwrap it
                stats.received += 1
                dropped["malformed_" + exc.reason] += 1
                continue
            stats.received += 1
            try:
                key = flow_key(inner)
            except MalformedPacket as exc:
                dropped["malformed_" + exc.reason] += 1
                continue
            if key[-4:] == _NO_PORTS:  # a data-path probe from the balancer?
                token = probe_token(inner, key)
                if token is not None:
                    for registration in self.registrations:  # each balancer waits for its own
                        try:
                            registration.probes_send.send_nowait(token)
                        except trio.WouldBlock:
                            dropped["probe_overflow"] += 1
                    continue
            inject = targets.get(destination(key))
            if inject is None:
                dropped["not_our_vip"] += 1
                continue
            try:
                inject(inner)
            except BlockingIOError:
                dropped["inject_busy"] += 1
                continue
            except OSError:
                dropped["inject_error"] += 1
                continue
            stats.injected += 1
        return False
