"""Network namespaces for a lab: a switch, a client, a balancer and N backends.

Layout (every name carries the lab's unique tag, so two labs never collide)::

    client 10.77.0.10 ──┐
    lb     10.77.0.2  ──┤
    lbK    10.77.0.K  ──┼── br0 (in namespace <tag>-sw)      (K = 2..: extra balancers)
    beK    10.77.0.1K ──┘

With ``router=True`` the client sits on a network of its own behind a router, which learns
the VIPs by BGP from the balancers and spreads them by ECMP (see :mod:`caplance.lab.routing`)::

    client 10.78.0.10 ── br1 ── router 10.78.0.1 / 10.77.0.1 ── br0 ── lb, lbK, beK

IPv6: fd77::10, fd77::2, fd77::1K on the same link. The client routes the VIPs
(10.99.0.1, fd99::1) via the balancer ``lb`` (:meth:`Lab.route_vips_via` switches). The client's link has MTU ``client_mtu``; the
balancer's and backends' links have ``backend_mtu`` (headroom for encapsulation).

The lab uses the ``ip`` command (iproute2); it is test scaffolding, not the balancer.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import tomli_w

from caplance import journal
from caplance.lab.signals import ignoring_interrupts, restore_sigterm, take_sigterm

__all__ = ["LAB_NETWORK4", "VIP4", "VIP6", "Lab", "LabHost"]

VIP4 = ipaddress.IPv4Address("10.99.0.1")
VIP6 = ipaddress.IPv6Address("fd99::1")
#: the lab's IPv4 network of balancers and backends (a balancer's ``allowed_networks``)
LAB_NETWORK4 = ipaddress.IPv4Network("10.77.0.0/24")

#: the sysctls :meth:`Lab.listing` shows: those the balancer and the agent set, and those the
#: kernel changes with them (``ip_forward`` turns ``accept_redirects`` off)
_SYSCTLS = (r"^net\.ipv4\.ip_forward$|^net\.ipv[46]\.conf\.[^.]+\."
            r"(forwarding|accept_redirects|send_redirects|rp_filter|arp_ignore|arp_announce)$")


@attrs.frozen
class LabHost:
    role: str
    netns: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    mtu: int
    #: the switch's bridge its eth0 is on
    bridge: str = "br0"


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Lab:
    """Create with ``with Lab(backends=3) as lab:``; everything is removed on exit."""

    def __init__(self, *, backends: int = 3, balancers: int = 1, client_mtu: int = 1500,
                 backend_mtu: int = 1600, client_offloads: bool = True, tag: str | None = None,
                 router: bool = False) -> None:
        self.tag = tag or "cl" + secrets.token_hex(3)
        self.switch = f"{self.tag}-sw"
        self.client_offloads = client_offloads
        self.router = router
        self.hosts: dict[str, LabHost] = {}
        net = "78" if router else "77"
        plan = [("client", net, 10, client_mtu), ("lb", "77", 2, backend_mtu)]
        plan += [(f"lb{k}", "77", 1 + k, backend_mtu) for k in range(2, balancers + 1)]
        plan += [(f"be{k}", "77", 10 + k, backend_mtu) for k in range(1, backends + 1)]
        if router:
            plan.append(("router", "77", 1, backend_mtu))
        for role, network, number, mtu in plan:
            self.hosts[role] = LabHost(
                role=role, netns=f"{self.tag}-{role}",
                ipv4=ipaddress.IPv4Address(f"10.{network}.0.{number}"),
                ipv6=ipaddress.IPv6Address(f"fd{network}::{number}"), mtu=mtu,
                bridge="br1" if network == "78" else "br0",
            )
        self._created: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self._processes: list[subprocess.Popen[Any]] = []
        self._previous_sigterm: Any = None

    def route_vips_via(self, role: str) -> None:
        """Point the client's routes for the VIPs at balancer ``role``."""
        host = self.hosts[role]
        self.run("client", "ip", "route", "replace", f"{VIP4}/32", "via", str(host.ipv4))
        self.run("client", "ip", "-6", "route", "replace", f"{VIP6}/128", "via", str(host.ipv6))

    @property
    def backends(self) -> list[LabHost]:
        return [host for role, host in self.hosts.items() if role.startswith("be")]

    @property
    def balancers(self) -> list[LabHost]:
        return [host for role, host in self.hosts.items() if role.startswith("lb")]

    def __enter__(self) -> Lab:
        """Create the lab. Until :meth:`__exit__`, SIGTERM stops the program as Ctrl-C does
        (a ``KeyboardInterrupt``, delivered by trio inside ``trio.run``), so ``timeout`` or a
        service manager stopping it removes the lab too (main thread only; see
        :mod:`caplance.lab.signals`)."""
        self._previous_sigterm = take_sigterm()
        try:
            self.create()
        except BaseException:
            self.destroy()
            restore_sigterm(self._previous_sigterm)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.destroy()
        finally:
            restore_sigterm(self._previous_sigterm)

    def create(self) -> None:
        self._add_netns(self.switch)
        sw = ["ip", "-n", self.switch]
        for bridge in ("br0", "br1") if self.router else ("br0",):
            _run(sw + ["link", "add", bridge, "type", "bridge", "mcast_snooping", "0"])
            _run(sw + ["link", "set", bridge, "up"])
        for host in self.hosts.values():
            self._add_netns(host.netns)
            ns = ["ip", "-n", host.netns]
            _run(sw + ["link", "add", host.role, "mtu", str(host.mtu), "type", "veth",
                       "peer", "name", "eth0", "mtu", str(host.mtu), "netns", host.netns])
            _run(sw + ["link", "set", host.role, "master", host.bridge, "up"])
            # No ICMP redirects: a router (the kernel row of a bench, a fallback route) would
            # otherwise teach the client to reach the VIP around the balancer for minutes.
            for name in ("net.ipv4.conf.all.send_redirects", "net.ipv4.conf.default.send_redirects",
                         "net.ipv4.conf.all.accept_redirects", "net.ipv4.conf.default.accept_redirects",
                         "net.ipv6.conf.all.accept_redirects", "net.ipv6.conf.default.accept_redirects"):
                self.sysctl(host.role, name, "0")
            self.sysctl(host.role, "net.ipv6.conf.all.accept_dad", "0")
            self.sysctl(host.role, "net.ipv6.conf.default.accept_dad", "0")
            self.sysctl(host.role, "net.ipv6.conf.eth0.accept_dad", "0")
            _run(ns + ["link", "set", "lo", "up"])
            _run(ns + ["link", "set", "eth0", "up"])
            _run(ns + ["addr", "add", f"{host.ipv4}/24", "dev", "eth0"])
            _run(ns + ["-6", "addr", "add", f"{host.ipv6}/64", "dev", "eth0", "nodad"])
        client, lb = self.hosts["client"], self.hosts["lb"]
        if self.router:
            from caplance.lab.routing import connect_router

            connect_router(self)
        else:
            _run(["ip", "-n", client.netns, "route", "add", f"{VIP4}/32", "via", str(lb.ipv4)])
            _run(["ip", "-n", client.netns, "-6", "route", "add", f"{VIP6}/128", "via", str(lb.ipv6)])
        if not self.client_offloads:
            self.run("client", "ethtool", "-K", "eth0", "tso", "off", "gso", "off", "tx", "off")

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)

    def destroy(self) -> None:
        """Stop every process in the lab's namespaces and delete them. Never raises; SIGINT
        and SIGTERM are ignored while it runs (in the main thread), so a second Ctrl-C or
        SIGTERM cannot leave half a lab."""
        with ignoring_interrupts():
            self._destroy()

    def _destroy(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self._processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self._processes.clear()
        for name in reversed(self._created):
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            self.forget_journals(name)
            for _ in range(3):
                if _run(["ip", "netns", "del", name], check=False).returncode == 0:
                    break
                time.sleep(0.2)
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- running things in hosts ---------------------------------------------------------

    def command(self, role: str, *argv: str) -> list[str]:
        """``argv`` wrapped to run inside host ``role``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[role].netns, *argv]

    def run_switch(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the switch namespace (where the bridge and the hosts' peers are)."""
        return _run(["ip", "netns", "exec", self.switch, *argv], check=check, input=input)

    def run(self, role: str, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self.command(role, *argv), check=check, input=input)

    def spawn(self, role: str, *argv: str, **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in host ``role``; the lab stops it (SIGTERM, then SIGKILL) on exit."""
        process = subprocess.Popen(self.command(role, *argv), **popen)
        self._processes.append(process)
        return process

    def start(self, role: str, *argv: str, timeout: float = 20,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``role`` and wait until it prints a line "ready" on stdout.

        Raises ``RuntimeError`` with its stderr if it exits or stays silent for ``timeout``
        seconds."""
        process = self.spawn(role, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert process.stdout is not None
        seen = b""
        fd = process.stdout.fileno()
        while b"ready\n" not in seen:
            readable, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if readable else b""
            if not chunk:
                process.kill()
                _, err = process.communicate()
                raise RuntimeError(f"{' '.join(argv)} in {role} did not get ready: {err.decode()[-2000:]}")
            seen += chunk
        return process

    @staticmethod
    def stop(process: subprocess.Popen[bytes], *, timeout: float = 20) -> dict[str, Any]:
        """SIGTERM a process from :meth:`start`, wait, return the last JSON object it printed
        on stdout (``{}`` if none). Raises ``RuntimeError`` if it exits non-zero."""
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(f"exit {process.returncode}: {err.decode()[-2000:]}")
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        return dict(json.loads(lines[-1])) if lines else {}

    def xdp_peer(self, role: str) -> None:
        """Attach a pass-everything XDP program to the switch's end of host ``role``'s veth:
        native XDP on a veth sends frames out (``XDP_TX``) only when its peer has a program
        too. Removed with the switch namespace."""
        program = Path(__file__).with_name("xdp_pass.bpf.o")
        self.run_switch("ip", "link", "set", "dev", role, "xdpdrv", "obj", str(program), "sec", "xdp")

    def write_config(self, name: str, data: dict[str, Any]) -> str:
        """Write ``data`` as TOML file ``name`` in the lab's work directory; return its path."""
        path = self.workdir / f"{name}.toml"
        path.write_bytes(tomli_w.dumps(data).encode())
        return str(path)

    @staticmethod
    def forget_journals(netns: str) -> None:
        """Delete the journals of host changes (:mod:`caplance.journal`) of namespace
        ``netns``, which is being deleted: a namespace made later may get its inode, and
        its first balancer would then undo changes made elsewhere."""
        try:
            inode = os.stat(f"/run/netns/{netns}").st_ino
        except OSError:
            return
        journal.forget_netns(inode)

    def sysctl(self, role: str, name: str, value: str) -> None:
        self.run(role, "sysctl", "-q", "-w", f"{name}={value}")

    def listing(self, role: str) -> str:
        """Links (an attached XDP program shows there), addresses, routes (v4 and v6), the
        nftables ruleset, tc qdiscs, eth0's tc filters and the sysctls the balancer and the
        agent touch (``_SYSCTLS``) of a host, for comparing before and after."""
        parts = [
            self.run(role, "ip", "-o", "link", "show").stdout,
            self.run(role, "ip", "-o", "addr", "show").stdout,
            self.run(role, "ip", "route", "show", "table", "all").stdout,
            self.run(role, "ip", "-6", "route", "show", "table", "all").stdout,
            self.run(role, "nft", "list", "ruleset").stdout,
            self.run(role, "tc", "qdisc", "show").stdout,
            self.run(role, "tc", "filter", "show", "dev", "eth0", "ingress").stdout,
            self.run(role, "sysctl", "-a", "-r", _SYSCTLS, check=False).stdout,
        ]
        return "\n".join(parts)
