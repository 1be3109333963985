"""The kernel data plane: the BPF program in ``balancer.bpf.c``, attached to tc (clsact
ingress) or XDP on the interface clients' packets arrive on, its maps filled from each
:class:`~caplance.forwarding.ForwardingTable` the control plane publishes.

It is one data plane among two: what the program does not handle it passes up, unchanged,
and the kernel hands it on to the Python data plane behind it (a ``tun``, ``raw`` or
``nfqueue`` listener), which forwards it exactly as it would without the program. Both read
the same tables and compute the same flow hash, so a flow gets the same backend whichever
of them handles a packet.

Applying a table (:meth:`BpfDataPlane.apply`): VIPs with a lookup table are written to the
``vips`` map; each VIP's table goes into a fresh inner map, filled through ``mmap``, swapped
into the VIP's spare slot, and only then does the VIP's entry point at it (one element
update), so packets see the old table or the new one, never a half-written one. A VIP whose
selector has no lookup table (``ring``) is left out: its packets are not the program's, so
they reach the Python plane. Backends get the source address, next hop and interface of the
route toward them. Counters are per-CPU arrays, summed on :meth:`BpfDataPlane.stats`.
"""

from __future__ import annotations

import array
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from caplance.config import ConntrackConfig
from caplance.dataplane.bpf import layout, libbpf
from caplance.errors import CaplanceError
from caplance.forwarding import BackendEntry, ForwardingTable, LookupTable
from caplance.netops import NetOps
from caplance.packet import IPAddress

__all__ = ["OBJECT", "BpfDataPlane", "unavailable"]

log = logging.getLogger(__name__)

#: the compiled program (``make`` builds it; shipped as package data)
OBJECT = Path(__file__).with_name("balancer.bpf.o")
#: the most flows the kernel's table holds (LRU maps are allocated whole when created)
MAX_KERNEL_FLOWS = 1 << 18
NS = 1_000_000_000


