//! The flow table of UDP groups: which socket serves each flow, so that a
//! flow keeps its socket when the policy would now place it elsewhere (a
//! worker drained, added, or a takeover's new generation serving).
//!
//! For every UDP datagram, under any policy but `kernel` and with a key
//! that does not name the flow itself (a [`cookie`](crate::cookie) key, or
//! a payload key of a hashing policy; see
//! [`Config::flow_table_on`](crate::Config::flow_table_on)), the program
//! looks the flow (its [`FlowKey`]) up in [`map::FLOWS`](crate::map::FLOWS):
//! - **hit**: the entry is younger than [`Config::flow_timeout_ms`](crate::Config::flow_timeout_ms),
//!   its slot's socket is still the one it names (the same
//!   [`WorkerRecord::generation`](crate::WorkerRecord::generation)) and is
//!   in the socket map: the datagram goes there, draining or not, and the
//!   entry's `last_seen` moves on ([`counter::FLOW_HIT`](crate::counter::FLOW_HIT));
//! - **miss**: anything else: the policy places the datagram, and the
//!   entry is written with the slot it chose ([`counter::FLOW_MISS`](crate::counter::FLOW_MISS));
//!   a new flow recorded in a full table evicts the least recently used
//!   one ([`counter::FLOW_FULL`](crate::counter::FLOW_FULL)).
//!
//! A draining UDP worker keeps its socket in the socket map (out of the
//! policy's live list) so that its flows' datagrams still reach it; it
//! closes once it has received nothing for the flow timeout, or at the
//! drain deadline.

/// A flow: the datagram's addresses (IPv4 as v4-mapped IPv6) and ports,
/// as they are on the wire. The key of [`map::FLOWS`](crate::map::FLOWS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address.
    pub src: [u8; 16],
    /// The group's address the datagram was sent to.
    pub dst: [u8; 16],
    /// Source then destination port, big-endian, as in the UDP header.
    pub ports: [u8; 4],
}

/// What the flow table knows of a flow: the value of
/// [`map::FLOWS`](crate::map::FLOWS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The slot whose socket serves the flow.
    pub slot: u32,
    /// That socket's [`WorkerRecord::generation`](crate::WorkerRecord::generation)
    /// when the flow was placed.
    pub generation: u32,
    /// When a datagram of the flow was last steered (`bpf_ktime_get_ns`:
    /// `CLOCK_MONOTONIC`, in nanoseconds).
    pub last_seen_ns: u64,
}

/// Flow-table size of a UDP group when none is given: flows remembered at
/// once (about 100 bytes of kernel memory each).
pub const DEFAULT_TABLE_SIZE: u32 = 65_536;

/// Flow timeout of a UDP group when none is given, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;

/// Whether an entry last seen at `last_seen_ns` is still fresh at `now_ns`
/// under a timeout of `timeout_ms` (a clock that went backwards, as seen
/// across CPUs, counts as fresh).
#[inline(always)]
pub fn fresh(last_seen_ns: u64, now_ns: u64, timeout_ms: u32) -> bool {
    now_ns.saturating_sub(last_seen_ns) <= u64::from(timeout_ms) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_fresh_up_to_the_timeout() {
        let s = 1_000_000_000u64;
        assert!(fresh(s, s, 30));
        assert!(fresh(s, s + 30_000_000, 30));
        assert!(!fresh(s, s + 30_000_001, 30));
        assert!(fresh(s + 5, s, 30), "another CPU's clock a little behind");
    }
}
