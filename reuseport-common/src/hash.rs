//! The key hash of the `hash` and `consistent` policies.
//!
//! The hash is MurmurHash3, x86 32-bit variant (Austin Appleby's public-domain
//! algorithm), seeded with [`Config::seed`](crate::Config::seed), over the key
//! bytes below. Keys are whole 4-byte words, read little-endian, which is what
//! the algorithm does with its input blocks; so for a key of `4n` bytes this is
//! exactly `MurmurHash3_x86_32(bytes, 4n, seed)` and any implementation of it
//! predicts the program. The program runs the same code as the loader.
//!
//! Key bytes, in network order as they are on the wire:
//! - `src-ip`: the client address as 16 bytes; an IPv4 address is written as
//!   the v4-mapped IPv6 address `::ffff:a.b.c.d`, so a client reaching an IPv4
//!   socket and one reaching a dual-stack IPv6 socket hash alike.
//! - `four-tuple`: client address (16 bytes, as above), server address
//!   (16 bytes), client port (2 bytes), server port (2 bytes): 36 bytes.
//! - `payload:OFFSET:LEN`: the LEN payload bytes, zero-padded to 16 bytes.

use core::net::{IpAddr, SocketAddr};

/// Most words a key has (the four-tuple).
pub const KEY_WORDS: usize = 9;

/// A hash key: `n_words` little-endian words of key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key bytes as words; words past `n_words` are ignored.
    pub words: [u32; KEY_WORDS],
    /// Number of words in use.
    pub n_words: u32,
}

/// An IPv4 address as the 16 bytes of its v4-mapped IPv6 form.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

impl Key {
    /// The `src-ip` key of a client address (16 bytes, IPv4 v4-mapped).
    #[inline(always)]
    pub fn src_ip(src: &[u8; 16]) -> Key {
        let mut words = [0; KEY_WORDS];
        words[0] = word(src, 0);
        words[1] = word(src, 1);
        words[2] = word(src, 2);
        words[3] = word(src, 3);
        Key { words, n_words: 4 }
    }

    /// The `four-tuple` key: addresses as 16 bytes each, `ports` as on the wire
    /// (client port then server port, each big-endian).
    #[inline(always)]
    pub fn four_tuple(src: &[u8; 16], dst: &[u8; 16], ports: [u8; 4]) -> Key {
        Key {
            words: [
                word(src, 0),
                word(src, 1),
                word(src, 2),
                word(src, 3),
                word(dst, 0),
                word(dst, 1),
                word(dst, 2),
                word(dst, 3),
                u32::from_le_bytes(ports),
            ],
            n_words: 9,
        }
    }

    /// The payload key: up to 16 payload bytes, zero-padded.
    #[inline(always)]
    pub fn payload(bytes: &[u8; 16]) -> Key {
        let mut key = Key::src_ip(bytes);
        key.n_words = 4;
        key
    }

    /// The key the program computes for a packet from `client` to `server`.
    ///
    /// Returns `None` for [`key::PAYLOAD`](crate::key::PAYLOAD) and unknown
    /// kinds, which do not depend on the addresses.
    pub fn for_addrs(kind: u32, client: SocketAddr, server: SocketAddr) -> Option<Key> {
        let src = addr16(client.ip());
        let dst = addr16(server.ip());
        match kind {
            crate::key::SRC_IP => Some(Key::src_ip(&src)),
            crate::key::FOUR_TUPLE => {
                let c = client.port().to_be_bytes();
                let s = server.port().to_be_bytes();
                Some(Key::four_tuple(&src, &dst, [c[0], c[1], s[0], s[1]]))
            }
            _ => None,
        }
    }
}

/// An address as the 16 bytes the program reads (IPv4 v4-mapped).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// One MurmurHash3 x86_32 body round.
#[inline(always)]
pub fn murmur3_round(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3 x86_32 finalisation for an input of `len` bytes.
#[inline(always)]
pub fn murmur3_finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 x86_32 of the key's bytes with `seed`.
#[inline(always)]
pub fn hash_key(seed: u32, key: &Key) -> u32 {
    let mut h = seed;
    // A constant trip count keeps the eBPF verifier's loop bound obvious.
    let mut i = 0;
    while i < KEY_WORDS {
        if (i as u32) < key.n_words {
            h = murmur3_round(h, key.words[i]);
        }
        i += 1;
    }
    let n = if key.n_words as usize > KEY_WORDS {
        KEY_WORDS as u32
    } else {
        key.n_words
    };
    murmur3_finish(h, n * 4)
}

/// MurmurHash3 x86_32 of a `u32` (as 4 little-endian bytes) with `seed`.
#[inline(always)]
pub fn hash_u32(seed: u32, value: u32) -> u32 {
    murmur3_finish(murmur3_round(seed, value), 4)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use std::{io::Cursor, vec::Vec};

    fn reference(seed: u32, bytes: &[u8]) -> u32 {
        murmur3::murmur3_32(&mut Cursor::new(bytes), seed).unwrap()
    }

    fn key_bytes(key: &Key) -> Vec<u8> {
        key.words[..key.n_words as usize]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn matches_the_published_murmur3_x86_32() {
        for seed in [0, 1, 0xdead_beef, u32::MAX] {
            let src = v4_mapped([127, 0, 0, 9]);
            let dst = addr16(IpAddr::V6(Ipv6Addr::LOCALHOST));
            for key in [
                Key::src_ip(&src),
                Key::four_tuple(&src, &dst, [0x12, 0x34, 0x1e, 0xc6]),
                Key::payload(b"0123456789abcdef"),
            ] {
                let bytes = key_bytes(&key);
                assert_eq!(hash_key(seed, &key), reference(seed, &bytes));
            }
            assert_eq!(hash_u32(seed, 42), reference(seed, &42u32.to_le_bytes()));
        }
    }

    #[test]
    fn key_bytes_are_the_documented_wire_bytes() {
        let client: SocketAddr = (Ipv4Addr::new(127, 1, 2, 3), 0x1234).into();
        let server: SocketAddr = (Ipv4Addr::new(127, 0, 0, 1), 7878).into();
        let k = Key::for_addrs(crate::key::FOUR_TUPLE, client, server).unwrap();
        let mut expect = Vec::new();
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 1, 2, 3]);
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        expect.extend_from_slice(&0x1234u16.to_be_bytes());
        expect.extend_from_slice(&7878u16.to_be_bytes());
        assert_eq!(key_bytes(&k), expect);

        let s = Key::for_addrs(crate::key::SRC_IP, client, server).unwrap();
        assert_eq!(key_bytes(&s), expect[..16]);
    }

    #[test]
    fn v4_and_v4_mapped_clients_hash_alike() {
        let v4: SocketAddr = (Ipv4Addr::new(10, 0, 0, 7), 1000).into();
        let mapped: SocketAddr = (Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped(), 1000).into();
        let server: SocketAddr = (Ipv4Addr::LOCALHOST, 1).into();
        assert_eq!(
            Key::for_addrs(crate::key::SRC_IP, v4, server),
            Key::for_addrs(crate::key::SRC_IP, mapped, server)
        );
    }

    #[test]
    fn seed_changes_the_hash() {
        let k = Key::src_ip(&v4_mapped([127, 0, 0, 1]));
        assert_ne!(hash_key(1, &k), hash_key(2, &k));
    }
}
