//! The key hash of the `hash` and `consistent` policies.
//!
//! The hash is MurmurHash3, x86 32-bit variant (Austin Appleby's public-domain
//! algorithm), seeded with [`Config::seed`](crate::Config::seed), over the key
//! bytes below. Keys are whole 4-byte words, read little-endian, which is what
//! the algorithm does with its input blocks; so for a key of `4n` bytes this is
//! exactly `MurmurHash3_x86_32(bytes, 4n, seed)` and any implementation of it
//! predicts the program. The program runs the same code as the loader
//! ([`hash_addrs`] is what user space calls to predict it).
//!
//! Key bytes, in network order as they are on the wire:
//! - `src-ip`: the client address as 16 bytes; an IPv4 address is written as
//!   the v4-mapped IPv6 address `::ffff:a.b.c.d`, so a client reaching an IPv4
//!   socket and one reaching a dual-stack IPv6 socket hash alike.
//! - `four-tuple`: client address (16 bytes, as above), server address
//!   (16 bytes), client port (2 bytes), server port (2 bytes): 36 bytes.
//! - `payload:OFFSET:LEN`: the LEN payload bytes, zero-padded to 16 bytes.

use core::net::{IpAddr, SocketAddr};

/// An IPv4 address as the 16 bytes of its v4-mapped IPv6 form.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
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

/// MurmurHash3 x86_32 over whole 4-byte words, fed one word at a time.
///
/// No buffer is built: the program feeds the words it has read, which
/// keeps it free of the byte-wise `memset` calls that zeroing a key buffer
/// costs in BPF.
#[derive(Clone, Copy, Debug)]
pub struct Murmur3 {
    h: u32,
    len: u32,
}

impl Murmur3 {
    /// A hash seeded with `seed`.
    #[inline(always)]
    pub const fn new(seed: u32) -> Self {
        Murmur3 { h: seed, len: 0 }
    }

