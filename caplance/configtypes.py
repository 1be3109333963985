"""Checked value types of the configuration: one check each, used by cattrs (files and the
environment) and by attrs validators (the library). Pure."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any, Literal, NewType

import attrs

from caplance.packet import IPAddress

__all__ = [
    "Count", "Endpoint", "IPAddress", "IPNetwork", "IfName", "MAX_WEIGHT", "MAX_WORKERS", "Name", "Port",
    "Secret", "Seconds", "Weight", "WorkerCount", "check_count", "check_http_url", "check_ifname",
    "check_name", "check_port", "check_seconds", "check_weight", "check_workers", "to_ip", "to_network",
]

Port = NewType("Port", int)
Seconds = NewType("Seconds", float)
Weight = NewType("Weight", int)
Count = NewType("Count", int)
Name = NewType("Name", str)
IfName = NewType("IfName", str)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _got(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _int_in(value: object, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"expected an int {span}, got {_got(value)}")
    return value


def check_port(value: object) -> Port:
    return Port(_int_in(value, 1, 65535))


#: the largest weight: enough for any ratio, small enough that every selector can build
MAX_WEIGHT = 65535


def check_weight(value: object) -> Weight:
    return Weight(_int_in(value, 0, MAX_WEIGHT))


def check_count(value: object) -> Count:
    return Count(_int_in(value, 1, None))


def check_seconds(value: object) -> Seconds:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"expected a number of seconds > 0, got {_got(value)}")
    return Seconds(float(value))


def check_name(value: object) -> Name:
    if not isinstance(value, str) or not value or len(value) > 64 or not value.isprintable():
        raise ValueError(f"expected a name of 1 to 64 printable characters, got {_got(value)}")
    return Name(value)


def check_ifname(value: object) -> IfName:
    if not isinstance(value, str) or not 0 < len(value) <= 15 or "/" in value or " " in value:
        raise ValueError(f"expected an interface name of 1 to 15 characters, got {_got(value)}")
    return IfName(value)


def check_http_url(value: object) -> str:
    """An ``http://host[:port]/path`` URL (what the agent's local check can GET)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is not None and parts.scheme == "http" and parts.hostname:
            parts.port  # noqa: B018 - raises ValueError for a bad port
            return str(value)
    except ValueError:
        pass
    raise ValueError(f'expected an URL such as "http://127.0.0.1:8080/health", got {_got(value)}')


def to_ip(value: object) -> IPAddress:
    """An address from a string (or an address, unchanged). Raises ``ValueError``."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        if isinstance(value, str):
            return ipaddress.ip_address(value)
    except ValueError:
        pass
    raise ValueError(f"expected an IP address, got {_got(value)}")


def to_network(value: object) -> IPNetwork:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    try:
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
    except ValueError:
        pass
    raise ValueError(f"expected an IP network such as \"10.0.0.0/8\", got {_got(value)}")


@attrs.frozen
class Endpoint:
    """A ``host:port`` (``[v6]:port`` for IPv6) address: control and metrics listeners."""

    host: IPAddress
    port: Port

    @classmethod
    def parse(cls, value: object) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        if isinstance(value, str) and ":" in value:
            host, _, port = value.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            try:
                return cls(ipaddress.ip_address(host), check_port(int(port)))
            except ValueError:
                pass
        raise ValueError(f'expected "address:port" (IPv6: "[address]:port"), got {_got(value)}')

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.host.version == 6 else f"{self.host}:{self.port}"


@attrs.frozen(repr=False)
class Secret:
    """The shared secret. Never shown: ``repr``/``str`` print ``***``."""

    value: bytes = attrs.field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def _v(check: Callable[[object], Any]) -> Callable[[Any, Any, Any], None]:
    """An attrs validator from a check function."""
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check(value)
    return validate


def _each(check: Callable[[object], Any]) -> Callable[[Any, Any, Any], None]:
    def validate(instance: Any, attribute: Any, values: Any) -> None:
        for value in values:
            check(value)
    return validate


def _optional_endpoint(value: object) -> Endpoint | None:
    return None if value is None else Endpoint.parse(value)


def _endpoints(values: object) -> tuple[Endpoint, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f'expected a list of "address:port", got {_got(values)}')
    return tuple(Endpoint.parse(value) for value in values)


def _ips(values: object) -> tuple[IPAddress, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"expected a list of IP addresses, got {_got(values)}")
    return tuple(to_ip(value) for value in values)


def _networks(values: object) -> tuple[IPNetwork, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"expected a list of IP networks, got {_got(values)}")
    return tuple(to_network(value) for value in values)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


#: ``workers``: a number of processes, or ``"auto"`` (one per CPU)
WorkerCount = int | Literal["auto"]
#: the most data-plane worker processes a balancer runs
MAX_WORKERS = 64


def check_workers(value: object) -> WorkerCount:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f'expected an int from 1 to {MAX_WORKERS} or "auto", got {_got(value)}')
    return value
