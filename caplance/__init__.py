"""Caplance: a software layer-4 load balancer on trio.

A :class:`Balancer` takes whole IP packets sent to a VIP, picks a backend by consistent
hashing of the flow (Maglev by default), encapsulates the packet and sends it to that
backend, where an :class:`Agent` injects it into the local stack; the backend answers the
client directly (direct server return).
"""

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
from caplance.errors import CaplanceError, ConfigError, MalformedPacket, NetOpsError, PluginError
from caplance.interfaces import (
    Listener,
    PacketSender,
    PacketSource,
    Selector,
    SelectorFactory,
    Transport,
)

__all__ = [
    "Agent",
    "AgentConfig",
    "BackendConfig",
    "Balancer",
    "BalancerConfig",
    "CaplanceError",
    "ConfigError",
    "Listener",
    "ListenerConfig",
    "MalformedPacket",
    "NetOpsError",
    "PacketSender",
    "PacketSource",
    "PluginConfig",
    "PluginError",
    "Selector",
    "SelectorFactory",
    "Transport",
    "VipConfig",
]
