"""Public test helpers for plugin authors: the selector conformance check, and in-memory
fakes (a listener, a transport) to run a :class:`~caplance.balancer.Balancer` without a
network.

Run :func:`check_selector` on your selector class (or whatever your ``caplance.selectors``
entry point names) in your own test suite::

    from caplance.testing import check_selector
    from my_package import MySelector

    def test_my_selector_meets_the_contract() -> None:
        check_selector(MySelector)

It checks the contract every selector meets (see :class:`caplance.interfaces.Selector`):

* ``build(backends, **options)`` takes name -> weight (weight >= 0) and returns a value with
  ``select(key: bytes) -> str | None``;
* the same backends and weights, in any order, give the same choice for every key, also in
  another process with another ``PYTHONHASHSEED`` (so no ``hash()``, no ``random``);
* a built value does not change when the mapping it was built from changes later;
* ``select`` names only backends of weight > 0; with none (empty, or all weights 0) it
  returns None;
* bad input is refused: a non-mapping, a non-str or empty name, a non-int (or bool) or
  negative weight, an unknown option -- with ``TypeError`` or ``ValueError``.

It does not judge balance or disruption: those are a selector's own promises.

This module imports no trio itself (note that importing any ``caplance`` module runs
``caplance/__init__``).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

__all__ = ["SelectorConformanceError", "check_selector", "flow_keys", "MemoryListener", "MemorySource",
           "RecordingTransport", "TransportConformanceError", "check_transport"]

#: Backends the check builds with: mixed weights, one non-ASCII name.
_BACKENDS: Final[Mapping[str, int]] = MappingProxyType(
    {"backend-a": 1, "backend-b": 2, "backend-c": 1, "backend-d": 3, "backend-\u00e9": 1}
)
_KEY_SEED: Final = 0x5E1EC7
_CHILD_TIMEOUT: Final = 120.0

# The child process: re-import the factory, build, print the choices as JSON.
_CHILD = """
import importlib, json, sys
request = json.loads(sys.stdin.read())
target = importlib.import_module(request["module"])
for part in request["qualname"].split("."):
    target = getattr(target, part)
