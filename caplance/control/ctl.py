"""``caplance ctl``: operate a running balancer over a local unix socket.

The socket is created with mode 0600 in a directory of mode 0700 (root only) and removed on
stop. One connection carries one ``command`` and gets one ``reply`` (same framing as the
control channel). Commands: ``status``, ``pause NAME``, ``resume NAME``,
``drain NAME [SECONDS]``, ``deregister NAME``, ``release NAME`` (free a backend name held by an
agent), ``fastpath on|off``, ``drain-balancer``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
import logging
import os
import socket
import stat
import time
from typing import Any, Protocol

import trio

from caplance import control_codec as codec
from caplance.control.membership import Membership, MembershipError, State
from caplance.errors import CaplanceError
from caplance.framed import FramedStream, session_error
from caplance.netops import NetOps

__all__ = ["COMMANDS", "Operator", "format_status", "send_command", "serve_ctl"]

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "drain", "deregister", "release", "fastpath", "drain-balancer")
#: refusals ``format_status`` lists (the newest)
SHOWN_REFUSALS = 10
_TIMEOUT = 5.0
#: a status reply lists every backend: allow far more than the control channel's frames
CTL_MAX_FRAME = 16 * 1024 * 1024


class Operator(Protocol):
    """What ``caplance ctl`` needs of the control plane."""

    membership: Membership
    #: control-plane event counters
    counters: collections.Counter[str]

    def status(self) -> dict[str, Any]:
        """The ``status`` reply: ``backends`` (one row each), ``counters`` (the data planes'
        merged), ``control``, ``conntrack`` and ``dataplane``."""
        ...

    def set_state(self, name: str, state: State, reason: str, *, drain_timeout: float | None = None,
                  by_operator: bool = False) -> None: ...

    #: switches the composition offers (``fastpath``: on/off): name -> set it, say what it did
    switches: dict[str, Callable[[bool], str]]

    def release(self, name: str) -> str:
        """Free the backend name ``name`` from the agent that holds it."""
        ...


def _execute(operator: Operator, command: str, args: list[Any]) -> Any:
    if command == "status":
        return operator.status()
    if command == "drain-balancer":
        return operator.switches["stop"](True)
    if command == "fastpath":
        switch = operator.switches.get("fastpath")
        if not args or args[0] not in ("on", "off"):
            raise CaplanceError("usage: fastpath on|off")
        if switch is None:
            raise CaplanceError("this balancer runs no kernel data plane to switch")
        return switch(args[0] == "on")
    if command not in COMMANDS or not args or not isinstance(args[0], str):
        raise CaplanceError(f"usage: {command} NAME")
    name = args[0]
    if command == "release":
        return operator.release(name)
    if operator.membership.get(name).state is State.REGISTERING:
        raise CaplanceError(f"{name} is still registering (its data path is not proven yet)")
    if command == "pause":
        operator.set_state(name, State.PAUSED, "paused by operator")
    elif command == "resume":
        operator.set_state(name, State.ACTIVE, "resumed by operator")
    elif command == "drain":
        timeout = float(args[1]) if len(args) > 1 else None
        if timeout is not None and not 0 <= timeout <= 86400:
            raise CaplanceError(f"drain timeout must be 0 to 86400 seconds, got {args[1]!r}")
        operator.set_state(name, State.DRAINING, "drained by operator", drain_timeout=timeout,
                           by_operator=True)
    else:
        operator.set_state(name, State.GONE, "deregistered by operator", by_operator=True)
    return f"{name}: {operator.membership.get(name).state.value}"


async def serve_ctl(operator: Operator, path: str, netops: NetOps, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``caplance ctl`` on the unix socket ``path`` until cancelled."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _remove_stale(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise CaplanceError(f"cannot bind the ctl socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    netops.push_undo(f"remove ctl socket {path}", functools.partial(_remove, path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(functools.partial(_ctl_session, operator), [listener])


def _remove_stale(path: str) -> None:
    """Remove a socket file left by a balancer that did not stop cleanly; refuse to take
    over one a running balancer still answers on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise CaplanceError(f"the ctl socket path {path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise CaplanceError(f"another balancer answers on {path}; set control_socket to another path")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def _ctl_session(operator: Operator, stream: trio.SocketStream) -> None:
    framed = FramedStream(stream, CTL_MAX_FRAME)
    async with stream:
        try:
            with trio.fail_after(_TIMEOUT):
                msg = await framed.expect("command")
                try:
                    result = _execute(operator, msg["command"], msg["args"])
                    reply = codec.message("reply", ok=True, result=result)
                except (CaplanceError, MembershipError, ValueError) as exc:
                    reply = codec.message("reply", ok=False, result=str(exc))
                await framed.send(reply)
        except BaseException as raised:
            error = session_error(raised)
            operator.counters["ctl_errors"] += 1
            log.warning("ctl connection failed", extra={"error": repr(error)})


async def send_command(path: str, command: str, args: list[Any]) -> Any:
    """Send one command to the balancer at ``path``; its result, or :class:`CaplanceError`."""
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise CaplanceError(f"cannot reach the balancer at {path}: {exc.strerror or exc}"
                            " (is it running? are you root?)") from exc
    async with stream:
        framed = FramedStream(stream, CTL_MAX_FRAME)
        try:
            with trio.fail_after(_TIMEOUT):
                await framed.send(codec.message("command", command=command, args=args))
                reply = await framed.expect("reply")
        except (trio.TooSlowError, trio.BrokenResourceError, codec.ProtocolError, OSError) as exc:
            raise CaplanceError(f"no answer from the balancer at {path}: {exc!r}") from exc
    if not reply["ok"]:
        raise CaplanceError(str(reply["result"]))
    return reply["result"]


def format_status(result: dict[str, Any]) -> str:
    """The ``status`` table, then the counters: each appears once."""
    header = ("backend", "address", "state", "weight", "health", "packets", "bytes", "heartbeat")
    lines = [header]
    for row in result["backends"]:
        beat = "static" if row["static"] else (
            "-" if row["last_heartbeat"] is None else f"{row['last_heartbeat']}s ago")
        weight = f"{row['effective_weight']}/{row['weight']}"
        lines.append((row["backend"], row["address"], row["state"], weight, row["health"],
                      str(row["packets"]), str(row["bytes"]), beat))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    counters = result["counters"]
    out.append("")
    out.append(f"packets in: {counters.get('packets_in', 0)}  dropped: {counters.get('dropped') or 0}")
    for name in ("control", "conntrack", "dataplane", "fastpath"):
        if result.get(name):
            out.append(f"{name}: {result[name]}")
    announcements = result.get("announcements") or {}
    for vip, state in (announcements.get("vips") or {}).items():
        verdict = "announced" if state["announced"] else "not announced"
        out.append(f"VIP {vip}: {verdict} by {announcements['announcer']} ({state['reason']})")
    if announcements.get("speaker"):
        out.append(f"speaker: {announcements['speaker']}")
    refusals = result.get("refusals") or {}
    if refusals.get("total"):
        out.append("refusals: " + ", ".join(f"{reason} {count}" for reason, count in refusals["total"].items()))
    for seen in (refusals.get("recent") or [])[:SHOWN_REFUSALS]:
        out.append(f"refused: {seen['address']} {seen['reason']} x{seen['count']} (last {seen['last_seen']}s ago)")
    out.append(f"as of {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return "\n".join(out)