def unavailable(mode: str, interface: str | None) -> str | None:
    """Why the kernel data plane cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the kernel data plane needs root (CAP_BPF and CAP_NET_ADMIN)"
    if not OBJECT.exists():
        return f"the BPF program was not built ({OBJECT.name} is missing: run make, which needs clang)"
    ok, why = libbpf.available()
    if not ok:
        return why
    if interface is None:
        return "no interface for the fast path: set [fastpath] interface"
    if not Path(f"/sys/class/net/{interface}").exists():
        return f"no interface {interface} for the fast path"
    return None


class BpfDataPlane:
    """The program in ``mode`` ``"tc"`` or ``"xdp"`` on ``interface``."""

    def __init__(self, mode: str, interface: str, conntrack: ConntrackConfig, *,
                 new_flows_per_second: int = 0) -> None:
        if mode not in ("tc", "xdp"):
            raise ValueError(f"mode must be tc or xdp, got {mode!r}")
        self.name = mode
        self.mode = mode
        self.interface = interface
        self.conntrack = conntrack
        self.new_flows_per_second = new_flows_per_second
        self.table = ForwardingTable()
        self._fds: dict[str, int] = {}
        self._index: dict[IPAddress, int] = {}  # VIP -> its number (0..MAX_VIPS-1)
        self._slots: dict[IPAddress, int] = {}  # VIP -> its current lookup slot
        self._tables: dict[IPAddress, LookupTable] = {}
        self._members: set[bytes] = set()
        self._ports: set[bytes] = set()
        self._backends: dict[int, bytes] = {}
        self._names: dict[int, str] = {}
        self._left_out: set[IPAddress] = set()
        self._cpus = 1
        self._final: dict[str, Any] = {}
        #: the program is attached (not detached by an operator)
        self.attached = False
        self._attach: Callable[[], object] = lambda: None
        self._detach: Callable[[], None] = lambda: None

    # -- running ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def loaded(self) -> Iterator[libbpf.BpfObject]:
        """Load the program and fill its maps from the latest table (not attached yet); the
        object is closed, and the maps with it, on exit."""
        program = libbpf.BpfObject(str(OBJECT))
        try:
            program.set_max_entries("flows", max(min(self.conntrack.max_flows, MAX_KERNEL_FLOWS), 1024))
            program.load()
            self._cpus = libbpf.possible_cpus()
            for name in ("vips", "vip_ports", "vip_lookup", "members", "backends", "settings", "counters",
                         "vip_stats", "backend_stats"):
                self._fds[name] = program.map_fd(name)
            self._settings(ready=False)
            self._write(self.table)
            self._settings(ready=bool(self.table.vips))
            yield program
        finally:
            if self._fds:
                self._final = self.stats()  # what it counted, for a report after it is gone
            self._fds.clear()
            program.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the program, fill its maps from the latest table, attach it; detach on exit."""
        netops = NetOps()
        try:
            with self.loaded() as program:
                ifindex = netops.ifindex(self.interface)
                prog = program.program_fd(f"caplance_{self.mode}")
                if self.mode == "tc":
                    self._attach = lambda: libbpf.tc_attach(ifindex, prog)
                    self._detach = lambda: libbpf.tc_detach(ifindex)
                    netops.attach_tc(self.interface, lambda index: self._attach())
                else:
                    # bpf_fib_lookup (the next hop's MAC) answers only where forwarding is on
                    netops.set_sysctl(f"net.ipv4.conf.{self.interface}.forwarding", "1")
                    self._attach = lambda: libbpf.xdp_attach(ifindex, prog, native=True)
                    self._detach = lambda: libbpf.xdp_detach(ifindex, native=True)
                    netops.attach_xdp(self.interface, lambda index: self._attach(), native=True)
                self.attached = True
                log.info("kernel data plane attached", extra={"mode": self.mode, "interface": self.interface})
                try:
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self.attached = False
                    problems = netops.undo_all()
                    if problems:
                        log.warning("kernel data plane cleanup", extra={"problems": problems})
        finally:
            netops.undo_all()

    def set_attached(self, on: bool) -> str:
        """Detach the program (the Python plane then gets every packet) or attach it again;
        the maps and the kernel's flow table stay as they are. What it did, in words."""
        if not self._fds:
            raise CaplanceError("the kernel data plane is not running")
        if on != self.attached:
            (self._attach if on else self._detach)()
            self.attached = on
            log.info("kernel data plane " + ("attached again" if on else "detached by operator"),
                     extra={"mode": self.mode, "interface": self.interface})
        return f"fastpath {self.mode} on {self.interface}: {'on' if on else 'off (forwarding in Python)'}"

    def apply(self, table: ForwardingTable) -> None:
        """Write ``table`` into the maps (or keep it for :meth:`run` if not loaded yet)."""
        if self._fds:
            self._write(table)
            self._settings(ready=bool(table.vips))
        self.table = table

    # -- the maps --------------------------------------------------------------------------

    def _settings(self, *, ready: bool) -> None:
        conntrack = self.conntrack
        value = layout.SETTINGS.pack(int(conntrack.tcp_timeout * NS), int(conntrack.tcp_closing_timeout * NS),
                                     int(conntrack.udp_timeout * NS), self.new_flows_per_second, int(ready),
                                     int(conntrack.enabled))
        libbpf.map_update(self._fds["settings"], layout.ID.pack(0), value)

    def _write(self, table: ForwardingTable) -> None:
        fds = self._fds
        previous = self.table
        for number, entry in table.backends.items():
            if previous.backends.get(number) is entry and number in self._backends:
                continue
            value = self._backend(entry)
            libbpf.map_update(fds["backends"], layout.ID.pack(number), value)
            self._backends[number] = value
            self._names[number] = entry.name
        for number in [n for n in self._backends if n not in table.backends]:
            libbpf.map_update(fds["backends"], layout.ID.pack(number), bytes(layout.BACKEND.size))
            del self._backends[number]
        members: set[bytes] = set()
        ports: set[bytes] = set()
        for address, vip in table.vips.items():
            if vip.lookup is None:
                if address not in self._left_out:
                    log.warning("VIP left to the Python data plane: its selector has no lookup table",
                                extra={"vip": str(address), "selector": vip.selector})
                    self._left_out.add(address)
                continue
            index = self._index.setdefault(address, self._free_index(address))
            members.update(layout.MEMBER_KEY.pack(index, number) for number in vip.members)
            ports.update(layout.PORT_KEY.pack(index, port) for port in vip.ports)
        for key in members - self._members:
            libbpf.map_update(fds["members"], key, b"\x01")
        for key in ports - self._ports:
            libbpf.map_update(fds["vip_ports"], key, b"\x01")
        for address, vip in table.vips.items():
            if vip.lookup is not None:
                self._write_vip(address, vip.lookup)
                libbpf.map_update(fds["vips"], layout.vip_key(address),
                                  layout.vip_meta(vip, self._index[address], self._slots[address]))
        for address in [a for a in self._index if a not in table.vips or table.vips[a].lookup is None]:
            libbpf.map_delete(fds["vips"], layout.vip_key(address))
            for slot in (2 * self._index[address], 2 * self._index[address] + 1):
                libbpf.map_delete(fds["vip_lookup"], layout.ID.pack(slot))
            del self._index[address]
            self._slots.pop(address, None)
            self._tables.pop(address, None)
        for key in self._members - members:
            libbpf.map_delete(fds["members"], key)
        for key in self._ports - ports:
            libbpf.map_delete(fds["vip_ports"], key)
        self._members, self._ports = members, ports

    def _free_index(self, address: IPAddress) -> int:
        taken = set(self._index.values())
        for index in range(layout.MAX_VIPS):
            if index not in taken:
                return index
        raise CaplanceError(f"the kernel data plane holds at most {layout.MAX_VIPS} VIPs; {address} is one more")

    def _write_vip(self, address: IPAddress, lookup: LookupTable) -> None:
        """A changed lookup table: filled into a new inner map, swapped into the spare slot."""
        if self._tables.get(address) == lookup:
            return
        index = self._index[address]
        current = self._slots.get(address)
        slot = 2 * index if current != 2 * index else 2 * index + 1
        inner = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY, 4, 4, lookup.size,
                                  flags=libbpf.BPF_F_INNER_MAP | libbpf.BPF_F_MMAPABLE, name="caplance_lookup")
        try:
            strided = array.array("I", bytes(8 * lookup.size))  # an array map's values are 8-byte aligned
            strided[0::2] = array.array("I", lookup.ids)
            with libbpf.map_mmap(inner, 8 * lookup.size) as memory:
                memory[: 8 * lookup.size] = strided.tobytes()
            libbpf.map_update(self._fds["vip_lookup"], layout.ID.pack(slot), layout.ID.pack(inner))
        finally:
            os.close(inner)  # the outer map holds it now
        self._slots[address] = slot
        self._tables[address] = lookup

    def _backend(self, entry: BackendEntry) -> bytes:
        source, nexthop, ifindex = _route_toward(entry.address)
        if self.mode == "xdp" and source is not None:
            _resolve_neighbour(entry.address)
        return layout.backend_value(entry, source=source, nexthop=nexthop, ifindex=ifindex)

    # -- counters ----------------------------------------------------------------------------

    def _per_cpu(self, name: str, key: int, fmt: Any) -> list[tuple[int, ...]]:
        size = (fmt.size + 7) // 8 * 8
        raw = libbpf.map_lookup(self._fds[name], layout.ID.pack(key), size * self._cpus)
        if raw is None:
            return []
        return [fmt.unpack_from(raw, cpu * size) for cpu in range(self._cpus)]

    def stats(self) -> dict[str, Any]:
        """Counters like the Python plane's (packets the program handled itself, forwarded
        and dropped by the same names), plus ``fastpath``: its mode and what it passed up."""
        snapshot: dict[str, Any] = {"packets_in": 0, "forwarded": {}, "forwarded_bytes": {}, "dropped": {},
                                    "fastpath": {"mode": self.mode, "interface": self.interface, "passed_up": {},
                                                 "table_version": self.table.version,
                                                 "attached": int(self.attached)}}
        if not self._fds:
            return self._final or snapshot
        totals = {name: sum(value[0] for value in self._per_cpu("counters", number, layout.COUNTER))
                  for number, name in enumerate(layout.REASONS)}
        fastpath = snapshot["fastpath"]
        for name, value in totals.items():
            if name.startswith("pass_") and value:
                fastpath["passed_up"][name.removeprefix("pass_")] = value
            elif name in layout.DROPS and value:
                snapshot["dropped"][name] = value
        fastpath["seen"] = totals["packets_in"]
        fastpath["flows_not_remembered"] = totals["flow_not_remembered"]
        fastpath["flows_rehashed"] = totals["flow_rehashed"]
        snapshot["packets_in"] = totals["packets_in"] - sum(fastpath["passed_up"].values())
        for number, name in self._names.items():
            rows = self._per_cpu("backend_stats", number, layout.TRAFFIC)
            packets, sent = sum(r[0] for r in rows), sum(r[1] for r in rows)
            if packets:
                snapshot["forwarded"][name] = snapshot["forwarded"].get(name, 0) + packets
                snapshot["forwarded_bytes"][name] = snapshot["forwarded_bytes"].get(name, 0) + sent
        return snapshot


def _route_toward(address: IPAddress) -> tuple[IPAddress | None, IPAddress | None, int]:
    """(our source address, the next hop, the interface) of the route toward ``address``;
    (None, None, 0) without one."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=str(address))
    except NetlinkError:
        return None, None, 0
    if not routes:
        return None, None, 0
    route = routes[0]
    source = route.get_attr("RTA_PREFSRC")
    gateway = route.get_attr("RTA_GATEWAY")
    if source is None:
        return None, None, 0
    return (ipaddress.ip_address(source), ipaddress.ip_address(gateway) if gateway else address,
            int(route.get_attr("RTA_OIF") or 0))


def _resolve_neighbour(address: IPAddress) -> None:
    """Make the kernel resolve ``address``'s link-layer address (XDP cannot wait for it): one
    empty UDP datagram to the discard port."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", (str(address), 9))
    except OSError:
        pass
