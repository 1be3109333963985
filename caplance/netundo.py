"""The undo of each kind of host change, from its journal entry alone.

:class:`~caplance.netops.NetOps` undoes its own changes with these functions, and
:mod:`caplance.recovery` undoes those of a run that died with the same ones, reading the
entries from its journal (:mod:`caplance.journal`). So every undo here takes an ``IPRoute``
and the entry (a JSON object), nothing else, and treats "already gone" as success: a run
that died may have died before it made the change it recorded, and the kernel removes some
things (a TUN device, the routes through it) with the process.

The kinds and their fields:

========== ===================================================================
address    ``address``, ``prefixlen``, ``ifname``
route      ``dst``, ``ifname`` (None: a blackhole route)
sysctl     ``name``, ``old``, ``value`` (restored only if still ``value``), ``then``
           (side effects of this write, restored after it: ``{name: old value}``)
nft_table  ``family``, ``table``
iptables   ``command``, ``table``, ``hook``, ``chain``, ``had_table``
tc         ``ifname`` (our program: handle 1, priority 1 on clsact ingress)
xdp        ``ifname``, ``native``
link       ``ifname`` (a device we created: GRE)
tun        ``ifname`` (gone with its last queue; removed if a survivor holds one)
========== ===================================================================
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from caplance.errors import NetOpsError

__all__ = ["describe", "forwarding_side_effects", "quiet_netlink", "read_sysctl", "remove_iptables_chain",
           "run_command", "undo_entry", "write_sysctl"]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0
_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)

Entry = dict[str, Any]


def read_sysctl(name: str) -> str:
    """Read ``net.ipv4.ip_forward``-style sysctls of the current network namespace."""
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as exc:
        raise NetOpsError("read sysctl", name, exc.strerror or str(exc)) from exc


def write_sysctl(name: str, value: str) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as exc:
        raise NetOpsError("set sysctl", f"{name}={value}", exc.strerror or str(exc), "run as root") from exc


def forwarding_side_effects(name: str) -> dict[str, str]:
    """What else writing sysctl ``name`` changes, with the values they have now.

    ``net.ipv4.ip_forward`` (or ``conf.all.forwarding``) sets every interface's and the
    default ``forwarding`` and, inverted, ``conf.all.accept_redirects`` (the kernel's
    ``inet_forward_change``); IPv6's ``conf.all.forwarding`` sets every interface's and the
    default one. Restoring the switch alone would leave those changed."""
    if name in ("net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding"):
        family, extra = "ipv4", ["net.ipv4.conf.all.accept_redirects"]
    elif name == "net.ipv6.conf.all.forwarding":
        family, extra = "ipv6", []
    else:
        return {}
    names = [f"net.{family}.conf.{device}.forwarding" for device in sorted(os.listdir(f"/proc/sys/net/{family}/conf"))]
    found = {}
    for other in names + extra:
        if other == name:
            continue
        try:
            found[other] = read_sysctl(other)
        except NetOpsError:
            continue
    return found


def quiet_netlink(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a netlink removal; 'already gone' is success."""
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise


def run_command(argv: list[str], script: str | None, what: str, target: str) -> None:
    """Run ``argv`` (``script`` on its stdin); raises :class:`NetOpsError` if it fails."""
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetOpsError(what, target, str(exc)) from exc
    if done.returncode != 0:
        raise NetOpsError(what, target, done.stderr.strip() or f"{argv[0]} exit {done.returncode}")


