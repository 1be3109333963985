"""The flow hash, defined once. Pure: no I/O; the kernel data plane's C code mirrors it.

**Input.** A flow key, as :func:`caplance.packet.flow_key` makes it: ``src + dst + protocol +
src_port + dst_port`` in network byte order, 13 bytes for IPv4 and 37 for IPv6 (ports are 0
where the protocol has none; see :mod:`caplance.packet` for fragments and ICMP).

**Function.** MurmurHash3, x86 32-bit variant (Austin Appleby, public domain), of the key
bytes under a 32-bit seed, as an unsigned 32-bit integer::

    h = seed
    for each 4-byte block b (little-endian uint32):
        k = b * 0xcc9e2d51;  k = rotl32(k, 15);  k = k * 0x1b873593
        h = h ^ k;  h = rotl32(h, 13);  h = h * 5 + 0xe6546b64
    tail (len % 4 bytes, little-endian): k = tail * 0xcc9e2d51; k = rotl32(k, 15);
                                         k = k * 0x1b873593; h = h ^ k
    h = h ^ len;  h ^= h >> 16;  h *= 0x85ebca6b;  h ^= h >> 13;  h *= 0xc2b2ae35;  h ^= h >> 16

(all arithmetic modulo 2**32). A 13-byte key is three blocks and a 1-byte tail; a 37-byte key
nine blocks and a 1-byte tail, so a C version needs no loop over a variable length.

**Uses.**

* Selecting a backend: a table selector's entry for a key is
  ``table[flow_hash(key, seed) % len(table)]`` with the selector's own seed
  (:data:`MAGLEV_SEED`, :data:`RENDEZVOUS_SEED`), which its :class:`~caplance.forwarding.LookupTable`
  carries.
* The source port of UDP-based encapsulations: :func:`source_port`, ``49152 | (h & 0x3fff)``
  under :data:`SOURCE_PORT_SEED`, so a backend NIC's RSS spreads flows while each flow keeps
  one queue.

:func:`flow_hash` is the fast implementation (the ``mmh3`` package); :func:`murmur3_32` is the
definition above in plain Python, which the tests check against ``mmh3`` and against
:data:`TEST_VECTORS` -- the same vectors the BPF program's tests use.
"""

from __future__ import annotations

from typing import Final

import mmh3

__all__ = [
    "MAGLEV_SEED",
    "RENDEZVOUS_SEED",
    "RING_SEED",
    "SOURCE_PORT_SEED",
    "TEST_VECTORS",
    "flow_hash",
    "murmur3_32",
    "source_port",
]

#: seed of the Maglev selector's key hash
MAGLEV_SEED: Final = 0x6A61B
#: seed of the rendezvous selector's key hash
RENDEZVOUS_SEED: Final = 0x2E6B
#: seed of the ring selector's key hash (the ring is searched, not indexed: no kernel table)
RING_SEED: Final = 0x21A7
#: seed of the encapsulation source port hash
SOURCE_PORT_SEED: Final = 0x50C7
_EPHEMERAL_LOW: Final = 49152
_MASK: Final = 0xFFFFFFFF


def flow_hash(key: bytes, seed: int) -> int:
    """MurmurHash3 x86 32-bit of ``key`` under ``seed``, unsigned (the module's definition)."""
    return mmh3.hash(key, seed, False)


def source_port(key: bytes) -> int:
    """The encapsulation source port for flow key ``key``: 49152 to 65535."""
    return _EPHEMERAL_LOW | (mmh3.hash(key, SOURCE_PORT_SEED, False) & 0x3FFF)


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & _MASK


def _scramble(k: int) -> int:
    return (_rotl((k * 0xCC9E2D51) & _MASK, 15) * 0x1B873593) & _MASK


def murmur3_32(data: bytes, seed: int) -> int:
    """The definition in the module docstring, step by step (slow; for tests and readers)."""
    h = seed & _MASK
    blocks = len(data) // 4
    for index in range(blocks):
        h ^= _scramble(int.from_bytes(data[4 * index : 4 * index + 4], "little"))
        h = (_rotl(h, 13) * 5 + 0xE6546B64) & _MASK
    tail = data[4 * blocks :]
    if tail:
        h ^= _scramble(int.from_bytes(tail, "little"))
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


#: ``(key as hex, seed, hash)``: an IPv4 and an IPv6 key under each seed, plus edge cases.
TEST_VECTORS: Final[tuple[tuple[str, int, int], ...]] = (
    ("", 0, 0),
    ("61", 0, 1009084850),
    ("000102030405060708090a0b0c", MAGLEV_SEED, 382505660),
    ("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324", RENDEZVOUS_SEED,
     3265595577),
    ("000102030405060708090a0b0c", SOURCE_PORT_SEED, 1229439318),
    # 192.0.2.9 -> 10.99.0.1, TCP, 40000 -> 80
    ("c00002090a63000106" "9c400050", MAGLEV_SEED, 1583889325),
    # 2001:db8::9 -> fd99::1, UDP, 40000 -> 53
    ("20010db8000000000000000000000009" "fd990000000000000000000000000001" "11" "9c400035",
     MAGLEV_SEED, 2047455797),
)
