"""The control protocol codec: framing, validation, proofs, probes -- and hostile bytes."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caplance import control_codec as codec
from caplance.packet import flow_key

SECRET = b"s3cret"


def test_messages_round_trip_through_frames_fed_byte_by_byte() -> None:
    messages = [
        codec.message("hello", name="be1", nonce=codec.new_nonce()),
        codec.message("heartbeat", seq=7, healthy=True),
        codec.message("refused", reason="no"),
    ]
    stream = b"".join(codec.encode(m) for m in messages)
    decoder = codec.FrameDecoder()
    got = []
    for index in range(len(stream)):
        got += list(decoder.feed(stream[index:index + 1]))
    assert got == messages
    assert decoder.pending == 0


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack("!I", codec.MAX_FRAME + 1), "frame_too_large"),
        (struct.pack("!I", 3) + b"{x]", "bad_json"),
        (struct.pack("!I", 2) + b"[]", "not_an_object"),
        (struct.pack("!I", 4) + b"\xff\xfe{}", "bad_json"),
    ],
)
def test_broken_frames_raise_protocol_error(frame: bytes, reason: str) -> None:
    with pytest.raises(codec.ProtocolError) as caught:
        list(codec.FrameDecoder().feed(frame))
    assert caught.value.reason == reason


def frame_of(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"v": 2, "type": "hello", "name": "x", "nonce": "y"}, "bad_version"),
        ({"v": 1, "type": "launch_missiles"}, "unknown_type"),
        ({"v": 1, "type": "hello", "name": "x"}, "bad_field"),
        ({"v": 1, "type": "heartbeat", "seq": True, "healthy": True}, "bad_field"),
        ({"v": 1, "type": "heartbeat", "seq": "1", "healthy": True}, "bad_field"),
    ],
)
def test_invalid_messages_raise_protocol_error(obj: object, reason: str) -> None:
    with pytest.raises(codec.ProtocolError) as caught:
        list(codec.FrameDecoder().feed(frame_of(obj)))
    assert caught.value.reason == reason


def test_encode_refuses_invalid_and_oversized_messages() -> None:
    with pytest.raises(codec.ProtocolError):
        codec.encode({"v": 1, "type": "hello"})
    with pytest.raises(codec.ProtocolError, match="frame_too_large"):
        codec.encode(codec.message("refused", reason="x" * codec.MAX_FRAME))


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_messages_or_protocol_error(data: bytes) -> None:
    decoder = codec.FrameDecoder(max_frame=256)
    try:
        for msg in decoder.feed(data):
            assert msg["type"] in codec.SCHEMAS
    except codec.ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=5,
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "type", "name", "nonce", "seq", "healthy", "reason", "token"]),
                       json_values | st.sampled_from(list(codec.SCHEMAS)) | st.just(1), max_size=6))
def test_arbitrary_json_objects_give_a_valid_message_or_protocol_error(obj: dict) -> None:
    try:
        (msg,) = codec.FrameDecoder().feed(frame_of(obj))
    except codec.ProtocolError:
        return
    for field, kind in codec.SCHEMAS[msg["type"]].items():
        assert isinstance(msg[field], kind)


def test_macs_bind_role_nonces_and_content() -> None:
    proof = codec.mac(SECRET, "agent", "nb", "na", "be1")
    assert codec.verify_mac(SECRET, proof, "agent", "nb", "na", "be1")
    assert not codec.verify_mac(SECRET, proof, "balancer", "nb", "na", "be1")  # no reflection
    assert not codec.verify_mac(SECRET, proof, "agent", "nb2", "na", "be1")  # no replay
    assert not codec.verify_mac(b"other", proof, "agent", "nb", "na", "be1")
    assert codec.mac(SECRET, "a", "bc") != codec.mac(SECRET, "a", "b", "c")  # unambiguous
    assert codec.new_nonce() != codec.new_nonce()


def test_registration_proof_covers_every_field() -> None:
    register = codec.message("register", name="be1", data_address="10.0.0.1",
                             transport={"name": "udp", "options": {"port": 7001}},
                             vips=["10.99.0.1"], weight=1, proof="")
    baseline = codec.registration_fields(register)
    for field, value in (("data_address", "10.0.0.66"), ("weight", 100), ("vips", ["10.99.0.2"]),
                         ("transport", {"name": "udp", "options": {"port": 1}})):
        assert codec.registration_fields({**register, field: value}) != baseline


@pytest.mark.parametrize("vip", ["10.99.0.1", "fd99::1"])
def test_probes_are_recognised_and_only_probes(vip: str) -> None:
    probe = codec.probe_packet(ipaddress.ip_address(vip), "abc123")
    assert codec.probe_token(probe, flow_key(probe)) == "abc123"
    other = codec.probe_packet(ipaddress.ip_address(vip), "abc123")[:-6] + b"!!!!!!"
    assert codec.probe_token(other, flow_key(other)) is None


def test_absurd_integers_and_odd_proofs_are_protocol_errors_or_false() -> None:
    body = b'{"v":1,"type":"heartbeat","seq":' + b"9" * 5000 + b',"healthy":true}'
    with pytest.raises(codec.ProtocolError, match="bad_json"):
        list(codec.FrameDecoder().feed(struct.pack("!I", len(body)) + body))
    assert codec.verify_mac(SECRET, "\u00e9" * 64, "agent", "x") is False
    assert codec.verify_mac(SECRET, "\ud800", "agent", "x") is False  # a lone surrogate


# -- sealed frames -----------------------------------------------------------------------------

KEY = codec.session_key(b"a shared secret of 32 bytes, yes", "a" * 32, "b" * 32)


def pair() -> tuple[codec.Seal, codec.Seal]:
    """An agent's seal and the balancer's, over one session key."""
    return codec.Seal(KEY, "agent", early_refusal=True), codec.Seal(KEY, "balancer")


def through(msg: dict[str, object]) -> dict[str, object]:
    """``msg`` as the other side decodes it: encoded and decoded."""
    return next(codec.FrameDecoder().feed(codec.encode(msg)))


def test_the_session_key_depends_on_the_secret_and_both_nonces() -> None:
    keys = {codec.session_key(secret, a, b) for secret, a, b in [
        (b"one secret", "n1", "n2"), (b"two secret", "n1", "n2"), (b"one secret", "n3", "n2"),
        (b"one secret", "n1", "n3"), (b"one secret", "n2", "n1")]}
    assert len(keys) == 5 and all(len(key) == 32 for key in keys)


def test_sealed_frames_open_in_order_in_both_directions() -> None:
    agent, balancer = pair()
    for seq in range(3):
        sent = codec.message("heartbeat", seq=seq, healthy=True)
        assert balancer.open(through(agent.seal(sent))) == sent
        echo = codec.message("heartbeat", seq=seq, healthy=True)
        assert agent.open(through(balancer.seal(echo))) == echo
    assert (agent.sent, agent.received, balancer.sent, balancer.received) == (3, 3, 3, 3)


@pytest.mark.parametrize(("attack", "reason"), [
    ("unsealed", "unsealed"), ("tampered", "forged"), ("bad_mac", "forged"), ("no_number", "forged"),
    ("reflected", "forged"), ("other_key", "forged"), ("replayed", "replayed"), ("skipped", "out_of_order"),
])
def test_a_bad_seal_is_a_protocol_error(attack: str, reason: str) -> None:
    agent, balancer = pair()
    state = codec.message("state", state="draining")
    first = agent.seal(codec.message("heartbeat", seq=1, healthy=True))
    balancer.open(through(first))
    frame: dict[str, object] = {
        "unsealed": state,
        "tampered": {**agent.seal(codec.message("state", state="active")), "state": "paused"},
        "bad_mac": {**agent.seal(state), "mac": "0" * 64},
        "no_number": {key: value for key, value in agent.seal(state).items() if key != "n"},
        "reflected": balancer.seal(state),  # the balancer's own frame sent back to it
        "other_key": codec.Seal(codec.session_key(b"x" * 32, "a", "b"), "agent").seal(state) | {"n": 1},
        "replayed": first,
        "skipped": (agent.seal(state), agent.seal(state))[1],
    }[attack]
    with pytest.raises(codec.ProtocolError) as raised:
        balancer.open(through(frame))
    assert raised.value.reason == reason


def test_only_the_agent_takes_an_unsealed_refusal_and_only_first() -> None:
    agent, balancer = pair()
    refusal = codec.message("refused", reason="authentication failed")
    assert agent.open(through(refusal)) == refusal
    with pytest.raises(codec.ProtocolError, match="unsealed"):
        balancer.open(through(refusal))
    agent, balancer = pair()
    agent.open(through(balancer.seal(codec.message("welcome"))))
    with pytest.raises(codec.ProtocolError, match="unsealed"):
        agent.open(through(refusal))  # once sealed frames came, an unsealed one is injected


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["type", "state", "n", "mac", "v"]),
       value=st.one_of(st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none()))
def test_any_change_to_a_sealed_frame_is_caught(field: str, value: object) -> None:
    agent, balancer = pair()
    sealed = agent.seal(codec.message("state", state="paused"))
    if sealed[field] == value and type(sealed[field]) is type(value):
        return
    changed = {**sealed, field: value}
    try:
        decoded = through(changed)
    except codec.ProtocolError:
        return  # the codec already refuses it
    with pytest.raises(codec.ProtocolError):
        balancer.open(decoded)


def test_a_lone_surrogate_is_a_protocol_error_not_a_crash() -> None:
    """Found by `make fuzz`: JSON may escape a surrogate that no UTF-8 encoder takes; the
    balancer's MAC over the name then raised UnicodeEncodeError (an internal error)."""
    body = b'{"v":1,"type":"hello","name":"\\ud800","nonce":"n"}'
    with pytest.raises(codec.ProtocolError) as raised:
        list(codec.FrameDecoder().feed(struct.pack("!I", len(body)) + body))
    assert raised.value.reason == "bad_json"
