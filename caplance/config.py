"""Configuration: frozen attrs classes and one cattrs converter. Pure: no sockets, no trio.

A TOML file describes a balancer (:class:`BalancerConfig`) or an agent (:class:`AgentConfig`).
Every key can be overridden by an environment variable: ``CAPLANCE_`` + the key's path in
upper case, path parts joined by ``__`` and list items by their index::

    CAPLANCE_DRAIN_TIMEOUT=5               -> drain_timeout = 5
    CAPLANCE_LISTENER__KIND=raw            -> [listener] kind = "raw"
    CAPLANCE_VIPS__0__PORTS=[80, 443]      -> vips[0].ports = [80, 443]

Values are read as TOML values (``5``, ``"x"``, ``[80, 443]``, ``true``, ``{ seed = 7 }``);
anything that is not valid TOML is taken as a string, and so is any value for a field that
is written as a string (names, addresses, ``kind``): ``CAPLANCE_LISTENER__DEVICE=1234`` names
the device ``"1234"``. Each path is checked against the config classes (an unknown key is an
error naming the variable); a table the file lacks starts from the field's default, and an
item number one past the end of a list appends an item. Keys below a plugin's ``options``
are free (and lower case). The shared secret comes only from ``CAPLANCE_SECRET`` or the
file named by ``secret_file`` -- never from the TOML file itself -- and is never printed.

:func:`load_balancer_config` / :func:`load_agent_config` raise
:class:`~caplance.errors.ConfigError` listing every problem with its path and value
(``@ $.vips[0].ports[1]: expected an int from 1 to 65535, got "http"``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NewType, TypeVar

import attrs
import cattrs
import cattrs.gen
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from caplance.errors import ConfigError
from caplance.packet import IPAddress

__all__ = [
    "IPAddress",
    "Endpoint",
    "Secret",
    "PluginConfig",
    "BackendConfig",
    "HealthCheckConfig",
    "VipConfig",
    "ListenerConfig",
    "ConntrackConfig",
    "BalancerConfig",
    "LocalCheckConfig",
    "AgentConfig",
    "converter",
    "structure",
    "unstructure",
    "apply_environment",
    "load_balancer_config",
    "load_agent_config",
    "ENV_PREFIX",
    "SECRET_ENV",
]

T = TypeVar("T")
ENV_PREFIX = "CAPLANCE_"
SECRET_ENV = "CAPLANCE_SECRET"

# -- checked value types: one check each, used by cattrs (files, env) and attrs (library) ----

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


# -- the classes ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PluginConfig:
    """A selector or transport: its registered name and the options passed to it."""

    name: Name = attrs.field(validator=_v(check_name), metadata=_doc("registered plugin name"))
    options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=dict, metadata=_doc("keyword options for the plugin")
    )


def _udp() -> PluginConfig:
    return PluginConfig(name=Name("udp"))


def _maglev() -> PluginConfig:
    return PluginConfig(name=Name("maglev"))


@attrs.frozen(kw_only=True)
class BackendConfig:
    """A static backend of a VIP (agents that register add theirs at run time)."""

    name: Name = attrs.field(validator=_v(check_name), metadata=_doc("unique within the VIP"))
    address: IPAddress = attrs.field(converter=to_ip, metadata=_doc("where its agent receives encapsulated packets"))
    weight: Weight = attrs.field(default=Weight(1), validator=_v(check_weight),
                                 metadata=_doc("share of new flows; 0 = no new flows"))
    transport: PluginConfig = attrs.field(factory=_udp, metadata=_doc("encapsulation to this backend"))


@attrs.frozen(kw_only=True)
class HealthCheckConfig:
    """Active health checks the balancer runs against each backend's real address."""

    kind: Literal["tcp", "http"] = attrs.field(default="tcp", metadata=_doc("TCP connect or HTTP GET"))
    port: Port = attrs.field(validator=_v(check_port), metadata=_doc("service port on the backend"))
    path: str = attrs.field(default="/", metadata=_doc("HTTP path (kind = http)"))
    interval: Seconds = attrs.field(default=Seconds(2.0), validator=_v(check_seconds), metadata=_doc("seconds between checks"))
    timeout: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("seconds per check"))
    rise: Count = attrs.field(default=Count(2), validator=_v(check_count), metadata=_doc("passes to become healthy"))
    fall: Count = attrs.field(default=Count(3), validator=_v(check_count), metadata=_doc("failures to become unhealthy"))


