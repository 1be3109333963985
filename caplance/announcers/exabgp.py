"""Announcer ``exabgp``: ExaBGP (from PyPI) as the BGP speaker, driven through its process API.

The balancer starts ``exabgp`` with a configuration of its own making: the BGP peers, and one
API process -- ``python -m caplance.announcers.relay SOCKET`` -- that ExaBGP runs and talks to
on its stdin/stdout; the relay connects back to the balancer on a unix socket and carries the
lines both ways. The balancer sends ``announce route VIP/32 next-hop self`` and ``withdraw
route ...`` and reads ExaBGP's acknowledgement of each (``done`` or ``error``) before the
next, so the pipe never fills; ExaBGP's neighbour changes (``neighbor ... up/down``) come
the same way and show in ``ctl status``.

ExaBGP ends when its API process ends: the relay stops it (ExaBGP 5 would go on announcing,
its ``api.terminate`` is about peer errors only), and it is told not to respawn the relay. A
balancer that dies (SIGKILL included) closes the relay's socket, the relay stops ExaBGP, its
BGP sessions close, and the routers withdraw the VIPs at once -- no route is left pointing
at a dead balancer.

Options (``[announce] options``): ``peers`` (a list of ``{address, as}`` tables, with
``local_address``, ``hold_time`` per peer if needed), ``local_as``, ``router_id`` (default:
the first peer's local address), ``local_address``, ``communities`` (``["65000:100"]``),
``med``, ``hold_time`` (seconds, default 3), ``exabgp`` (the command, default the one beside
this Python, else on PATH).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from caplance.errors import CaplanceError
from caplance.framed import session_error
from caplance.packet import IPAddress

__all__ = ["ExabgpAnnouncer"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 20.0
_RESTART_DELAY = 1.0


def _as_number(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4294967295:
        raise ValueError(f"exabgp: {what} must be an AS number (1 to 4294967295), got {value!r}")
    return value


def _address(value: object, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"exabgp: {what} must be an IP address, got {value!r}") from None


class ExabgpAnnouncer:
    """Announces VIPs to ``peers`` through an ExaBGP process (see the module docstring)."""

    name = "exabgp"

    def __init__(self, *, peers: Sequence[Mapping[str, Any]], local_as: int, router_id: str | None = None,
                 local_address: str | None = None, communities: Sequence[str] = (), med: int | None = None,
                 hold_time: int = 3, exabgp: str | None = None) -> None:
        if not isinstance(peers, (list, tuple)) or not peers:
            raise ValueError("exabgp: peers must list at least one {address, as} table")
        self.local_as = _as_number(local_as, "local_as")
        self.peers = []
        for number, peer in enumerate(peers):
            if not isinstance(peer, Mapping) or "address" not in peer or "as" not in peer:
                raise ValueError(f"exabgp: peers[{number}] needs address and as")
            self.peers.append({
                "address": _address(peer["address"], f"peers[{number}].address"),
                "as": _as_number(peer["as"], f"peers[{number}].as"),
                "local_address": _address(peer.get("local_address", local_address), f"peers[{number}].local_address")
                if peer.get("local_address", local_address) else None,
                "hold_time": int(peer.get("hold_time", hold_time)),
            })
        for community in communities:
            if not isinstance(community, str) or community.count(":") != 1:
                raise ValueError(f"exabgp: communities are written AS:VALUE, got {community!r}")
        self.communities = tuple(communities)
        if med is not None and (isinstance(med, bool) or not isinstance(med, int) or med < 0):
            raise ValueError(f"exabgp: med must be an int >= 0, got {med!r}")
        self.med = med
        if not 3 <= int(hold_time) <= 65535:
            raise ValueError(f"exabgp: hold_time must be from 3 to 65535 seconds, got {hold_time!r}")
        first_local = self.peers[0]["local_address"]
        self.router_id = router_id or (str(first_local) if first_local else None)
        if self.router_id is None:
            raise ValueError("exabgp: set router_id (or local_address)")
        self.command = exabgp or _find_exabgp()
        self._wanted: dict[IPAddress, bool] = {}
        self._sent: dict[IPAddress, bool] = {}
        self._wake = trio.Event()
        self._neighbours: dict[str, str] = {}
        self.errors = 0
        self.restarts = 0
        #: the running ExaBGP's process id (None between runs)
        self.pid: int | None = None
        self._ready = False

    def announce(self, vip: IPAddress) -> None:
        self._wanted[vip] = True
        self._wake.set()

    def withdraw(self, vip: IPAddress) -> None:
        self._wanted[vip] = False
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {"neighbours": dict(self._neighbours), "announced": sorted(str(v) for v, on in self._sent.items() if on),
                "errors": self.errors, "restarts": self.restarts, "pid": self.pid}

    def _route(self, vip: IPAddress) -> str:
        route = f"route {vip}/{vip.max_prefixlen} next-hop self"
        if self.communities:
            route += " community [ " + " ".join(self.communities) + " ]"
        if self.med is not None:
            route += f" med {self.med}"
        return route

    def configuration(self, relay: Sequence[str]) -> str:
        """ExaBGP's configuration: the API process ``relay`` and one neighbour per peer."""
        lines = ["process caplance {", f"    run {' '.join(relay)};", "    encoder text;", "}"]
        for peer in self.peers:
            families = "ipv6 unicast;" if ":" in str(peer["address"]) else "ipv4 unicast;"
            lines += [f"neighbor {peer['address']} {{", f"    router-id {self.router_id};",
                      f"    local-as {self.local_as};", f"    peer-as {peer['as']};",
                      f"    hold-time {peer['hold_time']};"]
            if peer["local_address"] is not None:
                lines.append(f"    local-address {peer['local_address']};")
            lines += [f"    family {{ {families} }}", "    api { processes [ caplance ]; neighbor-changes; }", "}"]
        return "\n".join(lines) + "\n"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ExaBGP until cancelled; one that exits (its VIPs are then withdrawn by the
        routers) is started again and told what to announce. The first start failing is an
        error."""
        while True:
            try:
                await self._incarnation(None if self._ready else task_status)
            except CaplanceError as exc:
                if not self._ready:
                    raise
                self.restarts += 1
                log.error("ExaBGP lost; starting it again", extra={"error": str(exc), "restarts": self.restarts})
            self._sent.clear()  # a new ExaBGP announces nothing until told
            self._neighbours.clear()
            self._wake.set()
            await trio.sleep(_RESTART_DELAY)

    async def _incarnation(self, task_status: trio.TaskStatus[None] | None) -> None:
        with tempfile.TemporaryDirectory(prefix="caplance-exabgp-") as workdir:
            socket_path = os.path.join(workdir, "api.sock")
            listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await listener.bind(socket_path)
            listener.listen(1)
            config = Path(workdir) / "exabgp.conf"
            config.write_text(self.configuration([sys.executable, "-m", "caplance.announcers.relay", socket_path]))
            env = {**os.environ, "exabgp.daemon.user": "root", "exabgp.daemon.drop": "false",
                   "exabgp.api.ack": "true", "exabgp.api.cli": "false", "exabgp.api.respawn": "false",
                   "exabgp.log.destination": "stderr", "exabgp.log.level": "ERROR",
                   "exabgp.daemon.daemonize": "false"}
            try:
                process = await trio.lowlevel.open_process([self.command, str(config)], env=env,
                                                           stdin=subprocess.DEVNULL)
            except OSError as exc:
                listener.close()
                raise CaplanceError(f"cannot start ExaBGP ({self.command}): {exc.strerror or exc}") from exc
            try:
                with trio.fail_after(_START_TIMEOUT):
                    connection, _ = await listener.accept()
                stream = trio.SocketStream(connection)
                log.info("ExaBGP started", extra={"pid": process.pid, "peers": [str(p["address"]) for p in self.peers]})
                self.pid = process.pid
                if task_status is not None:
                    task_status.started()
                    self._ready = True
                async with trio.open_nursery() as nursery:
                    acks: trio.MemorySendChannel[str]
                    acks, ack_stream = trio.open_memory_channel[str](16)
                    nursery.start_soon(self._read, stream, acks)
                    nursery.start_soon(self._watch, process)
                    await self._write(stream, ack_stream)
            except trio.TooSlowError:
                raise CaplanceError(f"ExaBGP ({self.command}) did not start its API process in time") from None
            except BaseException as raised:
                error = session_error(raised)  # (re-raises cancellation)
                if isinstance(error, CaplanceError):
                    raise error from None
                if isinstance(error, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                    raise CaplanceError(f"ExaBGP's API connection failed: {error!r}") from error
                raise
            finally:
                self.pid = None
                listener.close()
                with trio.move_on_after(5, shield=True):
                    if process.returncode is None:
                        process.terminate()
                        with trio.move_on_after(3):
                            await process.wait()
                    if process.returncode is None:
                        process.kill()
                    await process.wait()

    async def _watch(self, process: trio.Process) -> None:
        await process.wait()
        raise CaplanceError(f"ExaBGP exited (status {process.returncode}): the VIPs are no longer announced")

    async def _write(self, stream: trio.SocketStream, acks: trio.MemoryReceiveChannel[str]) -> None:
        """Send what changed, one command at a time, each acknowledged before the next."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            for vip, wanted in list(self._wanted.items()):
                if self._sent.get(vip, False) == wanted:
                    continue
                command = ("announce " if wanted else "withdraw ") + self._route(vip)
                await stream.send_all(command.encode() + b"\n")
                with trio.fail_after(10):
                    answer = await acks.receive()
                if answer != "done":
                    self.errors += 1
                    log.error("ExaBGP refused a command", extra={"command": command, "answer": answer})
                    continue
                self._sent[vip] = wanted

    async def _read(self, stream: trio.SocketStream, acks: trio.MemorySendChannel[str]) -> None:
        """ExaBGP's lines: acknowledgements (to the writer) and neighbour changes."""
        buffer = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise CaplanceError("ExaBGP's API relay closed")
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text in ("done", "error"):
                    acks.send_nowait(text)
                elif text.startswith("neighbor ") and text.split()[-1] in ("up", "down", "connected"):
                    words = text.split()
                    self._neighbours[words[1]] = words[-1]
                    log.info("BGP neighbour changed", extra={"neighbour": words[1], "state": words[-1]})


def _find_exabgp() -> str:
    beside = Path(sys.executable).with_name("exabgp")
    if beside.exists():
        return str(beside)
    found = shutil.which("exabgp")
    if found is None:
        raise ValueError("exabgp: the exabgp command is not installed (pip install exabgp)")
    return found
