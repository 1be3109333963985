"""Configuration: frozen attrs classes and one cattrs converter. Pure: no sockets, no trio.

A TOML file describes a balancer or an agent; :func:`load_balancer_config` and
:func:`load_agent_config` read one, and raise :class:`~caplance.errors.ConfigError` listing
every problem with its path (``$.vips[0].ports[1]``).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from caplance.errors import ConfigError
from caplance.packet import IPAddress

__all__ = [
    "AgentConfig",
    "BackendConfig",
    "BalancerConfig",
    "IPAddress",
    "ListenerConfig",
    "PluginConfig",
    "VipConfig",
    "converter",
    "load_agent_config",
    "load_balancer_config",
    "structure",
]

T = TypeVar("T")


def to_ip(value: object) -> IPAddress:
    """An address from a string (or an address, unchanged). Raises ``ValueError``."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address string, got {value!r}")
    return ipaddress.ip_address(value)


def _ip_tuple(values: object) -> tuple[IPAddress, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"expected a list of IP addresses, got {values!r}")
    return tuple(to_ip(value) for value in values)


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected an int from 1 to 65535, got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"expected a number > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")


def _non_empty(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value:
        raise ValueError("must not be empty")


def _ifname(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= 15:
        raise ValueError(f"an interface name has 1 to 15 characters, got {value!r}")


@attrs.frozen(kw_only=True)
class PluginConfig:
    """A selector or transport: its registered name and the options passed to it."""

    name: str = attrs.field(validator=_non_empty)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)


@attrs.frozen(kw_only=True)
class BackendConfig:
    """A backend of a VIP: where its agent listens and how to reach it."""

    name: str = attrs.field(validator=_non_empty)
    address: IPAddress = attrs.field(converter=to_ip)
    weight: int = attrs.field(default=1, validator=_non_negative)
    transport: PluginConfig = attrs.field(factory=lambda: PluginConfig(name="udp"))


@attrs.frozen(kw_only=True)
class VipConfig:
    """A virtual IP: which traffic it takes and the backends that serve it.

    ``protocol`` ``"any"`` takes every protocol; ``ports`` empty takes every port. ICMP for
    the VIP (echo, and errors about its flows) is always taken.
    """

    address: IPAddress = attrs.field(converter=to_ip)
    protocol: Literal["tcp", "udp", "any"] = "tcp"
    ports: tuple[int, ...] = attrs.field(default=(), validator=attrs.validators.deep_iterable(_port))
    selector: PluginConfig = attrs.field(factory=lambda: PluginConfig(name="maglev"))
    backends: tuple[BackendConfig, ...] = ()

    def __attrs_post_init__(self) -> None:
        names = [backend.name for backend in self.backends]
        if len(names) != len(set(names)):
            raise ValueError(f"backend names must be unique within a VIP, got {names}")


@attrs.frozen(kw_only=True)
class ListenerConfig:
    """How packets for the VIPs reach the balancer: ``tun`` (default), ``raw`` or ``packet``."""

    kind: Literal["tun", "raw", "packet"] = "tun"
    interface: str | None = attrs.field(default=None, validator=_ifname)
    device: str = attrs.field(default="caplance0", validator=_ifname)


@attrs.frozen(kw_only=True)
class BalancerConfig:
    """One balancer: its VIPs, its listener and how it stops (seconds)."""

    vips: tuple[VipConfig, ...] = attrs.field(validator=_non_empty)
    listener: ListenerConfig = attrs.field(factory=ListenerConfig)
    drain_timeout: float = attrs.field(default=10.0, validator=_positive)
    drain_idle: float = attrs.field(default=1.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        addresses = [vip.address for vip in self.vips]
        if len(addresses) != len(set(addresses)):
            raise ValueError("each VIP address may appear once")


@attrs.frozen(kw_only=True)
class AgentConfig:
    """One backend's agent: its VIPs, where it receives encapsulated packets, how it injects.

    ``balancers``: the only sources it accepts encapsulated packets from (empty: any, which
    lets anyone who can reach the data port put packets into this host's stack).
    ``inject``: ``raw`` (an IPPROTO_RAW socket; works with strict rp_filter) or ``tun``
    (a TUN device ``tun_device`` with address ``tun_address``; the agent sets loose
    rp_filter on it).
    """

    name: str = attrs.field(validator=_non_empty)
    vips: tuple[IPAddress, ...] = attrs.field(converter=_ip_tuple, validator=_non_empty)
    data_address: IPAddress = attrs.field(default=ipaddress.IPv4Address("0.0.0.0"), converter=to_ip)
    transport: PluginConfig = attrs.field(factory=lambda: PluginConfig(name="udp"))
    balancers: tuple[IPAddress, ...] = attrs.field(default=(), converter=_ip_tuple)
    inject: Literal["raw", "tun"] = "raw"
    vip_interface: str = attrs.field(default="lo", validator=_ifname)
    tun_device: str = attrs.field(default="caplance-in", validator=_ifname)
    tun_address: IPAddress = attrs.field(default=ipaddress.IPv4Address("169.254.253.1"), converter=to_ip)


def _structure_ip(value: Any, _: Any) -> IPAddress:
    return to_ip(value)


converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook_func(lambda t: t == IPAddress, _structure_ip)
converter.register_unstructure_hook_func(lambda t: t == IPAddress, str)
converter.register_unstructure_hook(ipaddress.IPv4Address, str)
converter.register_unstructure_hook(ipaddress.IPv6Address, str)


def _problems(exc: BaseException, path: str) -> list[tuple[str, str]]:
    """Flatten a cattrs error tree into ``(path, message)`` pairs."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return [(path, f"unknown key(s): {', '.join(sorted(exc.extra_fields))}")]
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        found: list[tuple[str, str]] = []
        for inner in exc.exceptions:
            note = next(iter(getattr(inner, "__notes__", []) or []), None)
            sub = path
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            if name is not None:
                sub = f"{path}.{name}"
            elif index is not None:
                sub = f"{path}[{index}]"
            found += _problems(inner, sub)
        return found
    if isinstance(exc, KeyError):
        return [(path, "required key missing")]
    return [(path, str(exc))]


def structure(data: Mapping[str, Any], cls: type[T]) -> T:
    """Build ``cls`` from plain data; raise :class:`ConfigError` listing every problem."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        raise ConfigError(_problems(exc, "$")) from exc


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or bad TOML is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([("$", f"cannot read {path}: {exc.strerror or exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("$", f"{path} is not valid TOML: {exc}")]) from exc


def load_balancer_config(path: str | Path) -> BalancerConfig:
    return structure(read_toml(path), BalancerConfig)


def load_agent_config(path: str | Path) -> AgentConfig:
    return structure(read_toml(path), AgentConfig)