@attrs.frozen(kw_only=True)
class VipConfig:
    """A virtual IP: which traffic it takes, how it picks backends, which backends."""

    address: IPAddress = attrs.field(converter=to_ip, metadata=_doc("the VIP (IPv4 or IPv6)"))
    protocol: Literal["tcp", "udp", "any"] = attrs.field(default="tcp", metadata=_doc("protocol taken (ICMP always is)"))
    ports: tuple[Port, ...] = attrs.field(default=(), validator=_each(check_port), metadata=_doc("ports taken; empty = all"))
    selector: PluginConfig = attrs.field(factory=_maglev, metadata=_doc("consistent-hash selector and its options"))
    backends: tuple[BackendConfig, ...] = attrs.field(default=(), metadata=_doc("static backends"))
    health: HealthCheckConfig | None = attrs.field(default=None, metadata=_doc("active checks; none by default"))

    def __attrs_post_init__(self) -> None:
        names = [backend.name for backend in self.backends]
        if len(names) != len(set(names)):
            raise ValueError(f"backend names must be unique within a VIP, got {_got(names)}")


@attrs.frozen(kw_only=True)
class ListenerConfig:
    """How packets for the VIPs reach the balancer."""

    kind: Literal["tun", "raw", "packet"] = attrs.field(default="tun", metadata=_doc("tun, raw or packet"))
    interface: IfName | None = attrs.field(
        default=None, validator=attrs.validators.optional(_v(check_ifname)),
        metadata=_doc("packet: the Ethernet interface clients' packets arrive on; raw: where the VIP goes (lo)"),
    )
    device: IfName = attrs.field(default=IfName("caplance0"), validator=_v(check_ifname), metadata=_doc("tun: device name"))


@attrs.frozen(kw_only=True)
class ConntrackConfig:
    """The balancer's flow table (connection tracking)."""

    enabled: bool = attrs.field(default=True, metadata=_doc("keep established flows on their backend"))
    max_flows: Count = attrs.field(default=Count(1_000_000), validator=_v(check_count), metadata=_doc("table bound"))
    tcp_timeout: Seconds = attrs.field(default=Seconds(900.0), validator=_v(check_seconds), metadata=_doc("idle TCP flow life"))
    tcp_closing_timeout: Seconds = attrs.field(default=Seconds(10.0), validator=_v(check_seconds), metadata=_doc("life after FIN/RST"))
    udp_timeout: Seconds = attrs.field(default=Seconds(30.0), validator=_v(check_seconds), metadata=_doc("idle UDP/other flow life"))


@attrs.frozen(kw_only=True)
class BalancerConfig:
    """One balancer."""

    vips: tuple[VipConfig, ...] = attrs.field(metadata=_doc("the VIPs it serves"))
    listener: ListenerConfig = attrs.field(factory=ListenerConfig, metadata=_doc("how packets arrive"))
    conntrack: ConntrackConfig = attrs.field(factory=ConntrackConfig, metadata=_doc("flow table"))
    control: Endpoint | None = attrs.field(
        default=None, converter=_optional_endpoint,
        metadata=_doc('agents\' control channel, "address:port"; none = static backends only'),
    )
    control_socket: str = attrs.field(default="/run/caplance/balancer.sock", metadata=_doc("unix socket for caplance ctl"))
    metrics: Endpoint | None = attrs.field(default=None, converter=_optional_endpoint, metadata=_doc('Prometheus metrics (GET /metrics) on "address:port"; none = off'))
    secret_file: str | None = attrs.field(default=None, metadata=_doc("file holding the shared secret (or set CAPLANCE_SECRET)"))
    secret: Secret | None = attrs.field(default=None, metadata=_doc("never in the file: from CAPLANCE_SECRET, else secret_file"))
    allowed_networks: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks, metadata=_doc("who may register; empty = any"))
    heartbeat_timeout: Seconds = attrs.field(default=Seconds(3.0), validator=_v(check_seconds), metadata=_doc("remove a backend silent this long"))
    proof_timeout: Seconds = attrs.field(default=Seconds(2.0), validator=_v(check_seconds), metadata=_doc("time to echo the data-path token"))
    drain_timeout: Seconds = attrs.field(default=Seconds(10.0), validator=_v(check_seconds), metadata=_doc("longest graceful stop"))
    drain_idle: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("stop draining after this long without packets"))

    def __attrs_post_init__(self) -> None:
        if not self.vips:
            raise ValueError("a balancer needs at least one VIP")
        addresses = [vip.address for vip in self.vips]
        if len(addresses) != len(set(addresses)):
            raise ValueError("each VIP address may appear once")


