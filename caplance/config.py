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

:func:`caplance.configfile.load_balancer_config` / :func:`~caplance.configfile.load_agent_config` raise
:class:`~caplance.errors.ConfigError` listing every problem with its path and value
(``@ $.vips[0].ports[1]: expected an int from 1 to 65535, got "http"``).
"""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import cattrs.gen
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from caplance.configtypes import (
    MAX_WEIGHT,
    MAX_WORKERS,
    Count,
    Endpoint,
    IfName,
    IPAddress,
    IPNetwork,
    Name,
    Port,
    Seconds,
    Secret,
    Weight,
    WorkerCount,
    _doc,
    _each,
    _endpoints,
    _got,
    _ips,
    _networks,
    _optional_endpoint,
    _v,
    check_count,
    check_http_url,
    check_ifname,
    check_name,
    check_port,
    check_seconds,
    check_weight,
    check_workers,
    to_ip,
    to_network,
)
from caplance.errors import ConfigError

__all__ = [
    "IPAddress",
    "IPNetwork",
    "Port",
    "Seconds",
    "Weight",
    "Count",
    "Name",
    "IfName",
    "MAX_WEIGHT",
    "check_name",
    "check_weight",
    "check_port",
    "to_ip",
    "Endpoint",
    "Secret",
    "PluginConfig",
    "BackendConfig",
    "HealthCheckConfig",
    "VipConfig",
    "ListenerConfig",
    "AnnounceConfig",
    "ConntrackConfig",
    "DecapConfig",
    "FastpathConfig",
    "MAX_WORKERS",
    "WorkerCount",
    "BalancerConfig",
    "LocalCheckConfig",
    "AgentConfig",
    "converter",
    "structure",
    "unstructure",
    "ENV_PREFIX",
    "SECRET_ENV",
]

T = TypeVar("T")
ENV_PREFIX = "CAPLANCE_"
SECRET_ENV = "CAPLANCE_SECRET"

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
    decap: Literal["agent", "kernel"] = attrs.field(
        default="agent", metadata=_doc("how it unwraps: its agent in user space, or its kernel (Caplance's decap program, fou, GRE)"))


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


#: listeners that cannot work without an interface named
_NEEDS_INTERFACE = ("packet",)


@attrs.frozen(kw_only=True)
class ListenerConfig:
    """How packets for the VIPs reach the balancer: a ``caplance.listeners`` plugin."""

    kind: Name = attrs.field(default=Name("tun"), validator=_v(check_name),
                             metadata=_doc("tun, raw, packet, nfqueue, or a plugin's name"))
    interface: IfName | None = attrs.field(
        default=None, validator=attrs.validators.optional(_v(check_ifname)),
        metadata=_doc("packet: the Ethernet interface clients' packets arrive on (required); raw: where the VIP goes (lo)"),
    )
    device: IfName = attrs.field(default=IfName("caplance0"), validator=_v(check_ifname), metadata=_doc("tun: device name"))
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict,
                                             metadata=_doc("more keyword options for the listener (nfqueue: queue)"))

    def __attrs_post_init__(self) -> None:
        if self.kind in _NEEDS_INTERFACE and self.interface is None:
            raise ValueError(f"listener {self.kind!r} needs an interface: the Ethernet interface clients'"
                             " packets arrive on (interface = \"eth0\", say)")


@attrs.frozen(kw_only=True)
class FastpathConfig:
    """The kernel (BPF) data plane in front of the Python one."""

    mode: Literal["auto", "tc", "xdp", "off"] = attrs.field(
        default="auto", metadata=_doc("auto: tc when the kernel can, else Python (the log and ctl status say why); off: Python only"))
    interface: IfName | None = attrs.field(
        default=None, validator=attrs.validators.optional(_v(check_ifname)),
        metadata=_doc("where clients' packets arrive; none = the listener's, else the default route's or the only one"))
    new_flows_per_second: Count = attrs.field(
        default=Count(100_000), validator=_v(check_count),
        metadata=_doc("per CPU: new flows beyond this are forwarded but not remembered (a flood cannot evict real flows)"))


@attrs.frozen(kw_only=True)
class DecapConfig:
    """The agent's kernel decapsulation (a tc program on its interface)."""

    mode: Literal["auto", "tc", "off"] = attrs.field(
        default="auto", metadata=_doc("auto: in the kernel when it can, else the agent injects; off: the agent only"))
    interface: IfName | None = attrs.field(
        default=None, validator=attrs.validators.optional(_v(check_ifname)),
        metadata=_doc("where encapsulated packets arrive; none = the route's toward the balancer, or the only one"))