def _succeeds(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


# -- one undo per kind -------------------------------------------------------------------

def _address(ipr: IPRoute, entry: Entry) -> None:
    index = _index(ipr, entry["ifname"])
    if index is not None:
        quiet_netlink(ipr.addr, "del", index=index, address=entry["address"], prefixlen=entry["prefixlen"])


def _route(ipr: IPRoute, entry: Entry) -> None:
    spec: dict[str, Any] = {"dst": entry["dst"]}
    if entry.get("ifname") is None:
        spec["type"] = "blackhole"
    else:
        index = _index(ipr, entry["ifname"])
        if index is None:
            return  # the device went, and its routes with it
        spec["oif"] = index
    quiet_netlink(ipr.route, "del", **spec)


def _sysctl(ipr: IPRoute, entry: Entry) -> None:
    name = entry["name"]
    try:
        now = read_sysctl(name)
    except NetOpsError:
        return  # its interface is gone
    if now == entry["value"]:
        write_sysctl(name, entry["old"])
    else:
        log.warning("sysctl changed since we set it; leaving it", extra={"sysctl": name, "value": now})
        return
    for other, old in entry.get("then", {}).items():
        try:
            if read_sysctl(other) != old:
                write_sysctl(other, old)
        except NetOpsError:
            continue  # its interface is gone


def _nft_table(ipr: IPRoute, entry: Entry) -> None:
    family, table = entry["family"], entry["table"]
    if shutil.which("nft") is not None and _succeeds(["nft", "list", "table", family, table]):
        run_command(["nft", "-f", "-"], f"delete table {family} {table}\n", "delete nftables table", table)


def remove_iptables_chain(command: str, table: str, hook: str, chain: str, *, had_table: bool) -> None:
    """Remove our chain ``chain`` and the jump to it from ``hook`` in iptables ``table``
    (``command``: ``iptables`` or ``ip6tables``), and the table itself if iptables made it
    for us (``had_table`` False) and nothing else is in it. Nothing to do if it is gone."""
    if shutil.which(command) is None or not _succeeds([command, "-t", table, "-S", chain]):
        return
    while _succeeds([command, "-t", table, "-C", hook, "-j", chain]):
        run_command([command, "-t", table, "-D", hook, "-j", chain], None, f"remove {command} jump", chain)
    run_command([command, "-t", table, "-F", chain], None, f"flush {command} chain", chain)
    run_command([command, "-t", table, "-X", chain], None, f"delete {command} chain", chain)
    if had_table:
        return
    left = subprocess.run([command, "-t", table, "-S"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          check=False).stdout.split("\n")
    if all(not line or line.startswith("-P ") for line in left):  # iptables made it for us
        family = "ip6" if command == "ip6tables" else "ip"
        run_command(["nft", "-f", "-"], f"delete table {family} {table}\n",
                    f"delete the {table} table iptables made", chain)


def _iptables(ipr: IPRoute, entry: Entry) -> None:
    remove_iptables_chain(entry["command"], entry["table"], entry["hook"], entry["chain"],
                          had_table=bool(entry["had_table"]))


def tc_filters(ipr: IPRoute, index: int) -> int:
    """How many tc filter entries the clsact qdisc of interface ``index`` holds (ingress
    and egress)."""
    try:
        return sum(len(ipr.get_filters(index=index, parent=parent)) for parent in (0xFFFFFFF2, 0xFFFFFFF3))
    except NetlinkError:
        return 0


def _tc(ipr: IPRoute, entry: Entry) -> None:
    """Detach our program and, when no other filter is left on the clsact qdisc, remove the
    qdisc: the interface is left as it was."""
    from caplance.dataplane.bpf import libbpf

    index = _index(ipr, entry["ifname"])
    if index is None:
        return
    libbpf.tc_detach(index)
    if not tc_filters(ipr, index):
        libbpf.tc_hook_destroy(index)


def _xdp(ipr: IPRoute, entry: Entry) -> None:
    from caplance.dataplane.bpf import libbpf

    index = _index(ipr, entry["ifname"])
    if index is not None:
        libbpf.xdp_detach(index, native=bool(entry.get("native", True)))


def _link(ipr: IPRoute, entry: Entry) -> None:
    quiet_netlink(ipr.link, "del", ifname=entry["ifname"])


def _tun(ipr: IPRoute, entry: Entry) -> None:
    if _index(ipr, entry["ifname"]) is not None:  # a worker that outlived us holds a queue
        try:
            quiet_netlink(ipr.link, "del", ifname=entry["ifname"])
        except NetlinkError as exc:
            raise NetOpsError("remove TUN device", entry["ifname"], str(exc),
                              "stop the process that holds it") from exc


_UNDO: dict[str, Callable[[IPRoute, Entry], None]] = {
    "address": _address, "route": _route, "sysctl": _sysctl, "nft_table": _nft_table, "iptables": _iptables,
    "tc": _tc, "xdp": _xdp, "link": _link, "tun": _tun,
}


def undo_entry(ipr: IPRoute, entry: Entry) -> None:
    """Undo the change ``entry`` records. Raises :class:`NetOpsError` (or the netlink error)
    if it cannot; an unknown kind (a journal of a newer Caplance) is a ``NetOpsError``."""
    undo = _UNDO.get(entry.get("kind", ""))
    if undo is None:
        raise NetOpsError("undo", describe(entry), "unknown kind of change")
    undo(ipr, entry)


def describe(entry: Entry) -> str:
    """The undo of ``entry``, in words."""
    kind = entry.get("kind")
    if kind == "address":
        return f"remove address {entry['address']}/{entry['prefixlen']} from {entry['ifname']}"
    if kind == "route":
        return f"remove route {entry['dst']} {'dev ' + entry['ifname'] if entry.get('ifname') else 'blackhole'}"
    if kind == "sysctl":
        return f"restore sysctl {entry['name']}={entry['old']}"
    if kind == "nft_table":
        return f"delete nftables table {entry['family']} {entry['table']}"
    if kind == "iptables":
        return f"delete {entry['command']} chain {entry['table']}/{entry['chain']}"
    if kind in ("tc", "xdp"):
        return f"detach the {kind} program from {entry['ifname']}"
    if kind in ("link", "tun"):
        return f"remove {'GRE' if kind == 'link' else 'TUN'} device {entry['ifname']}"
    return f"undo {kind} {entry}"
