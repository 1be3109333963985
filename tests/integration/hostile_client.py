"""Run inside a lab host by the control-plane tests: misbehave at the balancer's control port.

    python hostile_client.py replay HOST PORT SECRET      # a valid handshake, then its replay
    python hostile_client.py garbage HOST PORT            # junk, huge frames, a stalled frame

Prints one JSON object describing what the balancer answered.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
import weakref

from caplance import control_codec as codec


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    return sock


_decoders: weakref.WeakKeyDictionary[socket.socket, tuple[codec.FrameDecoder, list[dict]]] = (
    weakref.WeakKeyDictionary())


def read_message(sock: socket.socket) -> dict | None:
    """The next message on ``sock`` (None at its end); messages that arrived together with an
    earlier one are kept for the next call, not lost."""
    decoder, ready = _decoders.setdefault(sock, (codec.FrameDecoder(), []))
    while not ready:
        data = sock.recv(65536)
        if not data:
            return None
        ready.extend(decoder.feed(data))
    return ready.pop(0)


def replay(host: str, port: int, secret: bytes) -> dict:
    """Register properly once (recording our frames), then send the same frames again."""
    recorded = []
    sock = connect(host, port)
    nonce_a = codec.new_nonce()
    hello = codec.encode(codec.message("hello", name="replayer", nonce=nonce_a))
    sock.sendall(hello)
    challenge = read_message(sock)
    register = codec.message("register", name="replayer", data_address="10.77.0.10",
                             transport={"name": "udp", "options": {}}, vips=["10.99.0.1"],
                             weight=1, proof="")
    register["proof"] = codec.mac(secret, "agent", challenge["nonce"], nonce_a,
                                  *codec.registration_fields(register))
    frame = codec.encode(register)
    sock.sendall(frame)
    first = read_message(sock)  # welcome: accepted, then the data-path proof (we never echo)
    recorded = [hello, frame]
    sock.close()
    sock = connect(host, port)
    for frame in recorded:
        sock.sendall(frame)
    replies = []
    while (msg := read_message(sock)) is not None:
        replies.append(msg)
    return {"first": first["type"], "replayed": [m["type"] for m in replies],
            "reasons": [m.get("reason") for m in replies]}


def garbage(host: str, port: int) -> dict:
    answers = {}
    for name, payload in {
        "junk": os.urandom(4096),
        "huge_frame": struct.pack("!I", 1 << 30) + b"x" * 100,
        "bad_json": struct.pack("!I", 5) + b"{nope",
        "bad_version": codec.encode(codec.message("hello", name="x", nonce="y")).replace(b'"v":1', b'"v":9'),
    }.items():
        sock = connect(host, port)
        try:
            sock.sendall(payload)
            sock.settimeout(10)
            answers[name] = "closed" if sock.recv(65536) == b"" else "answered"
        except (ConnectionResetError, BrokenPipeError):
            answers[name] = "closed"
        finally:
            sock.close()
    # Slowloris: half a frame, then silence; the balancer must hang up on its own.
    sock = connect(host, port)
    sock.sendall(struct.pack("!I", 100) + b"{")
    started = time.monotonic()
    sock.settimeout(30)
    try:
        sock.recv(65536)
    except (ConnectionResetError, socket.timeout):
        pass
    answers["slowloris_closed_after"] = round(time.monotonic() - started, 1)
    sock.close()
    return answers


def main() -> int:
    action, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if action == "replay":
        result = replay(host, port, sys.argv[4].encode())
    else:
        result = garbage(host, port)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