@attrs.frozen(kw_only=True)
class AnnounceConfig:
    """How this balancer announces its VIPs to the routers (a ``caplance.announcers`` plugin)."""

    kind: Name = attrs.field(default=Name("none"), validator=_v(check_name),
                             metadata=_doc("none, exabgp, bird, or a plugin's name"))
    min_backends: Count = attrs.field(default=Count(1), validator=_v(check_count),
                                      metadata=_doc("announce a VIP only while it has this many active backends"))
    withdraw_grace: Seconds = attrs.field(default=Seconds(2.0), validator=_v(check_seconds),
                                          metadata=_doc("on stop: seconds between withdrawing and draining"))
    settle: Seconds = attrs.field(default=Seconds(3.0), validator=_v(check_seconds),
                                  metadata=_doc("after start: announce once no backend joined for this long"))
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict,
                                             metadata=_doc("the announcer's options (peers, socket, communities, med)"))


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
    insecure_control: bool = attrs.field(default=False, metadata=_doc(
        "run with no or a short secret, or no allowed_networks on a public control address (warns at each start)"))
    heartbeat_timeout: Seconds = attrs.field(default=Seconds(3.0), validator=_v(check_seconds), metadata=_doc("remove a backend silent this long"))
    proof_timeout: Seconds = attrs.field(default=Seconds(2.0), validator=_v(check_seconds), metadata=_doc("time to echo the data-path token"))
    drain_timeout: Seconds = attrs.field(default=Seconds(10.0), validator=_v(check_seconds), metadata=_doc("longest graceful stop"))
    drain_idle: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("stop draining after this long without packets"))
    workers: WorkerCount = attrs.field(default=1, validator=_v(check_workers),
                                       metadata=_doc('Python data-plane processes; "auto" = one per CPU'))
    fastpath: FastpathConfig = attrs.field(factory=FastpathConfig, metadata=_doc("the kernel data plane"))
    announce: AnnounceConfig = attrs.field(factory=AnnounceConfig, metadata=_doc("BGP announcements of the VIPs"))

    def __attrs_post_init__(self) -> None:
        if not self.vips:
            raise ValueError("a balancer needs at least one VIP")
        if self.fastpath.mode == "tc" and self.listener.kind == "packet":
            raise ValueError("fastpath mode 'tc' cannot work with listener 'packet': an AF_PACKET socket sees"
                             " every packet before tc does, so each would be forwarded twice; use listener"
                             " 'tun', 'raw' or 'nfqueue', or fastpath mode 'xdp'")
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
    register_with: tuple[Endpoint, ...] = attrs.field(
        default=(), converter=_endpoints,
        metadata=_doc('more balancers\' control addresses to register with (every balancer of the VIPs)'))
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
    insecure_control: bool = attrs.field(default=False, metadata=_doc("register with no secret (warns at each start)"))
    heartbeat_interval: Seconds = attrs.field(default=Seconds(1.0), validator=_v(check_seconds), metadata=_doc("seconds between heartbeats"))
    drain_timeout: Seconds = attrs.field(default=Seconds(10.0), validator=_v(check_seconds), metadata=_doc("on SIGTERM: drain this long, then leave"))
    health: LocalCheckConfig | None = attrs.field(default=None, metadata=_doc("local health check"))
    fastpath: DecapConfig = attrs.field(factory=DecapConfig, metadata=_doc("decapsulation in the kernel"))

    def __attrs_post_init__(self) -> None:
        if not self.vips:
            raise ValueError("an agent needs at least one VIP")

    @property
    def control_endpoints(self) -> tuple[Endpoint, ...]:
        """Every balancer to register with: ``balancer``, then ``register_with``."""
        return ((self.balancer,) if self.balancer is not None else ()) + self.register_with

    @property
    def allowed_sources(self) -> tuple[IPAddress, ...]:
        """Addresses encapsulated packets may come from."""
        if self.balancers:
            return self.balancers
        return tuple(dict.fromkeys(endpoint.host for endpoint in self.control_endpoints))


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
converter.register_structure_hook_func(lambda t: t == WorkerCount, _hook(check_workers))


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
