"""Listeners: ways to get whole IP packets for the VIPs onto the balancer.

``tun`` (default), ``raw`` and ``packet``; see each module for how it keeps the balancer's
own stack from answering the VIP.
"""

from __future__ import annotations

from caplance.interfaces import Listener
from caplance.listeners.packet import PacketListener
from caplance.listeners.raw import RawListener
from caplance.listeners.tun import TunListener

__all__ = ["LISTENERS", "make_listener"]

LISTENERS = ("tun", "raw", "packet")


def make_listener(kind: str, *, interface: str | None = None, device: str = "caplance0") -> Listener:
    """The listener named ``kind``; ``interface`` for raw (default lo) and packet, ``device``
    the TUN device name. Raises ``ValueError`` for an unknown kind."""
    if kind == "tun":
        return TunListener(device=device)
    if kind == "raw":
        return RawListener(interface=interface or "lo")
    if kind == "packet":
        if interface is None:
            raise ValueError("listener 'packet' needs an interface (the one clients' packets arrive on)")
        return PacketListener(interface=interface)
    raise ValueError(f"unknown listener {kind!r}; choose one of {', '.join(LISTENERS)}")
