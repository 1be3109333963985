"""The balancer <-> agent control protocol, as a pure codec: bytes in, messages out.

Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON, an object with
``"v": 1`` (the protocol version) and ``"type"``. Frames over :data:`MAX_FRAME` bytes, bad
JSON, unknown types, wrong versions and missing or mistyped fields raise
:class:`ProtocolError` -- the one error the decoder raises -- and the connection is closed.

Registration is mutual challenge-response over fresh random nonces with HMAC-SHA256 and the
shared secret::

    agent -> balancer   hello     {name, nonce_a}
    balancer -> agent   challenge {nonce_b, proof_b = MAC("balancer", nonce_a, nonce_b, name)}
    agent -> balancer   register  {name, data_address, transport, vips, weight,
                                   proof_a = MAC("agent", nonce_b, nonce_a, <those fields>)}
    balancer -> agent   welcome   {token_expected_in}      or   refused {reason}
    (balancer sends a probe with a random token through the real transport)
    agent -> balancer   proof     {token}
    balancer -> agent   active    {}                        or   refused {reason}

Each side proves it holds the secret over a nonce the other side just drew, so a recorded
handshake replayed later fails (the nonce it signed is not the one asked for), and the role
labels keep one side's proof from being reflected as the other's.

Every frame after ``register`` is **sealed** (:class:`Seal`): it carries ``n``, its sequence
number in its direction (from 0), and ``mac``, an HMAC-SHA256 over the direction's label and
the rest of the frame under the session key ``MAC(secret, "session", nonce_a, nonce_b)``. A
frame without a seal, with a wrong MAC (``forged``), an old number (``replayed``) or a number
ahead of the next one (``out_of_order``) ends the session, as does a connection closed in the
middle of a frame (``truncated``). The agent seals from ``register`` on, the balancer once the
register proof checks out; so the one unsealed frame an agent accepts after ``register`` is
the balancer's ``refused`` to a proof it could not check. After ``active``: the agent
sends ``heartbeat {seq, healthy}`` and ``state {state}`` / ``deregister``; the balancer may send
``state {state}`` when an operator changes it.

The admin socket (``caplance ctl``) uses the same framing with ``command`` / ``reply``.
No sockets or trio here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import struct
from collections.abc import Iterator, Mapping
from typing import Any, Final

from caplance.errors import CaplanceError
from caplance.packet import IPAddress, udp_packet

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "ProtocolError",
    "FrameDecoder",
    "encode",
    "message",
    "new_nonce",
    "mac",
    "verify_mac",
    "registration_fields",
    "session_key",
    "Seal",
    "PROBE_MAGIC",
    "probe_packet",
    "probe_token",
]

VERSION: Final = 1
MAX_FRAME: Final = 64 * 1024
_LENGTH = struct.Struct("!I")

#: type -> required fields and their JSON types
SCHEMAS: Final[dict[str, dict[str, type | tuple[type, ...]]]] = {
    "hello": {"name": str, "nonce": str},
    "challenge": {"nonce": str, "proof": str},
    "register": {"name": str, "data_address": str, "transport": dict, "vips": list,
                 "weight": int, "proof": str},
    "welcome": {},
    "proof": {"token": str},
    "active": {},
    "refused": {"reason": str},
    "heartbeat": {"seq": int, "healthy": bool},
    "state": {"state": str},
    "deregister": {},
    "command": {"command": str, "args": list},
    "reply": {"ok": bool, "result": (dict, list, str, type(None))},
}


class ProtocolError(CaplanceError):
    """A frame or message that breaks the protocol. ``reason`` is a short counter slug."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def message(kind: str, **fields: Any) -> dict[str, Any]:
    """A message dict with version and type (fields are checked on :func:`encode`)."""
    return {"v": VERSION, "type": kind, **fields}