    /// Feeds one block: 4 key bytes read little-endian.
    #[inline(always)]
    pub fn word(self, k: u32) -> Self {
        let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        let h = (self.h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
        Murmur3 {
            h,
            len: self.len.wrapping_add(4),
        }
    }

    /// Feeds 16 bytes (4 blocks).
    #[inline(always)]
    pub fn bytes16(self, b: &[u8; 16]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        self.word(w(0)).word(w(4)).word(w(8)).word(w(12))
    }

    /// The hash of everything fed.
    #[inline(always)]
    pub fn finish(self) -> u32 {
        let mut h = self.h ^ self.len;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
}

/// The `src-ip` key's hash: the client address as 16 bytes.
#[inline(always)]
pub fn hash_src_ip(seed: u32, src: &[u8; 16]) -> u32 {
    Murmur3::new(seed).bytes16(src).finish()
}

/// The `four-tuple` key's hash: addresses as 16 bytes each, then `ports` as
/// on the wire (client port then server port, each big-endian).
#[inline(always)]
pub fn hash_four_tuple(seed: u32, src: &[u8; 16], dst: &[u8; 16], ports: [u8; 4]) -> u32 {
    Murmur3::new(seed)
        .bytes16(src)
        .bytes16(dst)
        .word(u32::from_le_bytes(ports))
        .finish()
}

/// The payload key's hash: up to 16 payload bytes, zero-padded to 16.
#[inline(always)]
pub fn hash_payload(seed: u32, bytes: &[u8; 16]) -> u32 {
    Murmur3::new(seed).bytes16(bytes).finish()
}

/// The `quic` key's hash: the first 8 bytes of a QUIC destination
/// connection ID (every Initial's is at least 8 bytes long, RFC 9000
/// section 7.2), as two little-endian words: `MurmurHash3_x86_32(dcid, 8, seed)`.
#[inline(always)]
pub fn hash_dcid(seed: u32, dcid: &[u8; 8]) -> u32 {
    Murmur3::new(seed)
        .word(u32::from_le_bytes([dcid[0], dcid[1], dcid[2], dcid[3]]))
        .word(u32::from_le_bytes([dcid[4], dcid[5], dcid[6], dcid[7]]))
        .finish()
}

/// MurmurHash3 x86_32 of a `u32` (as 4 little-endian bytes) with `seed`.
#[inline(always)]
pub fn hash_u32(seed: u32, value: u32) -> u32 {
    Murmur3::new(seed).word(value).finish()
}

/// The hash the program computes for a connection from `client` to
/// `server` with key `kind` ([`key::SRC_IP`](crate::key::SRC_IP) or
/// [`key::FOUR_TUPLE`](crate::key::FOUR_TUPLE); `None` for other kinds,
/// which do not depend on the addresses).
pub fn hash_addrs(kind: u32, seed: u32, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let src = addr16(client.ip());
    match kind {
        crate::key::SRC_IP => Some(hash_src_ip(seed, &src)),
        crate::key::FOUR_TUPLE => {
            let c = client.port().to_be_bytes();
            let s = server.port().to_be_bytes();
            Some(hash_four_tuple(
                seed,
                &src,
                &addr16(server.ip()),
                [c[0], c[1], s[0], s[1]],
            ))
        }
        _ => None,
    }
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

    #[test]
    fn matches_the_published_murmur3_x86_32() {
        for seed in [0, 1, 0xdead_beef, u32::MAX] {
            let src = v4_mapped([127, 0, 0, 9]);
            let dst = addr16(IpAddr::V6(Ipv6Addr::LOCALHOST));
            assert_eq!(hash_src_ip(seed, &src), reference(seed, &src));
            let mut tuple = Vec::new();
            tuple.extend_from_slice(&src);
            tuple.extend_from_slice(&dst);
            tuple.extend_from_slice(&[0x12, 0x34, 0x1e, 0xc6]);
            assert_eq!(
                hash_four_tuple(seed, &src, &dst, [0x12, 0x34, 0x1e, 0xc6]),
                reference(seed, &tuple)
            );
            assert_eq!(
                hash_payload(seed, b"0123456789abcdef"),
                reference(seed, b"0123456789abcdef")
            );
            assert_eq!(hash_u32(seed, 42), reference(seed, &42u32.to_le_bytes()));
            assert_eq!(hash_dcid(seed, b"quic-cid"), reference(seed, b"quic-cid"));
        }
    }

    #[test]
    fn address_keys_are_the_documented_wire_bytes() {
        let client: SocketAddr = (Ipv4Addr::new(127, 1, 2, 3), 0x1234).into();
        let server: SocketAddr = (Ipv4Addr::new(127, 0, 0, 1), 7878).into();
        let mut expect = Vec::new();
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 1, 2, 3]);
        assert_eq!(
            hash_addrs(crate::key::SRC_IP, 5, client, server),
            Some(reference(5, &expect))
        );
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        expect.extend_from_slice(&0x1234u16.to_be_bytes());
        expect.extend_from_slice(&7878u16.to_be_bytes());
        assert_eq!(
            hash_addrs(crate::key::FOUR_TUPLE, 5, client, server),
            Some(reference(5, &expect))
        );
        assert_eq!(hash_addrs(crate::key::PAYLOAD, 5, client, server), None);
    }

    #[test]
    fn v4_and_v4_mapped_clients_hash_alike() {
        let v4: SocketAddr = (Ipv4Addr::new(10, 0, 0, 7), 1000).into();
        let mapped: SocketAddr = (Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped(), 1000).into();
        let server: SocketAddr = (Ipv4Addr::LOCALHOST, 1).into();
        assert_eq!(
            hash_addrs(crate::key::SRC_IP, 0, v4, server),
            hash_addrs(crate::key::SRC_IP, 0, mapped, server)
        );
    }

    #[test]
    fn seed_changes_the_hash() {
        let k = v4_mapped([127, 0, 0, 1]);
        assert_ne!(hash_src_ip(1, &k), hash_src_ip(2, &k));
    }
}