selector = target.build(request["backends"], **request["options"])
keys = [bytes.fromhex(key) for key in request["keys"]]
print(json.dumps([selector.select(key) for key in keys]))
"""


class SelectorConformanceError(AssertionError):
    """A selector broke the contract. ``check`` names the check, ``problem`` says how."""

    def __init__(self, selector: str, check: str, problem: str) -> None:
        self.selector = selector
        self.check = check
        self.problem = problem
        super().__init__(f"selector {selector} fails {check!r}: {problem}")


def flow_keys(count: int, *, seed: int = _KEY_SEED, ipv6: bool = False) -> list[bytes]:
    """``count`` random flow keys as :func:`caplance.packet.flow_key` makes them: 13 bytes
    (IPv4 source, destination, protocol 6, source port, destination port), or, with
    ``ipv6``, every other key 37 bytes (IPv6 addresses, protocol 17). The same ``seed`` gives
    the same keys in every process of the same Python."""
    rng = random.Random(seed)
    keys = []
    for index in range(count):
        if ipv6 and index % 2:
            keys.append(rng.randbytes(32) + b"\x11" + rng.randbytes(4))
        else:
            keys.append(rng.randbytes(8) + b"\x06" + rng.randbytes(4))
    return keys


def check_selector(factory: Any, *, options: Mapping[str, Any] | None = None, keys: int = 500,
                   subprocess: bool = True) -> None:
    """Check that ``factory`` (a selector class, or any object with ``build``) meets the
    selector contract; return None if it does.

    ``options`` are passed to every ``build`` (they must be JSON-serialisable when
    ``subprocess`` is true). ``keys`` is the number of flow keys tried per build.
    ``subprocess`` false skips the cross-process check, which re-imports ``factory`` by its
    ``__module__`` and ``__qualname__`` in a child Python with another ``PYTHONHASHSEED``
    (the child gets this process's ``sys.path``; it waits at most 120 s).

    Raises :class:`SelectorConformanceError` (an ``AssertionError``) naming the first check
    that failed and how.
    """
    name = _describe(factory)
    opts = dict(options or {})
    sample = flow_keys(keys, ipv6=True)

    def fail(check: str, problem: str) -> SelectorConformanceError:
        return SelectorConformanceError(name, check, problem)

    def build(backends: Any, check: str, **extra: Any) -> Any:
        try:
            selector = factory.build(backends, **opts, **extra)
        except Exception as exc:
            raise fail(check, f"build({_short(backends)}) raised {exc!r}") from exc
        if not callable(getattr(selector, "select", None)):
            raise fail(check, f"build() returned {selector!r}, which has no select()")
        return selector

    def choices(selector: Any, check: str) -> list[str | None]:
        try:
            return [selector.select(key) for key in sample]
        except Exception as exc:
            raise fail(check, f"select() raised {exc!r}") from exc

    if not callable(getattr(factory, "build", None)):
        raise fail("has build", "it has no callable build(backends, **options)")

    # Valid results: names of backends with weight, and deterministic within a process.
    base = choices(build(dict(_BACKENDS), "valid result"), "valid result")
    wrong = sorted({repr(c) for c in base if not isinstance(c, str) or c not in _BACKENDS})
    if wrong:
        raise fail("valid result", f"select() returned {', '.join(wrong)}, not backend names")
    again = choices(build(dict(_BACKENDS), "deterministic"), "deterministic")
    _same(base, again, fail, "deterministic", "two builds from the same backends disagree")
    built = build(dict(_BACKENDS), "deterministic")
    _same(choices(built, "deterministic"), choices(built, "deterministic"), fail,
          "deterministic", "select() gives different answers for the same key")

    # Order independence: reversed, and shuffled, insertion order; a read-only Mapping.
    for label, reordered in (
        ("reversed", dict(reversed(list(_BACKENDS.items())))),
        ("shuffled", dict(random.Random(7).sample(list(_BACKENDS.items()), len(_BACKENDS)))),
        ("mappingproxy", MappingProxyType(dict(_BACKENDS))),
    ):
        got = choices(build(reordered, "order independent"), "order independent")
        _same(base, got, fail, "order independent", f"backends in {label} order choose differently")

    # Immutability: changing the mapping after build changes nothing.
    source = dict(_BACKENDS)
    frozen = build(source, "immutable")
    source.clear()
    source.update({"intruder": 5})
    _same(base, choices(frozen, "immutable"), fail, "immutable",
          "choices changed when the mapping it was built from changed")

    # Weight 0 gets nothing; none left -> None.
    drained = {name: (0 if name in ("backend-b", "backend-\u00e9") else weight)
               for name, weight in _BACKENDS.items()}
    got = choices(build(drained, "weight 0 gets nothing"), "weight 0 gets nothing")
    hit = sorted({c for c in got if c in ("backend-b", "backend-\u00e9")})
    if hit:
        raise fail("weight 0 gets nothing", f"select() chose weight-0 backend(s) {hit}")
    if any(c is None for c in got):
        raise fail("weight 0 gets nothing", "select() returned None while backends have weight")
    for label, backends in (("empty", {}), ("all weights 0", dict.fromkeys(_BACKENDS, 0))):
        got = choices(build(backends, "none -> None"), "none -> None")
        bad = sorted({repr(c) for c in got if c is not None})
        if bad:
            raise fail("none -> None", f"with {label} backends select() returned {', '.join(bad)}")

    # Bad input is refused.
    refusals: Sequence[tuple[str, Any, dict[str, Any]]] = (
        ("a list instead of a mapping", [("backend-a", 1)], {}),
        ("a non-str name", {1: 1}, {}),
        ("an empty name", {"": 1}, {}),
        ("a float weight", {"backend-a": 1.5}, {}),
        ("a str weight", {"backend-a": "1"}, {}),
        ("a bool weight", {"backend-a": True}, {}),
        ("a None weight", {"backend-a": None}, {}),
        ("a negative weight", {"backend-a": -1}, {}),
        ("an unknown option", dict(_BACKENDS), {"no_such_option_xyzzy": 1}),
    )
    for label, backends, extra in refusals:
        try:
            factory.build(backends, **opts, **extra)
        except (TypeError, ValueError):
            continue
        except Exception as exc:
            raise fail("refuses bad input",
                       f"{label} raised {exc!r}, expected TypeError or ValueError") from exc
        raise fail("refuses bad input", f"{label} ({_short(backends)}, {extra}) was accepted")

    if subprocess:
        child = _choices_in_child(factory, dict(_BACKENDS), opts, sample, fail)
        _same(base, child, fail, "same in every process",
              "a child Python with another PYTHONHASHSEED chooses differently"
              " (hash()? random? set or dict order of unsorted names?)")


def _describe(factory: Any) -> str:
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return repr(factory)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(expected: list[str | None], got: list[str | None],
          fail: Callable[[str, str], SelectorConformanceError], check: str, problem: str) -> None:
    differ = [index for index, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
    if differ:
        first = differ[0]
        raise fail(check, f"{problem}: {len(differ)} of {len(expected)} keys, e.g. key #{first}"
                          f" -> {expected[first]!r} vs {got[first]!r}")


def _choices_in_child(factory: Any, backends: dict[str, int], options: dict[str, Any],
                      keys: Iterable[bytes],
                      fail: Callable[[str, str], SelectorConformanceError]) -> list[str | None]:
    """Build and select in a fresh Python with a different ``PYTHONHASHSEED``."""
    import subprocess  # here, not at the top: only this check needs it

    check = "same in every process"
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        raise fail(check, "cannot re-import it in a child process: define it at module level"
                          " of an importable module, or pass subprocess=False")
    try:
        request = json.dumps({"module": module, "qualname": qualname, "backends": backends,
                              "options": options, "keys": [key.hex() for key in keys]})
    except TypeError as exc:
        raise fail(check, f"options are not JSON-serialisable ({exc}); pass subprocess=False"
                   ) from exc
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=request, env=env,
                              capture_output=True, text=True, timeout=_CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise fail(check, f"the child Python took over {_CHILD_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        raise fail(check, f"the child Python failed (exit {done.returncode}): "
                          f"{done.stderr.strip()[-2000:]}")
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise fail(check, f"the child printed no JSON: {done.stdout[-500:]!r}") from exc
    if not isinstance(result, list):
        raise fail(check, f"the child printed {result!r}, not a list")
    return [item if isinstance(item, str) else None for item in result]


# -- in-memory fakes for the trio pieces --------------------------------------------------


class MemorySource:
    """A :class:`~caplance.interfaces.PacketSource` fed by :meth:`push`."""

    def __init__(self) -> None:
        import collections

        import trio

        self._queue: collections.deque[bytes] = collections.deque()
        self._event = trio.Event()
        self._trio = trio

    def push(self, packet: bytes) -> None:
        self._queue.append(packet)
        self._event.set()

    def receive_nowait(self) -> bytes:
        if not self._queue:
            raise BlockingIOError
        return self._queue.popleft()

    async def wait_readable(self) -> None:
        while not self._queue:
            await self._event.wait()
            self._event = self._trio.Event()
        await self._trio.lowlevel.checkpoint()

    def close(self) -> None:
        self._queue.clear()


class MemoryListener:
    """A :class:`~caplance.interfaces.Listener` that touches no network: push packets into
    :attr:`source`; :attr:`vips` records what it was asked to attach. One data plane only."""

    name = "memory"
    max_workers = 1

    def __init__(self) -> None:
        self.source = MemorySource()
        self.vips: list[Any] = []

    def attach(self, vips: Sequence[Any], netops: Any, *, workers: int = 1) -> None:
        self.vips = list(vips)

    def open(self, worker: int, workers: int) -> list[MemorySource]:
        return [self.source]


class RecordingTransport:
    """A :class:`~caplance.interfaces.Transport` whose senders record instead of sending:
    :attr:`sent` holds ``(backend address, packet)`` in order."""

    name = "recording"

    def __init__(self, *, max_packet: int = 65535) -> None:
        self.sent: list[tuple[Any, bytes]] = []
        self._max_packet = max_packet

    def max_packet(self, backend: Any) -> int:
        """The largest inner packet: the ``max_packet`` it was made with, for any backend."""
        return self._max_packet

    def overhead(self, outer_version: int) -> int:
        return 0

    def encapsulate(self, packet: bytes, key: bytes) -> bytes:
        return packet

    def decapsulate(self, data: bytes) -> bytes:
        return data

    def open_sender(self, backend: Any) -> _RecordingSender:
        return _RecordingSender(self, backend)

    def open_receiver(self, bind: Any, netops: Any) -> MemorySource:
        return MemorySource()


class _RecordingSender:
    def __init__(self, transport: RecordingTransport, backend: Any) -> None:
        self._transport = transport
        self._backend = backend

    def send(self, packet: bytes, key: bytes, /) -> None:
        self._transport.sent.append((self._backend, packet))

    def close(self) -> None:
        pass


# -- the transport conformance check -------------------------------------------------------


class TransportConformanceError(AssertionError):
    """A transport broke the contract. ``check`` names the check, ``problem`` says how."""

    def __init__(self, transport: str, check: str, problem: str) -> None:
        self.transport = transport
        self.check = check
        self.problem = problem
        super().__init__(f"transport {transport} fails {check!r}: {problem}")


def _sample_packets() -> list[tuple[bytes, bytes]]:
    """(packet, flow key) pairs: IPv4 and IPv6 UDP packets, tiny to jumbo."""
    import ipaddress

    from caplance.packet import flow_key, udp_packet

    pairs = []
    for src, dst in (("192.0.2.7", "198.51.100.1"), ("2001:db8::7", "2001:db8:1::1")):
        for size in (0, 1, 100, 1400, 9000):
            packet = udp_packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), 40000 + size, 53,
                                bytes(range(256)) * (size // 256) + bytes(size % 256))
            pairs.append((packet, flow_key(packet)))
    return pairs


def check_transport(factory: Any, *, options: Mapping[str, Any] | None = None, fuzz: int = 2000) -> None:
    """Check that ``factory(**options)`` (a transport class, or whatever your
    ``caplance.transports`` entry point names) meets the transport contract; return None
    if it does.

    It checks, without touching the network: ``name`` is a non-empty string; ``overhead``
    (4 and 6) matches what ``encapsulate`` adds plus the outer IP header; ``decapsulate``
    undoes ``encapsulate`` for IPv4 and IPv6 packets of many sizes; ``decapsulate`` of junk
    (random bytes, and every truncation and a byte flip of real encapsulations) returns bytes
    or raises :class:`~caplance.errors.MalformedPacket` -- nothing else; ``open_sender`` and
    ``open_receiver`` exist. Raises :class:`TransportConformanceError` naming what failed.
    """
    from caplance.encapsulation import OUTER_IP
    from caplance.errors import MalformedPacket

    transport = factory(**dict(options or {}))
    label = _describe(factory)

    def fail(check: str, problem: str) -> None:
        raise TransportConformanceError(label, check, problem)

    if not isinstance(getattr(transport, "name", None), str) or not transport.name:
        fail("name", f"name must be a non-empty string, got {getattr(transport, 'name', None)!r}")
    for method in ("open_sender", "open_receiver", "encapsulate", "decapsulate", "overhead"):
        if not callable(getattr(transport, method, None)):
            fail("interface", f"no {method}()")
    samples = _sample_packets()
    for packet, key in samples:
        version = packet[0] >> 4
        try:
            wire = transport.encapsulate(packet, key)
            back = transport.decapsulate(wire)
        except Exception as exc:  # noqa: BLE001 - report, whatever it is
            fail("round trip", f"IPv{version} packet of {len(packet)} bytes: {exc!r}")
        if bytes(back) != packet:
            fail("round trip", f"IPv{version} packet of {len(packet)} bytes came back changed")
        for outer in (4, 6):
            expected = len(wire) - len(packet) + OUTER_IP[outer]
            if transport.overhead(outer) != expected:
                fail("overhead", f"overhead({outer}) is {transport.overhead(outer)}, encapsulation adds {expected}")
    rng = random.Random(_KEY_SEED)
    junk = [rng.randbytes(rng.randrange(0, 80)) for _ in range(fuzz)]
    for packet, key in samples[:3] + samples[5:8]:
        wire = transport.encapsulate(packet, key)
        junk += [wire[:cut] for cut in range(len(wire))]
        flipped = bytearray(wire)
        flipped[rng.randrange(len(wire))] ^= 0xFF
        junk.append(bytes(flipped))
    for data in junk:
        try:
            result = transport.decapsulate(data)
        except MalformedPacket:
            continue
        except Exception as exc:  # noqa: BLE001
            fail("junk", f"decapsulate({data[:16]!r}...) raised {exc!r}, not MalformedPacket")
        if not isinstance(result, (bytes, bytearray, memoryview)):
            fail("junk", f"decapsulate returned {type(result).__name__}, not bytes")
