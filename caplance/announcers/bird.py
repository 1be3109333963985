"""Announcer ``bird``: BIRD 2 (Debian's ``bird2``), run by the operator, as the BGP speaker.

The balancer puts a route for each VIP it should announce into a kernel routing table of its
own (``table``, default 97, not one the host forwards by), through a TUN device it holds
(``device``, default ``caplance-bgp0``); BIRD learns the table and exports the routes to its
BGP peers::

    protocol kernel caplance4 {
        kernel table 97; learn; scan time 2;
        ipv4 { import all; export none; };
    }
    protocol bgp router { ...; ipv4 { import none; export where proto = "caplance4"; next hop self; }; }

The routes go through a device only the balancer's process keeps open, so they go with the
balancer however it ends: SIGKILL closes the device, the kernel removes the routes, BIRD sees
that at once (netlink) and withdraws -- no VIP stays announced for a dead balancer. BIRD's
own state (its protocols: BGP sessions, BFD) comes from ``birdc`` on the control ``socket``
and shows in ``ctl status``.

Options: ``socket`` (BIRD's control socket, required), ``table`` (1 to 252, default 97),
``device`` (default ``caplance-bgp0``), ``birdc`` (the command, default ``birdc``).
"""

from __future__ import annotations

import errno
import logging
import shutil
from typing import Any

import trio
from pyroute2.netlink.exceptions import NetlinkError

from caplance.configtypes import check_ifname
from caplance.errors import CaplanceError
from caplance.netops import NetOps
from caplance.packet import IPAddress

__all__ = ["BirdAnnouncer", "parse_protocols"]

log = logging.getLogger(__name__)

_POLL = 2.0
_ROUTE_PROTOCOL = 4  # "static": a route an administrator made, which BIRD's "learn" takes


def parse_protocols(text: str) -> dict[str, dict[str, str]]:
    """``birdc show protocols`` as name -> {proto, state, info}."""
    found = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] not in ("BIRD", "Name") and not line.startswith(" "):
            info = " ".join(words[5:]) if len(words) > 5 else ""
            found[words[0]] = {"proto": words[1], "state": words[3], "info": info}
    return found


class BirdAnnouncer:
    """Announces VIPs by routes BIRD learns (see the module docstring)."""

    name = "bird"

    def __init__(self, *, socket: str, table: int = 97, device: str = "caplance-bgp0",
                 birdc: str = "birdc") -> None:
        if not isinstance(socket, str) or not socket:
            raise ValueError("bird: socket must be the path of BIRD's control socket")
        if isinstance(table, bool) or not isinstance(table, int) or not 1 <= table <= 252:
            raise ValueError(f"bird: table must be a routing table number from 1 to 252, got {table!r}")
        check_ifname(device)
        self.socket = socket
        self.table = table
        self.device = device
        self.birdc = birdc
        self._wanted: dict[IPAddress, bool] = {}
        self._routed: set[IPAddress] = set()
        self._wake = trio.Event()
        self._protocols: dict[str, dict[str, str]] = {}
        self._index = 0

    def announce(self, vip: IPAddress) -> None:
        self._wanted[vip] = True
        self._wake.set()

    def withdraw(self, vip: IPAddress) -> None:
        self._wanted[vip] = False
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {"protocols": {name: f"{p['state']} {p['info']}".strip() for name, p in self._protocols.items()
                              if p["proto"] in ("BGP", "BFD")},
                "announced": sorted(str(vip) for vip in self._routed), "table": self.table}

    async def _show_protocols(self) -> dict[str, dict[str, str]]:
        try:
            done = await trio.run_process([self.birdc, "-s", self.socket, "show", "protocols"],
                                          capture_stdout=True, capture_stderr=True, check=False)
        except OSError as exc:
            raise CaplanceError(f"cannot run {self.birdc}: {exc.strerror or exc} (install Debian's bird2)") from exc
        if done.returncode != 0:
            raise CaplanceError(f"BIRD does not answer on {self.socket}: "
                                f"{(done.stderr or done.stdout).decode(errors='replace').strip()[-200:]}")
        return parse_protocols(done.stdout.decode(errors="replace"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if shutil.which(self.birdc) is None:
            raise CaplanceError(f"announcer 'bird' needs {self.birdc} (Debian's bird2 package)")
        self._protocols = await self._show_protocols()
        netops = NetOps()
        try:
            netops.create_tun(self.device, mtu=1500)
            self._index = netops.ifindex(self.device)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll)
                while True:
                    self._apply(netops)
                    await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._routed.clear()
            netops.undo_all()  # the device goes, and every route through it

    def _apply(self, netops: NetOps) -> None:
        for vip, wanted in list(self._wanted.items()):
            if wanted == (vip in self._routed):
                continue
            spec = {"dst": f"{vip}/{vip.max_prefixlen}", "oif": self._index, "table": self.table,
                    "proto": _ROUTE_PROTOCOL}
            try:
                netops.ipr.route("add" if wanted else "del", **spec)
            except NetlinkError as exc:
                if exc.code not in (errno.EEXIST, errno.ESRCH, errno.ENOENT):
                    log.error("cannot change the route BIRD exports", extra={"vip": str(vip), "error": str(exc)})
                    continue
            (self._routed.add if wanted else self._routed.discard)(vip)

    async def _poll(self) -> None:
        while True:
            await trio.sleep(_POLL)
            try:
                self._protocols = await self._show_protocols()
            except CaplanceError as exc:
                self._protocols = {}
                log.warning("BIRD's state unknown", extra={"error": str(exc)})
