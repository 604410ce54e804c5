//! The flow table of UDP groups (see `reuseport_common::flow`): a flow
//! keeps the socket that served it, in the generation that served it, for
//! as long as it is not idle, even once the policy would place it
//! elsewhere (its worker draining, a takeover's new workers serving).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap, programs::SkReuseportContext,
};
use reuseport_common::{
    counter,
    flow::{fresh, FlowEntry, FlowKey},
    Config, Counters, State,
};

use crate::{add, addresses, l4_ports, select, IPPROTO_UDP, WORKERS};

/// Sized by user space when the group is created (`--flow-table-size`);
/// 1 here only so that the object declares it. An LRU map: when it is full
/// the kernel evicts the least recently used flow for a new one.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(1, 0);

/// What the flow table said about a datagram.
pub(crate) enum Flow {
    /// No flow table for this datagram: not UDP, the `kernel` policy, a
    /// key with cookies (which name their socket themselves), or no table
    /// configured.
    Off,
    /// A known flow, sent to this slot's socket.
    Hit(u32),
    /// An unknown flow (or one whose entry is idle, or names a socket no
    /// longer there): to be recorded where the policy puts it.
    Miss {
        key: FlowKey,
        /// The key had no entry at all (rather than an outdated one).
        new: bool,
        now: u64,
    },
}

/// Looks the datagram's flow up; on a hit, selects its socket.
#[inline(always)]
pub(crate) fn lookup(
    ctx: &SkReuseportContext,
    cfg: &Config,
    counters: Option<*mut Counters>,
) -> Flow {
    if !cfg.flow_table_consulted() || ctx.ip_protocol() != IPPROTO_UDP {
        return Flow::Off;
    }
    let Some(key) = flow_key(ctx) else {
        return Flow::Off;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(entry) = FLOWS.get_ptr_mut(key) else {
        add(counters, counter::FLOW_MISS);
        return Flow::Miss {
            key,
            new: true,
            now,
        };
    };
    // SAFETY: a map value, valid for this run (RCU); a concurrent update
    // of the same flow on another CPU writes the same kind of values.
    let (slot, generation, seen) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*entry).slot)),
            core::ptr::read_volatile(core::ptr::addr_of!((*entry).generation)),
            core::ptr::read_volatile(core::ptr::addr_of!((*entry).last_seen_ns)),
        )
    };
    // Its socket still there, the same one (not a later worker's in the
    // same slot): draining or serving, it gets the datagram.
    if fresh(seen, now, cfg.flow_timeout_ms) && generation_of(slot) == Some(generation) {
        if select(ctx, cfg, slot).is_ok() {
            // SAFETY: as above.
            unsafe {
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*entry).last_seen_ns), now)
            };
            add(counters, counter::FLOW_HIT);
            return Flow::Hit(slot);
        }
        // Its worker is gone (a fault hook emptied the slot): the policy
        // places the flow anew.
        add(counters, counter::EMPTY_SLOT);
    }
    add(counters, counter::FLOW_MISS);
    Flow::Miss {
        key,
        new: false,
        now,
    }
}

/// Records a missed flow with the slot the policy gave it.
#[inline(always)]
pub(crate) fn record(
    flow: &Flow,
    state: *mut State,
    cfg: &Config,
    slot: u32,
    counters: Option<*mut Counters>,
) {
    let Flow::Miss { key, new, now } = flow else {
        return;
    };
    let entry = FlowEntry {
        slot,
        generation: generation_of(slot).unwrap_or(0),
        last_seen_ns: *now,
    };
    // BPF_ANY: replaces an outdated entry of the same flow in place.
    if FLOWS.insert(key, entry, 0).is_err() {
        add(counters, counter::FLOW_FULL);
        return;
    }
    if *new {
        // SAFETY: a map value; the count has its own cache line with the
        // tickets, and only this add writes it in the kernel.
        let before = unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                core::ptr::addr_of_mut!((*state).flow_inserts),
                1,
            )
        };
        if before >= u64::from(cfg.flow_table_size) {
            add(counters, counter::FLOW_FULL);
        }
    }
}

/// The generation of `slot`'s socket.
#[inline(always)]
fn generation_of(slot: u32) -> Option<u32> {
    let rec = WORKERS.get_ptr(slot)?;
    // SAFETY: an array map value; an aligned 4-byte load is atomic.
    Some(unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*rec).generation)) })
}

/// The datagram's addresses and ports.
#[inline(always)]
fn flow_key(ctx: &SkReuseportContext) -> Option<FlowKey> {
    let (src, dst) = addresses(ctx)?;
    Some(FlowKey {
        src,
        dst,
        ports: l4_ports(ctx)?,
    })
}
