//! Cookies a server mints, so that its clients' later datagrams come back
//! to the worker that serves their flow: through drains, added workers and
//! client address changes (QUIC connection migration).
//!
//! A group steered with `--hash-key cookie:OFFSET` (or
//! [`HashKey::Cookie`](crate::HashKey::Cookie)) reads a cookie at that
//! offset of every datagram's payload; with `--hash-key quic`
//! ([`HashKey::Quic`](crate::HashKey::Quic)) at the start of the QUIC
//! destination connection ID. A worker mints its cookies with its
//! [`Minter`] and puts them where its clients echo them back: into a
//! field of its own protocol, or the first [`LEN`] bytes of every
//! connection ID it issues. The bytes are laid out in
//! `reuseport_common::cookie`.
//!
//! A cookie names a slot and the generation of the slot's socket: once the
//! worker's socket is gone or replaced, its cookies no longer steer (the
//! datagram goes by the policy, counted `cookie_old`).

pub use reuseport_common::cookie::{Cookie, LEN};

/// Mints and reads the cookies of one worker's socket: the group's secret,
/// the worker's slot and its socket's generation.
///
/// Get one from [`UdpWorker::minter`](crate::UdpWorker) (a worker of
/// [`Server::start_udp_with`](crate::Server::start_udp_with)) or
/// [`Group::cookie_minter`](crate::Group::cookie_minter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Minter {
    secret: u32,
    cookie: Cookie,
}

impl Minter {
    /// The minter of slot `slot`'s socket of generation `generation` in a
    /// group whose cookie secret is `secret`.
    pub fn new(secret: u32, slot: u32, generation: u16) -> Minter {
        Minter {
            secret,
            cookie: Cookie {
                // Slots are below MAX_WORKERS (1024): they fit.
                slot: slot as u16,
                generation,
            },
        }
    }

    /// The worker's cookie: [`LEN`] bytes that steer to its socket.
    pub fn mint(&self) -> [u8; LEN] {
        reuseport_common::cookie::mint(self.secret, self.cookie)
    }

    /// The cookie at the start of `bytes` if it is one of this group's
    /// (whichever worker minted it); `None` if `bytes` is shorter than
    /// [`LEN`] or its check fails.
    pub fn read(&self, bytes: &[u8]) -> Option<Cookie> {
        let b: &[u8; LEN] = bytes.get(..LEN)?.try_into().ok()?;
        reuseport_common::cookie::read(self.secret, b)
    }

    /// Whether `bytes` start with this worker's own cookie.
    pub fn is_mine(&self, bytes: &[u8]) -> bool {
        self.read(bytes) == Some(self.cookie)
    }

    /// The slot and generation this minter's cookies name.
    pub fn cookie(&self) -> Cookie {
        self.cookie
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minter_reads_its_own_cookies_and_tells_other_workers_apart() {
        let a = Minter::new(99, 3, 7);
        let b = Minter::new(99, 4, 7);
        let stranger = Minter::new(100, 3, 7);
        let mut cid = a.mint().to_vec();
        cid.extend_from_slice(b"random tail");
        assert!(a.is_mine(&cid));
        assert_eq!(b.read(&cid), Some(a.cookie()), "same group: readable");
        assert!(!b.is_mine(&cid));
        assert_eq!(stranger.read(&cid), None, "another group's secret");
        assert_eq!(a.read(&cid[..LEN - 1]), None, "too short");
        assert!(!Minter::new(99, 3, 8).is_mine(&cid), "a newer socket");
    }
}