def encode(msg: Mapping[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """One frame for ``msg``. Raises :class:`ProtocolError` if it is invalid or too big."""
    validate(msg)
    body = json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()
    if len(body) > max_frame:
        raise ProtocolError("frame_too_large", f"{len(body)} > {max_frame} bytes")
    return _LENGTH.pack(len(body)) + body


def validate(msg: Mapping[str, Any]) -> dict[str, Any]:
    """Check version, type and required fields. Returns the message as a dict."""
    if not isinstance(msg, Mapping):
        raise ProtocolError("not_an_object")
    if msg.get("v") != VERSION:
        raise ProtocolError("bad_version", f"expected v={VERSION}, got {msg.get('v')!r}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError("unknown_type", repr(kind)[:40])
    for field, expected in SCHEMAS[kind].items():
        value = msg.get(field)
        if field not in msg or not isinstance(value, expected) or (
            expected is int and isinstance(value, bool)
        ):
            raise ProtocolError("bad_field", f"{kind}.{field}")
    return dict(msg)


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes as they arrive, iterate complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes | bytearray) -> Iterator[dict[str, Any]]:
        """Yield every complete message in the data so far. Raises :class:`ProtocolError`."""
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self._max:
                raise ProtocolError("frame_too_large", f"{length} > {self._max} bytes")
            if len(self._buffer) < _LENGTH.size + length:
                return
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                decoded = json.loads(body)
            except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd integers
                raise ProtocolError("bad_json", str(exc)[:80]) from exc
            try:  # JSON's \ud800 escapes decode to strings no UTF-8 encoder takes (found by fuzzing)
                json.dumps(decoded, ensure_ascii=False).encode()
            except UnicodeEncodeError as exc:
                raise ProtocolError("bad_json", "a string with a lone surrogate") from exc
            yield validate(decoded)

    @property
    def pending(self) -> int:
        """Bytes received but not yet a whole frame."""
        return len(self._buffer)


# -- authentication ------------------------------------------------------------------------


def new_nonce() -> str:
    """A fresh random nonce (128 bits, hex) from :mod:`secrets`."""
    return secrets.token_hex(16)


def mac(secret: bytes, label: str, *parts: str) -> str:
    """HMAC-SHA256 over the role ``label`` and ``parts`` (length-prefixed, so unambiguous)."""
    data = b"".join(len(p.encode()).to_bytes(4, "big") + p.encode() for p in (label, *parts))
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def verify_mac(secret: bytes, proof: str, label: str, *parts: str) -> bool:
    """Constant-time check of a :func:`mac` (any string is safe to pass as ``proof``)."""
    return hmac.compare_digest(mac(secret, label, *parts).encode(), proof.encode("utf-8", "replace"))


def session_key(secret: bytes, nonce_a: str, nonce_b: str) -> bytes:
    """The key that seals a session's frames: both sides' nonces under the secret."""
    return bytes.fromhex(mac(secret, "session", nonce_a, nonce_b))


_PEER = {"agent": "balancer", "balancer": "agent"}


class Seal:
    """Seals the frames one side sends and opens the frames it receives (see the module's
    docstring). ``side`` is ``"agent"`` or ``"balancer"``; ``early_refusal`` lets an
    unsealed ``refused`` through as the first frame received (the agent's side)."""

    def __init__(self, key: bytes, side: str, *, early_refusal: bool = False) -> None:
        self._key = key
        self._out = side
        self._in = _PEER[side]
        self._early_refusal = early_refusal
        #: frames sealed / opened so far (the next sequence numbers)
        self.sent = 0
        self.received = 0

    def seal(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        sealed = {**msg, "n": self.sent}
        sealed["mac"] = self._mac(self._out, sealed)
        self.sent += 1
        return sealed

    def open(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """``msg`` without its seal. Raises :class:`ProtocolError` (``unsealed``, ``forged``,
        ``replayed``, ``out_of_order``)."""
        if "mac" not in msg:
            if self._early_refusal and self.received == 0 and msg.get("type") == "refused":
                return dict(msg)
            raise ProtocolError("unsealed", str(msg.get("type"))[:20])
        proof, number = msg["mac"], msg.get("n")
        if not isinstance(proof, str) or not isinstance(number, int) or isinstance(number, bool):
            raise ProtocolError("forged", "no sequence number or MAC")
        body = {key: value for key, value in msg.items() if key != "mac"}
        if not hmac.compare_digest(self._mac(self._in, body).encode(), proof.encode("utf-8", "replace")):
            raise ProtocolError("forged", f"bad MAC on frame {number}")
        if number != self.received:
            reason = "replayed" if number < self.received else "out_of_order"
            raise ProtocolError(reason, f"frame {number}, expected {self.received}")
        self.received += 1
        del body["n"]
        return body

    def _mac(self, label: str, body: Mapping[str, Any]) -> str:
        return mac(self._key, label, json.dumps(body, sort_keys=True, separators=(",", ":")))


def registration_fields(msg: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields of a ``register`` message its proof covers, canonically encoded (``decap``,
    optional -- "agent" or "kernel" --, only when present, so older agents still prove)."""
    fields = (
        msg["name"],
        msg["data_address"],
        json.dumps(msg["transport"], sort_keys=True, separators=(",", ":")),
        json.dumps(msg["vips"], sort_keys=True, separators=(",", ":")),
        str(msg["weight"]),
    )
    return (*fields, str(msg["decap"])) if "decap" in msg else fields


# -- data-path probes ----------------------------------------------------------------------

#: A probe is an inner UDP packet to the VIP, both ports 0, whose payload starts with this.
PROBE_MAGIC: Final = b"CAPLANCE-PROBE/1 "
_PROBE_SOURCE: dict[int, IPAddress] = {4: ipaddress.IPv4Address("0.0.0.0"), 6: ipaddress.IPv6Address("::")}


def probe_packet(vip: IPAddress, token: str) -> bytes:
    """The data-path probe carrying ``token`` to ``vip`` (sent through the real transport)."""
    return udp_packet(_PROBE_SOURCE[vip.version], vip, 0, 0, PROBE_MAGIC + token.encode())


def probe_token(packet: bytes, key: bytes) -> str | None:
    """The token if ``packet`` (with flow key ``key``) is a probe, else None. Cheap for the
    common case: only UDP packets with both ports 0 are looked at further."""
    if key[-4:] != b"\x00\x00\x00\x00" or key[-5] != 17:
        return None
    start = 28 if len(key) == 13 else 48
    payload = packet[start:]
    if not payload.startswith(PROBE_MAGIC):
        return None
    token = payload[len(PROBE_MAGIC):]
    if not 0 < len(token) <= 64 or not token.isalnum():
        return None
    return token.decode()
