"""Caplance: a software layer-4 load balancer on trio.

A :class:`Balancer` takes whole IP packets sent to a VIP, picks a backend by consistent
hashing of the flow (Maglev by default), encapsulates the packet and sends it to that
backend, where an :class:`Agent` injects it into the local stack; the backend answers the
client directly (direct server return).

Names are imported on first use, so ``import caplance.strategies.maglev`` (or a plugin's
``import caplance.testing``) does not pull in trio, sockets and netlink.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caplance.agent import Agent
    from caplance.balancer import Balancer
    from caplance.config import (
        AgentConfig,
        BackendConfig,
        BalancerConfig,
        ListenerConfig,
        PluginConfig,
        VipConfig,
    )
    from caplance.control.plane import ControlPlane
    from caplance.dataplane import DataPlane
    from caplance.errors import (
        CaplanceError,
        ConfigError,
        MalformedPacket,
        NetOpsError,
        PluginError,
    )
    from caplance.forwarding import BackendEntry, ForwardingTable, LookupTable, VipEntry
    from caplance.interfaces import (
        Listener,
        PacketSender,
        PacketSource,
        Selector,
        SelectorFactory,
        TableSelector,
        Transport,
    )

_EXPORTS = {
    "Agent": "caplance.agent",
    "Balancer": "caplance.balancer",
    "ControlPlane": "caplance.control.plane",
    "DataPlane": "caplance.dataplane",
    "BackendEntry": "caplance.forwarding",
    "ForwardingTable": "caplance.forwarding",
    "LookupTable": "caplance.forwarding",
    "VipEntry": "caplance.forwarding",
    "AgentConfig": "caplance.config",
    "BackendConfig": "caplance.config",
    "BalancerConfig": "caplance.config",
    "ListenerConfig": "caplance.config",
    "PluginConfig": "caplance.config",
    "VipConfig": "caplance.config",
    "CaplanceError": "caplance.errors",
    "ConfigError": "caplance.errors",
    "MalformedPacket": "caplance.errors",
    "NetOpsError": "caplance.errors",
    "PluginError": "caplance.errors",
    "Listener": "caplance.interfaces",
    "PacketSender": "caplance.interfaces",
    "PacketSource": "caplance.interfaces",
    "Selector": "caplance.interfaces",
    "SelectorFactory": "caplance.interfaces",
    "TableSelector": "caplance.interfaces",
    "Transport": "caplance.interfaces",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'caplance' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
