"""Changes to the host's network, each one recorded so that it can be undone.

Addresses, routes, sysctls, nftables tables and TUN devices all go through :class:`NetOps`,
the one place that talks netlink (pyroute2). Every change that succeeds pushes its undo onto
a stack; :meth:`NetOps.undo_all` runs the stack in reverse order. Something that was already
there before we started (an address the operator put on ``lo`` themselves) is left alone on
undo: we only remove what we made.

Each change is also written to a journal (:mod:`caplance.journal`) *before* it is made, with
what its undo needs, so that if the process dies without undoing (SIGKILL) the next start
undoes it (:mod:`caplance.recovery`); the undo of each kind lives in :mod:`caplance.netundo`,
shared by both.

nftables rules are applied with the ``nft`` command in a table of our own (one table per
:class:`NetOps`), so removing them is deleting that table. pyroute2's nftables support is too
thin to build rules with; the ``nft`` tool ships with Debian's ``nftables`` package.

All calls here are synchronous and bounded (netlink answers at once; ``nft`` runs with a
timeout), so undo can run from a ``finally`` block even after cancellation.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import secrets
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from caplance.errors import NetOpsError
from caplance.journal import Journal
from caplance.netundo import (
    COMMAND_TIMEOUT,
    describe,
    forwarding_side_effects,
    quiet_netlink,
    read_sysctl,
    remove_iptables_chain,
    run_command,
    tc_filters,
    undo_entry,
    write_sysctl,
)
from caplance.packet import IPAddress

__all__ = ["IPAddress", "NetOps", "default_interface", "largest_link_mtu", "open_tun_queue", "quiet_netlink",
           "read_link_type", "read_sysctl", "remove_iptables_chain", "write_sysctl"]

log = logging.getLogger(__name__)


def read_link_type(ifname: str) -> int:
    """The ARPHRD link type of an interface (1 = Ethernet), from sysfs."""
    try:
        with open(f"/sys/class/net/{ifname}/type") as handle:
            return int(handle.read())
    except (OSError, ValueError) as exc:
        raise NetOpsError("read link type of", ifname, "no such interface") from exc


def largest_link_mtu(*, exclude: set[str]) -> int:
    """The largest MTU of this namespace's interfaces (from sysfs), except those named in
    ``exclude``; 1500 if there are none."""
    sizes = []
    for entry in os.scandir("/sys/class/net"):
        if entry.name in exclude:
            continue
        try:
            with open(os.path.join(entry.path, "mtu")) as handle:
                sizes.append(int(handle.read()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=1500)


def default_interface() -> str | None:
    """The interface of this namespace's IPv4 default route, else its only interface other
    than ``lo`` that is up; None when neither says (from procfs and sysfs)."""
    try:
        with open("/proc/net/route") as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
                    return fields[0]
    except OSError:
        pass
    candidates = []
    for entry in os.scandir("/sys/class/net"):
        if entry.name == "lo":
            continue
        try:
            with open(os.path.join(entry.path, "operstate")) as handle:
                state = handle.read().strip()
        except OSError:
            continue
        if state in ("up", "unknown") and not os.path.exists(os.path.join(entry.path, "tun_flags")):
            candidates.append(entry.name)
    return candidates[0] if len(candidates) == 1 else None


_TUNSETQUEUE = 0x400454D9
_IFF_DETACH_QUEUE = 0x0400


def _tun_device(name: str, multi_queue: bool) -> Any:
    from pytun import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, TunTapDevice

    return TunTapDevice(name=name, flags=IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0))


def open_tun_queue(name: str) -> int:
    """Attach a new queue to multi-queue TUN device ``name``; its non-blocking fd (the
    caller closes it). Raises :class:`NetOpsError`."""
    from pytun import Error as TunError

    try:
        device = _tun_device(name, True)
    except TunError as exc:
        raise NetOpsError("attach a queue to TUN device", name, str(exc),
                          "is the balancer that made it running?") from exc
    fd = os.dup(device.fileno())  # ours to close; the pytun object closes its own
    device.close()
    os.set_blocking(fd, False)
    return fd


def _prefixlen(address: IPAddress) -> int:
    return 32 if address.version == 4 else 128


class NetOps:
    """A log of network changes we made, undone in reverse by :meth:`undo_all`."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._ipr: IPRoute | None = None
        self._journal: Journal | None = None
        self.nft_table = f"caplance_{os.getpid()}_{secrets.token_hex(3)}"
        self._nft_table_made = False

    # -- plumbing ------------------------------------------------------------------------

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def push_undo(self, description: str, action: Callable[[], None]) -> None:
        """Record an undo step (for resources made outside this module, such as sockets)."""
        self._undo.append((description, action))

    def _record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Journal a change about to be made (see :mod:`caplance.netundo` for the kinds)."""
        if self._journal is None:
            self._journal = Journal()
        try:
            return self._journal.record(kind, **fields)
        except OSError as exc:
            raise NetOpsError("write the journal of host changes", str(self._journal.path),
                              exc.strerror or str(exc), "set CAPLANCE_JOURNAL_DIR to a writable directory") from exc

    def _skip(self, entry: dict[str, Any]) -> None:
        """The change ``entry`` was not made (or was there before): its undo must not run."""
        if self._journal is not None:
            try:
                self._journal.skip(entry)
            except OSError as exc:
                log.warning("cannot write the journal", extra={"error": str(exc)})

    def _made(self, entry: dict[str, Any]) -> None:
        """The change ``entry`` was made: undo it on :meth:`undo_all`."""
        self.push_undo(describe(entry), lambda: undo_entry(self.ipr, entry))

    def undo_all(self) -> list[str]:
        """Undo every recorded change, newest first. Returns the problems met (also logged).

        Never raises: one failed step does not keep the others from running.
        """
        problems = []
        while self._undo:
            description, action = self._undo.pop()
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - keep undoing, report every failure
                problems.append(f"{description}: {exc}")
                log.warning("cleanup step failed", extra={"step": description, "error": str(exc)})
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._journal is not None:
            self._journal.close()
        return problems

    def ifindex(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetOpsError("find interface", ifname, "no such interface")
        return int(found[0])

    # -- addresses and routes ------------------------------------------------------------

    def add_address(self, address: IPAddress, ifname: str) -> None:
        """Put ``address`` (host prefix) on ``ifname``; undo removes it if we added it."""
        index = self.ifindex(ifname)
        prefix = _prefixlen(address)
        entry = self._record("address", address=str(address), prefixlen=prefix, ifname=ifname)
        try:
            self.ipr.addr("add", index=index, address=str(address), prefixlen=prefix)
        except NetlinkError as exc:
            self._skip(entry)
            if exc.code == errno.EEXIST:
                log.info("address already present, leaving it", extra={"address": str(address)})
                return
            raise NetOpsError("add address", f"{address} on {ifname}", str(exc)) from exc
        self._made(entry)

    def add_route(self, address: IPAddress, *, ifname: str | None = None) -> None:
        """Route ``address`` (host prefix) into ``ifname``, or blackhole it when ifname is None."""
        spec: dict[str, Any] = {"dst": f"{address}/{_prefixlen(address)}"}
        if ifname is None:
            spec["type"] = "blackhole"
        else:
            spec["oif"] = self.ifindex(ifname)
        target = f"{spec['dst']} {'blackhole' if ifname is None else 'dev ' + ifname}"
        entry = self._record("route", dst=spec["dst"], ifname=ifname)
        try:
            self.ipr.route("add", **spec)
        except NetlinkError as exc:
            self._skip(entry)
            hint = "another route for this address exists; remove it" if exc.code == errno.EEXIST else ""
            raise NetOpsError("add route", target, str(exc), hint) from exc
        self._made(entry)

    def set_link(self, ifname: str, *, up: bool | None = None, mtu: int | None = None) -> None:
        """Set a link's state or MTU (on devices we created, so not undone separately and
        not journaled: the device's own undo takes it)."""
        spec: dict[str, Any] = {}
        if up is not None:
            spec["state"] = "up" if up else "down"
        if mtu is not None:
            spec["mtu"] = mtu
        try:
            self.ipr.link("set", index=self.ifindex(ifname), **spec)
        except NetlinkError as exc:
            raise NetOpsError("configure link", ifname, str(exc)) from exc

    # -- sysctls -------------------------------------------------------------------------

    def set_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl of this network namespace; undo restores the previous value, and
        those of the sysctls the kernel changes with it (``ip_forward`` turns every
        interface's ``forwarding`` on and ``conf.all.accept_redirects`` off)."""
        previous = read_sysctl(name)
        if previous == value:
            return
        entry = self._record("sysctl", name=name, old=previous, value=value, then=forwarding_side_effects(name))
        try:
            write_sysctl(name, value)
        except NetOpsError:
            self._skip(entry)
            raise
        self._made(entry)

    # -- nftables ------------------------------------------------------------------------

    def add_nft_chain(self, chain: str, hook: str, rules: Iterable[str], *, priority: int = 0) -> None:
        """Add a base chain with ``rules`` to our own ``inet`` table (created on first use).

        Undo deletes the whole table, taking every chain and rule with it.
        """
        if shutil.which("nft") is None:
            raise NetOpsError(
                "add nftables rules", self.nft_table, "the nft command is not installed",
                "install Debian's nftables package",
            )
        lines = []
        if not self._nft_table_made:
            lines.append(f"add table inet {self.nft_table}")
            entry = self._record("nft_table", family="inet", table=self.nft_table)
        lines.append(
            f"add chain inet {self.nft_table} {chain} "
            f"{{ type filter hook {hook} priority {priority}; policy accept; }}"
        )
        lines += [f"add rule inet {self.nft_table} {chain} {rule}" for rule in rules]
        try:
            run_command(["nft", "-f", "-"], "\n".join(lines) + "\n", f"add chain {chain} to nftables table",
                        self.nft_table)
        except NetOpsError:
            if not self._nft_table_made:
                self._skip(entry)  # nft applies a script all or nothing
            raise
        if not self._nft_table_made:
            self._nft_table_made = True
            self._made(entry)

    # -- tc and XDP programs -------------------------------------------------------------

    def attach_tc(self, ifname: str, attach: Callable[[int], object]) -> None:
        """Attach a tc program to ``ifname``'s clsact ingress with ``attach(ifindex)`` (a
        libbpf call, handle 1, priority 1); undo detaches it and, when no other filter is left
        on the clsact qdisc (one it made, or one only a crashed run of ours used), removes the
        qdisc: the interface is left as it was."""
        self._attach_program("tc", ifname, attach)

    def attach_xdp(self, ifname: str, attach: Callable[[int], object], *, native: bool = True) -> None:
        """Attach an XDP program to ``ifname`` with ``attach(ifindex)`` (a libbpf call, in
        driver mode if ``native``); undo detaches it."""
        self._attach_program("xdp", ifname, attach, native=native)

    def _attach_program(self, kind: str, ifname: str, attach: Callable[[int], object], **fields: Any) -> None:
        """Journal a program attachment of ``kind``, then ``attach(ifindex)``."""
        index = self.ifindex(ifname)
        entry = self._record(kind, ifname=ifname, **fields)
        try:
            attach(index)
        except BaseException:
            self._skip(entry)
            raise
        self._made(entry)

    def tc_filters(self, index: int) -> int:
        """How many tc filter entries the clsact qdisc of interface ``index`` holds (ingress
        and egress)."""
        return tc_filters(self.ipr, index)

    # -- GRE devices ---------------------------------------------------------------------

    def create_gre(self, ifname: str, *, remote: IPAddress, local: IPAddress | None = None) -> None:
        """Create and bring up kernel GRE device ``ifname`` to ``remote`` (from ``local``, by
        default the source address of the route toward ``remote``); undo deletes it. Raises
        :class:`NetOpsError`, naming the missing module on kernels without ``ip_gre``."""
        kind = "gre" if remote.version == 4 else "ip6gre"
        if local is None:
            try:
                routes = self.ipr.route("get", dst=str(remote))
            except NetlinkError as exc:
                raise NetOpsError("find a route toward", str(remote), str(exc), "add a route to the backend") from exc
            source = routes[0].get_attr("RTA_PREFSRC") if routes else None
            if not source:
                raise NetOpsError("find a local address toward", str(remote), "no route with a source address")
            local = ipaddress.ip_address(source)
        entry = self._record("link", ifname=ifname)
        try:
            self.ipr.link("add", ifname=ifname, kind=kind, gre_local=str(local), gre_remote=str(remote), gre_ttl=64)
        except NetlinkError as exc:
            self._skip(entry)
            if exc.code in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOENT):
                raise NetOpsError(
                    "create GRE link", ifname,
                    f"this kernel has no {'ip_gre' if kind == 'gre' else 'ip6_gre'} module ({exc})",
                    "use transport 'gre-raw' or 'udp'") from exc
            raise NetOpsError("create GRE link", ifname, str(exc)) from exc
        self._made(entry)
        self.set_link(ifname, up=True)

    # -- iptables (for targets nftables lacks here, such as NFQUEUE) -----------------------

    def add_iptables_chain(self, table: str, hook: str, rules: Iterable[str], *, ipv6: bool = False) -> None:
        """Add a chain of our own with ``rules`` to iptables ``table`` and jump to it from
        the built-in chain ``hook`` (``PREROUTING``, say), atomically (``iptables-restore
        --noflush``). Undo removes the jump and the chain. For targets this kernel's nftables
        has no expression for (``queue`` needs ``nft_queue``; ``iptables-nft``'s NFQUEUE works
        through the xtables compatibility layer)."""
        command = "ip6tables" if ipv6 else "iptables"
        chain = self.nft_table.upper()[:28]
        if shutil.which(f"{command}-restore") is None:
            raise NetOpsError(f"add {command} rules", chain, f"the {command}-restore command is not installed",
                              "install Debian's iptables package")
        family = "ip6" if ipv6 else "ip"
        had_table = shutil.which("nft") is not None and subprocess.run(
            ["nft", "list", "table", family, table], capture_output=True, timeout=COMMAND_TIMEOUT,
            check=False).returncode == 0
        lines = [f"*{table}", f":{chain} - [0:0]", f"-A {hook} -j {chain}"]
        lines += [f"-A {chain} {rule}" for rule in rules]
        lines.append("COMMIT")
        entry = self._record("iptables", command=command, table=table, hook=hook, chain=chain, had_table=had_table)
        try:
            run_command([f"{command}-restore", "--noflush"], "\n".join(lines) + "\n", f"add {command} chain", chain)
        except NetOpsError:
            self._skip(entry)  # a restore is all or nothing
            raise
        self._made(entry)

    # -- TUN devices ---------------------------------------------------------------------

    def create_tun(self, name: str, *, mtu: int = 65535, multi_queue: bool = False,
                   detached: bool = False) -> int:
        """Create TUN device ``name`` (no packet info header), bring it up, return its fd.

        The fd is non-blocking. The device lives as long as its queues: undo closes this
        one, and the kernel removes the device once no queue is left. ``multi_queue`` lets
        others attach queues (:func:`open_tun_queue`); ``detached`` takes this queue out of
        the kernel's choice (it gets no packets, it only keeps the device). Raises
        :class:`NetOpsError` if the name is taken.
        """
        from pytun import Error as TunError

        if self.ipr.link_lookup(ifname=name):
            raise NetOpsError("create TUN device", name, "an interface of that name exists",
                              "pick another name or remove it")
        entry = self._record("tun", ifname=name)  # for a run that died: its device goes with it
        try:
            device = _tun_device(name, multi_queue)
        except TunError as exc:
            self._skip(entry)
            raise NetOpsError("create TUN device", name, str(exc), "needs root and /dev/net/tun") from exc
        self.push_undo(f"remove TUN device {name}", device.close)
        if detached:
            fcntl.ioctl(device.fileno(), _TUNSETQUEUE, struct.pack("16sH", b"", _IFF_DETACH_QUEUE))
        self.set_link(name, up=True, mtu=mtu)
        fd = int(device.fileno())
        os.set_blocking(fd, False)
        return fd