@attrs.frozen(kw_only=True)
class LocalCheckConfig:
    """A check the agent runs on its own host; failing it reports the backend unhealthy."""

    command: tuple[str, ...] = attrs.field(default=(), metadata=_doc("argv; exit 0 = healthy"))
    url: str | None = attrs.field(default=None, validator=attrs.validators.optional(_v(check_http_url)),
                                  metadata=_doc("HTTP URL; 2xx = healthy"))
    interval: Seconds = attrs.field(default=Seconds(2.0), validator=_v(check_seconds), metadata=_doc("seconds between checks"))
    timeout: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("seconds per check"))

    def __attrs_post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise ValueError("a local check has exactly one of command or url")


@attrs.frozen(kw_only=True)
class AgentConfig:
    """One backend's agent."""

    name: Name = attrs.field(validator=_v(check_name), metadata=_doc("backend name, unique per balancer"))
    vips: tuple[IPAddress, ...] = attrs.field(converter=_ips, metadata=_doc("VIPs this backend serves"))
    balancer: Endpoint | None = attrs.field(default=None, converter=_optional_endpoint,
                                            metadata=_doc('the balancer\'s control address "address:port"'))
    data_address: IPAddress = attrs.field(default=ipaddress.IPv4Address("0.0.0.0"), converter=to_ip,
                                          metadata=_doc("where encapsulated packets arrive (announced to the balancer)"))
    weight: Weight = attrs.field(default=Weight(1), validator=_v(check_weight), metadata=_doc("share of new flows"))
    transport: PluginConfig = attrs.field(factory=_udp, metadata=_doc("the encapsulation it accepts"))
    balancers: tuple[IPAddress, ...] = attrs.field(default=(), converter=_ips,
                                                   metadata=_doc("accept packets only from these; empty = the balancer's address"))
    inject: Literal["raw", "tun"] = attrs.field(default="raw", metadata=_doc("raw (IPPROTO_RAW) or tun"))
    vip_interface: IfName = attrs.field(default=IfName("lo"), validator=_v(check_ifname), metadata=_doc("where the VIPs go"))
    tun_device: IfName = attrs.field(default=IfName("caplance-in"), validator=_v(check_ifname), metadata=_doc("inject = tun: device"))
    tun_address: IPAddress = attrs.field(default=ipaddress.IPv4Address("169.254.253.1"), converter=to_ip,
                                         metadata=_doc("inject = tun: its address (loose rp_filter needs one)"))
    secret_file: str | None = attrs.field(default=None, metadata=_doc("file holding the shared secret (or set CAPLANCE_SECRET)"))
    secret: Secret | None = attrs.field(default=None, metadata=_doc("never in the file: from CAPLANCE_SECRET, else secret_file"))
    heartbeat_interval: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("seconds between heartbeats"))
    drain_timeout: Seconds = attrs.field(default=Seconds(10.0), validator=_v(check_seconds), metadata=_doc("on SIGTERM: drain this long, then leave"))
    health: LocalCheckConfig | None = attrs.field(default=None, metadata=_doc("local health check"))

    def __attrs_post_init__(self) -> None:
        if not self.vips:
            raise ValueError("an agent needs at least one VIP")

    @property
    def allowed_sources(self) -> tuple[IPAddress, ...]:
        """Addresses encapsulated packets may come from."""
        if self.balancers:
            return self.balancers
        return (self.balancer.host,) if self.balancer is not None else ()


# -- the converter -------------------------------------------------------------------------

converter = cattrs.Converter(forbid_extra_keys=True)


def _hook(check: Callable[[object], Any]) -> Callable[[Any, Any], Any]:
    return lambda value, _: check(value)


