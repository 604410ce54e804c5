//! Cookies: a small record a server mints into the datagrams its clients
//! send back (a QUIC connection ID it chose, or a field of its own
//! protocol), naming the socket that serves the flow.
//!
//! The program reads a cookie at the key's offset (`--hash-key
//! cookie:OFFSET`, or the start of a QUIC destination connection ID under
//! `--hash-key quic`). A valid cookie steers the datagram to its slot's
//! socket, provided that socket is still the one the cookie was minted for
//! (the slot's [`WorkerRecord::generation`](crate::WorkerRecord::generation));
//! anything else is a new flow and goes by the policy.
//!
//! Layout, [`LEN`] bytes, all big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..2 | slot |
//! | 2..4 | generation of the slot's socket |
//! | 4..8 | check: [`check`] of the group's cookie secret, slot and generation |
//!
//! The check keeps bytes that merely look like a cookie (a client's random
//! connection ID, another protocol's payload) from steering: a random
//! record passes it once in 2^32. It is not a secret the client must not
//! learn; a forged cookie can only pick a socket of the group.

use crate::hash::hash_u32;

/// Length of a cookie in bytes.
pub const LEN: usize = 8;

/// What a cookie names: a slot, and which socket in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie {
    /// The slot of the socket that serves the flow.
    pub slot: u16,
    /// The slot's socket's generation when the cookie was minted.
    pub generation: u16,
}

/// The check bits of a cookie for `slot` and `generation` under the group's
/// cookie `secret` (`Config::cookie_secret`).
#[inline(always)]
pub fn check(secret: u32, slot: u16, generation: u16) -> u32 {
    hash_u32(secret, (u32::from(slot) << 16) | u32::from(generation))
}

/// The bytes of `cookie` under `secret`.
pub fn mint(secret: u32, cookie: Cookie) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..2].copy_from_slice(&cookie.slot.to_be_bytes());
    b[2..4].copy_from_slice(&cookie.generation.to_be_bytes());
    b[4..].copy_from_slice(&check(secret, cookie.slot, cookie.generation).to_be_bytes());
    b
}

/// The cookie in `bytes`, if its check holds under `secret`.
#[inline(always)]
pub fn read(secret: u32, bytes: &[u8; LEN]) -> Option<Cookie> {
    let slot = u16::from_be_bytes([bytes[0], bytes[1]]);
    let generation = u16::from_be_bytes([bytes[2], bytes[3]]);
    let got = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (got == check(secret, slot, generation)).then_some(Cookie { slot, generation })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_cookie_reads_back_and_a_changed_one_does_not() {
        let c = Cookie {
            slot: 513,
            generation: 7,
        };
        let b = mint(0xdead_beef, c);
        assert_eq!(read(0xdead_beef, &b), Some(c));
        assert_eq!(read(0xdead_bef0, &b), None, "another group's secret");
        for i in 0..LEN {
            let mut x = b;
            x[i] ^= 1;
            assert_eq!(read(0xdead_beef, &x), None, "byte {i} changed");
        }
    }
}
