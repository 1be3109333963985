/* The flow hash of caplance/flowhash.py in C: MurmurHash3 x86 32-bit of a 13-byte (IPv4)
 * or 37-byte (IPv6) flow key under a seed. Fixed lengths, so no loop over a variable length:
 * 3 or 9 blocks of 4 bytes and a 1-byte tail. The tests check it against the Python
 * definition's vectors (BPF_PROG_TEST_RUN) and against lookup_table(). */
#ifndef CAPLANCE_FLOWHASH_H
#define CAPLANCE_FLOWHASH_H

#include <linux/types.h>

static __always_inline __u32 rotl32(__u32 value, __u32 bits)
{
	return (value << bits) | (value >> (32 - bits));
}

static __always_inline __u32 scramble(__u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl32(k, 15);
	return k * 0x1b873593;
}

static __always_inline __u32 block(const __u8 *bytes, int offset)
{
	return (__u32)bytes[offset] | ((__u32)bytes[offset + 1] << 8) |
	       ((__u32)bytes[offset + 2] << 16) | ((__u32)bytes[offset + 3] << 24);
}

static __always_inline __u32 finish(__u32 h, __u32 tail, __u32 length)
{
	h ^= scramble(tail);
	h ^= length;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#define MIX(h, bytes, offset) do { \
	h ^= scramble(block(bytes, offset)); \
	h = rotl32(h, 13); \
	h = h * 5 + 0xe6546b64; \
} while (0)

/* a 13-byte (IPv4) key: 3 blocks and a 1-byte tail */
static __always_inline __u32 murmur3_13(const __u8 *bytes, __u32 seed)
{
	__u32 h = seed;

	MIX(h, bytes, 0);
	MIX(h, bytes, 4);
	MIX(h, bytes, 8);
	return finish(h, bytes[12], 13);
}

/* a 37-byte (IPv6) key: 9 blocks and a 1-byte tail */
static __always_inline __u32 murmur3_37(const __u8 *bytes, __u32 seed)
{
	__u32 h = seed;

	MIX(h, bytes, 0);
	MIX(h, bytes, 4);
	MIX(h, bytes, 8);
	MIX(h, bytes, 12);
	MIX(h, bytes, 16);
	MIX(h, bytes, 20);
	MIX(h, bytes, 24);
	MIX(h, bytes, 28);
	MIX(h, bytes, 32);
	return finish(h, bytes[36], 37);
}

static __always_inline __u32 murmur3_32(const __u8 *bytes, __u32 length, __u32 seed)
{
	return length == 13 ? murmur3_13(bytes, seed) : murmur3_37(bytes, seed);
}

#define SOURCE_PORT_SEED 0x50C7

/* the encapsulation's UDP source port: caplance.flowhash.source_port */
static __always_inline __u16 source_port(const __u8 *bytes, __u32 length)
{
	return 49152 | (murmur3_32(bytes, length, SOURCE_PORT_SEED) & 0x3fff);
}

#endif