for _type, _check in (
    (Port, check_port), (Weight, check_weight), (Count, check_count), (Seconds, check_seconds),
    (Name, check_name), (IfName, check_ifname), (Endpoint, Endpoint.parse),
):
    converter.register_structure_hook(_type, _hook(_check))
converter.register_structure_hook_func(lambda t: t == IPAddress, _hook(to_ip))
converter.register_structure_hook_func(lambda t: t == IPNetwork, _hook(to_network))


def _strict_str(value: object, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_got(value)}")
    return value


def _strict_bool(value: object, _: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_got(value)}")
    return value


def _literal(value: object, kind: Any) -> Any:
    choices = typing.get_args(kind)
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"expected one of {', '.join(_got(c) for c in choices)}, got {_got(value)}")
    return value


def _reject_secret(value: object, _: Any) -> Secret:
    raise ValueError(f"secrets may not be written in a config file; put it in a file named by"
                     f" secret_file, or in {SECRET_ENV}")


def _options(value: object, _: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table of options, got {_got(value)}")
    return dict(value)


converter.register_structure_hook(str, _strict_str)
converter.register_structure_hook(bool, _strict_bool)
_LITERAL: Any = Literal
converter.register_structure_hook_func(lambda t: typing.get_origin(t) is _LITERAL, _literal)
converter.register_structure_hook(Secret, _reject_secret)
converter.register_structure_hook_func(lambda t: t == Mapping[str, Any], _options)


def _is_table(kind: Any) -> bool:
    """A config class (a TOML table), not one of the classes written as a plain value."""
    return attrs.has(kind) and kind not in (Endpoint, Secret)


def _is_list(kind: Any) -> bool:
    """A ``tuple[X, ...]`` field: a TOML array."""
    origin: Any = typing.get_origin(kind)
    return origin is tuple


def _table_hook(kind: Any, conv: cattrs.BaseConverter) -> Callable[[Any, Any], Any]:
    inner = cattrs.gen.make_dict_structure_fn(kind, conv)

    def structure_table(value: object, cls: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a table, got {_got(value)}")
        return inner(value, cls)

    return structure_table


def _list_hook(kind: Any, conv: cattrs.BaseConverter) -> Callable[[Any, Any], Any]:
    inner = homogenous_tuple_structure_factory(kind, conv)

    def structure_list(value: object, cls: Any) -> Any:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise ValueError(f"expected a list, got {_got(value)}")
        return inner(value, cls)

    return structure_list


converter.register_structure_hook_factory(_is_table, _table_hook)
converter.register_structure_hook_factory(_is_list, _list_hook)
for _kind in (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network, Endpoint):
    converter.register_unstructure_hook(_kind, str)
converter.register_unstructure_hook(Secret, lambda _: "***")


def _problems(exc: BaseException, path: str) -> list[tuple[str, str]]:
    """Flatten a cattrs error tree into ``(path, message)`` pairs."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return [(path, f"unknown key {_got(key)}") for key in sorted(exc.extra_fields)]
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        found: list[tuple[str, str]] = []
        for inner in exc.exceptions:
            note = next(iter(getattr(inner, "__notes__", []) or []), None)
            sub = path
            if getattr(note, "name", None) is not None:
                sub = f"{path}.{note.name}"  # type: ignore[union-attr]
            elif getattr(note, "index", None) is not None:
                sub = f"{path}[{note.index}]"  # type: ignore[union-attr]
            found += _problems(inner, sub)
        return found
    if isinstance(exc, KeyError):
        return [(path, "required key missing")]
    if isinstance(exc, TypeError) and "missing" in str(exc) and "argument" in str(exc):
        missing = str(exc).split(":")[-1].strip()
        return [(path, f"required key(s) missing: {missing}")]
    return [(path, str(exc))]


def structure(data: Mapping[str, Any], cls: type[T], *, sources: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from plain data; raise :class:`ConfigError` listing every problem.

    ``sources`` maps a path (``$.vips[0].ports``) to the environment variable that set it,
    so a problem there names the variable.
    """
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # noqa: BLE001 - every cattrs/attrs failure becomes a ConfigError
        problems = _problems(exc, "$")
        if sources:
            problems = [(_with_source(path, sources), message) for path, message in problems]
        raise ConfigError(problems) from exc


def _with_source(path: str, sources: Mapping[str, str]) -> str:
    """``path`` with the variable that set it, or the nearest table or list above it."""
    found = [(len(prefix), variable) for prefix, variable in sources.items()
             if path == prefix or path.startswith((prefix + ".", prefix + "["))]
    return f"{path} (from {max(found)[1]})" if found else path


def unstructure(config: Any) -> dict[str, Any]:
    """Plain data for ``config`` (addresses as strings, the secret as ``***``), None dropped."""
    def prune(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: prune(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [prune(v) for v in value]
        return value

    result: dict[str, Any] = prune(converter.unstructure(config))
    return result


# -- files and the environment -------------------------------------------------------------


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_FACTORY: Any = attrs.Factory(dict).__class__
#: The schema below a plugin's ``options``: any keys, any values.
_FREE: Any = object()
_NONE = type(None)


def _optional_inner(kind: Any) -> Any:
    """``X`` for ``X | None``; anything else unchanged."""
    args = typing.get_args(kind)
    if _NONE in args:
        rest = [arg for arg in args if arg is not _NONE]
        if len(rest) == 1:
            return rest[0]
    return kind


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_text(kind: Any) -> bool:
    """Whether a value of ``kind`` is written as a TOML string."""
    kind = _optional_inner(kind)
    while hasattr(kind, "__supertype__"):  # a NewType
        kind = kind.__supertype__
    if typing.get_origin(kind) is _LITERAL:
        return all(isinstance(choice, str) for choice in typing.get_args(kind))
    return kind is str or kind is Endpoint or kind == IPAddress or kind == IPNetwork


def _schema_child(kind: Any, part: str, target: Any) -> tuple[Any, int | str]:
    """The type found at ``part`` below a value of ``kind``, and the key to use there.

    Raises ``ValueError`` when ``part`` does not fit ``kind``.
    """
    if kind is _FREE:
        return _FREE, int(part) if part.isdigit() and isinstance(target, list) else part
    kind = _optional_inner(kind)
    if _is_table(kind):
        fields = attrs.fields_dict(kind)
        if part not in fields:
            raise ValueError(f"unknown key {_got(part)} (keys here: {', '.join(fields)})")
        return _hints(kind)[part], part
    if _is_list(kind):
        if not part.isdigit():
            raise ValueError(f"a list takes item numbers (0, 1, ...), not {_got(part)}")
        return typing.get_args(kind)[0], int(part)
    if kind == Mapping[str, Any]:
        return _FREE, part
    raise ValueError("a single value has no keys or items below it")


def _new_container(parent: Any, key: int | str, kind: Any, following: str) -> Any:
    """What a missing table or list at ``key`` starts as: the field's default, as data
    (so ``CAPLANCE_TRANSPORT__OPTIONS__PORT`` keeps the default transport's name)."""
    if kind is _FREE:
        return [] if following.isdigit() else {}
    inner = _optional_inner(kind)
    empty: Any = [] if _is_list(inner) else {}
    parent_kind = _optional_inner(parent)
    if isinstance(key, int) or not _is_table(parent_kind):
        return empty
    default: Any = attrs.fields_dict(parent_kind)[key].default
    if isinstance(default, _FACTORY):
        default = default.factory()
    if default is attrs.NOTHING or default is None:
        return empty
    return json.loads(json.dumps(converter.unstructure(default)))


def apply_environment(data: Mapping[str, Any], environ: Mapping[str, str], *,
                      cls: type | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Overlay ``CAPLANCE_*`` variables on ``data`` (not changed; the result is a copy).

    Returns the new data and, per path a variable set (or a table or list item it had to
    create), the variable. ``CAPLANCE_SECRET`` is left to :func:`resolve_secret`.

    With ``cls`` (the config class ``data`` is for) each path is checked against the
    classes' fields, a table the file lacks starts from the field's default, and a value
    for a string field that is not a TOML string is the variable's text as is
    (``CAPLANCE_LISTENER__DEVICE=1234`` is the name ``"1234"``, not a number). Values are
    otherwise read as TOML values, or taken as text when they are not valid TOML.

    Raises :class:`ConfigError` listing every variable whose path does not fit: an unknown
    key, an item number past the end of a list, a key below a plain value.
    """
    result: dict[str, Any] = json.loads(json.dumps(data, default=str))  # a deep copy
    sources: dict[str, str] = {}
    problems = []
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable == SECRET_ENV:
            continue
        parts = [part.lower() for part in variable[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            problems.append((f"$ (from {variable})", "empty path part: use single words joined by __"))
            continue
        target: Any = result
        kind: Any = cls if cls is not None else _FREE
        path = "$"
        created: list[str] = []
        try:
            for depth, part in enumerate(parts):
                parent = kind
                kind, key = _schema_child(kind, part, target)
                path += f"[{key}]" if isinstance(key, int) else f".{key}"
                if depth == len(parts) - 1:
                    text = environ[variable]
                    value = _parse_env_value(text)
                    _assign(target, key, text if _is_text(kind) and not isinstance(value, str) else value)
                    break
                if isinstance(key, int):
                    if not isinstance(target, list):
                        raise ValueError(f"cannot set item {key} in {_got(target)}, which is not a list")
                    if key > len(target):
                        raise ValueError(f"no list item {key}: the list has {len(target)};"
                                         f" add items in order ({len(target)} next)")
                    if key == len(target):
                        target.append(_new_container(parent, key, kind, parts[depth + 1]))
                        created.append(path)
                elif not isinstance(target, dict):
                    raise ValueError(f"cannot set {_got(key)} in {_got(target)}, which is not a table")
                elif key not in target:
                    target[key] = _new_container(parent, key, kind, parts[depth + 1])
                    created.append(path)
                target = target[key]
        except ValueError as exc:
            problems.append((f"{path} (from {variable})", str(exc)))
            continue
        sources[path] = variable
        for made in created:
            sources.setdefault(made, variable)
    if problems:
        raise ConfigError(problems)
    return result, sources


def _assign(target: Any, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        if not isinstance(target, list):
            raise ValueError(f"cannot set item {key} in {_got(target)}, which is not a list")
        if key > len(target):
            raise ValueError(f"no list item {key}: the list has {len(target)};"
                             f" add items in order ({len(target)} next)")
        if key == len(target):
            target.append(value)
        else:
            target[key] = value
    elif isinstance(target, dict):
        target[key] = value
    else:
        raise ValueError(f"cannot set {_got(key)} in {_got(target)}, which is not a table")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or bad TOML is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([("$", f"cannot read {path}: {exc.strerror or exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("$", f"{path} is not valid TOML: {exc}")]) from exc


def resolve_secret(secret_file: str | None, environ: Mapping[str, str]) -> Secret | None:
    """The secret from ``CAPLANCE_SECRET`` (first) or ``secret_file``; None if neither."""
    if environ.get(SECRET_ENV):
        return Secret(environ[SECRET_ENV].encode())
    if secret_file is None:
        return None
    try:
        value = Path(secret_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError([("$.secret_file", f"cannot read {secret_file}: {exc.strerror or exc}")]) from exc
    if not value:
        raise ConfigError([("$.secret_file", f"{secret_file} is empty")])
    return Secret(value)


def load(path: str | Path, cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Read ``path``, overlay the environment, build and validate ``cls``, attach the secret."""
    environ = os.environ if environ is None else environ
    data, sources = apply_environment(read_toml(path), environ, cls=cls)
    config = structure(data, cls, sources=sources)
    if attrs.has(cls) and "secret" in attrs.fields_dict(cls):
        secret = resolve_secret(getattr(config, "secret_file", None), environ)
        config = attrs.evolve(config, secret=secret)  # type: ignore[misc]
    return config


def load_balancer_config(path: str | Path, environ: Mapping[str, str] | None = None) -> BalancerConfig:
    """A balancer's config from the TOML file ``path`` and ``environ`` (default
    ``os.environ``). Raises :class:`ConfigError` listing every problem."""
    return load(path, BalancerConfig, environ)


def load_agent_config(path: str | Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """An agent's config from the TOML file ``path`` and ``environ`` (default
    ``os.environ``). Raises :class:`ConfigError` listing every problem."""
    return load(path, AgentConfig, environ)
