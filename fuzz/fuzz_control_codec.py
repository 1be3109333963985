"""Fuzz target: the control codec (frames from an agent, a balancer or a ``ctl`` client).

Contract (``caplance.control_codec``'s docstring): ``FrameDecoder.feed`` raises only
``ProtocolError``, whatever the bytes and however they are cut into reads; every message it
yields passes ``validate`` (its schema's fields with their JSON types). Beyond the decoder,
what the balancer and the agent do with a message's fields before they check them further
must not raise either: the handshake's MACs over ``hello`` / ``challenge`` / ``register``
fields (``mac``, ``verify_mac``, ``registration_fields``), opening it as a sealed frame
(``Seal.open``: ``ProtocolError`` at most), and a decoded message encodes
again (``encode``: ``ProtocolError`` at most) into a frame that decodes to the same type.

The first input byte picks the mode. Raw: the rest is the byte stream, with the decoder's
frame limit and how it is cut into reads taken from that byte. Structured: the rest drives
an ``atheris.FuzzedDataProvider`` that writes a message of a known type with fields of the
right JSON types and arbitrary content (any Unicode, big and odd numbers, extra fields), so
the checks past the schema are reached often.

    python fuzz/fuzz_control_codec.py [libFuzzer options] [corpus dir]
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports(include=["caplance"]):
    from caplance import control_codec as codec

from findings import Broken, record

TARGET = "control_codec"
SECRET = b"fuzzing-secret-0123456789"
SESSION_KEY = codec.session_key(SECRET, "nonce-a", "nonce-b")


def _use(msg: dict) -> None:
    """What the two sides of the handshake do with a message's fields right away."""
    kind = msg["type"]
    if kind == "hello":  # the balancer answers with a proof over the agent's name and nonce
        codec.mac(SECRET, "balancer", msg["nonce"], "nonce-b", msg["name"])
    elif kind == "challenge":  # the agent checks the balancer's proof
        codec.verify_mac(SECRET, msg["proof"], "balancer", "nonce-a", msg["nonce"], "be1")
    elif kind == "register":  # the balancer checks the agent's proof over the fields
        codec.verify_mac(SECRET, msg["proof"], "agent", "nonce-b", "nonce-a",
                         *codec.registration_fields(msg))
    try:  # a frame of a sealed session: only ProtocolError (unsealed, forged, ...) may come out
        codec.Seal(SESSION_KEY, "balancer").open(msg)
    except codec.ProtocolError:
        pass
    try:
        frame = codec.encode(msg)
    except codec.ProtocolError:
        return
    again = list(codec.FrameDecoder().feed(frame))
    if len(again) != 1 or again[0]["type"] != kind:
        raise Broken(f"a {kind} message does not survive encode -> decode")


_KINDS = sorted(codec.SCHEMAS)


def _value(fdp: atheris.FuzzedDataProvider, kind: object, depth: int = 0) -> object:
    """A JSON value, of ``kind`` (a schema's type) or of any type when ``kind`` is None."""
    if kind is None:
        kind = fdp.PickValueInList([str, int, bool, float, list, dict, type(None)])
    if isinstance(kind, tuple):
        kind = fdp.PickValueInList(list(kind))
    if kind is str:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if kind is int:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 80))
    if kind is bool:
        return fdp.ConsumeBool()
    if kind is float:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind is list:
        return [] if depth > 3 else [_value(fdp, None, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind is dict:
        if depth > 3:
            return {}
        return {fdp.ConsumeUnicode(8): _value(fdp, None, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}
    return None


def _structured(data: bytes) -> bytes:
    """A frame holding a message of a known type with well-typed, arbitrary fields."""
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(_KINDS)
    msg: dict[str, object] = {"v": 1, "type": kind}
    for field, expected in codec.SCHEMAS[kind].items():
        msg[field] = _value(fdp, expected)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        msg[fdp.PickValueInList(["decap", "extra", fdp.ConsumeUnicode(6)])] = _value(fdp, None)
    body = json.dumps(msg).encode()  # ensure_ascii: lone surrogates become \udxxx escapes
    return len(body).to_bytes(4, "big") + body


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, rest = data[0], data[1:]
    if control % 4 == 0:
        control, rest = 0x80, _structured(rest)
    max_frame = codec.MAX_FRAME if control & 0x80 else 16 + (control & 0x3F) * 8
    step = 1 + (control & 0x0F) * 7 if control & 0x40 else len(rest) or 1
    decoder = codec.FrameDecoder(max_frame)
    try:
        try:
            for start in range(0, max(len(rest), 1), step):
                for msg in decoder.feed(rest[start:start + step]):
                    codec.validate(msg)
                    _use(msg)
        except codec.ProtocolError:
            pass
    except Exception as exc:  # noqa: BLE001 - anything else is a finding
        record(TARGET, data, exc)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
