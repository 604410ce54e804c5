//! Programs of the test build only (feature `test-programs`), never in the
//! object the library embeds.
//!
//! The benchmark loads them next to the steering program, in the same
//! epochs, to show what bounds a policy's cost: [`floor`] selects a fixed
//! slot and nothing else, and each `cost_*` program adds one step of the
//! steering path to it (one helper call, one atomic add, ...), so its
//! excess over the floor is that step's cost alone. [`round_robin_per_cpu`]
//! is the per-CPU ticket variant of round robin, measured but not offered,
//! and [`round_robin_shared`] the same path with the shared ticket.
//! [`verifier_reject`] is the verifier-rejection test's program.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action},
    helpers::bpf_get_smp_processor_id,
    macros::{map, sk_reuseport},
    maps::PerCpuArray,
    programs::SkReuseportContext,
};
use reuseport_common::{
    counter,
    hash::{hash_four_tuple, v4_mapped},
    Config, LEAST_LOADED_CHOICES,
};

use super::{add, finish, load, next_ticket, select, table, COUNTERS, SOCKETS, STATE, WORKERS};

/// The cost floor: selects slot 0 and does nothing else. Benchmarks compare
/// every policy with it in the same epochs.
#[sk_reuseport]
pub fn floor(ctx: SkReuseportContext) -> u32 {
    let _ = SOCKETS.select_reuseport(&ctx, 0);
    sk_action::SK_PASS
}

/// A run that selects nothing (the kernel's hash decides): what a program
/// run itself costs, with the statistics' clock reads.
#[sk_reuseport]
pub fn empty(_ctx: SkReuseportContext) -> u32 {
    sk_action::SK_PASS
}

/// The floor plus the per-CPU counter record: one lookup, one add, as
/// every steering run does.
#[sk_reuseport]
pub fn cost_counter(ctx: SkReuseportContext) -> u32 {
    add(COUNTERS.get_ptr_mut(0), counter::SELECTED_BASE);
    let _ = SOCKETS.select_reuseport(&ctx, 0);
    sk_action::SK_PASS
}

/// The floor plus the configuration: the state's lookup, the generation
/// in force, and the live slot at the flow hash, which it selects.
#[sk_reuseport]
pub fn cost_config(ctx: SkReuseportContext) -> u32 {
    if let Some(state) = STATE.get_ptr_mut(0) {
        // SAFETY: a map value (see `try_steer`).
        let generation =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).active)) } & 1;
        let cfg: &Config = unsafe { &(*state).config[generation as usize] };
        if let Some(slot) = cfg.live_at(ctx.hash()) {
            let _ = SOCKETS.select_reuseport(&ctx, slot);
        }
    }
    sk_action::SK_PASS
}

/// The floor plus one `bpf_skb_load_bytes_relative` call: the 4 bytes of
/// an IPv4 header's source address, as `src-ip` reads them.
#[sk_reuseport]
pub fn cost_load_bytes(ctx: SkReuseportContext) -> u32 {
    let src = load::<4>(&ctx, 12, BPF_HDR_START_NET).unwrap_or([0; 4]);
    // The bytes decide the slot (always 0 for a source in 127.0.0.0/8), so
    // the compiler cannot drop the call.
    let _ = SOCKETS.select_reuseport(&ctx, u32::from(src[0] == 0));
    sk_action::SK_PASS
}

/// The floor plus the shared ticket's atomic fetch-and-add (one cache line
/// for every CPU), as `round-robin` and `weighted` take it.
#[sk_reuseport]
pub fn cost_atomic(ctx: SkReuseportContext) -> u32 {
    let ticket = STATE.get_ptr_mut(0).map_or(0, next_ticket);
    // The ticket decides the slot (0 but once in 2^64 runs).
    let _ = SOCKETS.select_reuseport(&ctx, u32::from(ticket == u64::MAX));
    sk_action::SK_PASS
}

/// The floor plus a MurmurHash3 of a four-tuple (from the flow hash's
/// bytes: no packet read), as `four-tuple` hashes it.
#[sk_reuseport]
pub fn cost_murmur(ctx: SkReuseportContext) -> u32 {
    let h = ctx.hash();
    let a = v4_mapped(h.to_ne_bytes());
    let x = hash_four_tuple(h, &a, &a, h.to_be_bytes());
    let _ = SOCKETS.select_reuseport(&ctx, u32::from(x == 0x5eed_5eed));
    sk_action::SK_PASS
}

/// The floor plus the Maglev table: one entry of the generation's table
/// at the flow hash (a second map lookup and a read at random in 16 KiB),
/// which it selects, as `consistent` does. Next to [`cost_config`] (which
/// also selects every worker in turn) it shows the table's own cost.
#[sk_reuseport]
pub fn cost_table(ctx: SkReuseportContext) -> u32 {
    if let Some(state) = STATE.get_ptr_mut(0) {
        // SAFETY: a map value (see `try_steer`).
        let generation =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).active)) } & 1;
        let cfg: &Config = unsafe { &(*state).config[generation as usize] };
        if cfg.table_len > 0 {
            if let Ok(slot) = table(generation, ctx.hash() % cfg.table_len) {
                let _ = SOCKETS.select_reuseport(&ctx, slot);
            }
        }
    }
    sk_action::SK_PASS
}

/// The floor plus what `least-loaded` reads and writes: the load of up to
/// [`LEAST_LOADED_CHOICES`] live workers (each on a cache line of its own,
/// which its worker writes) and the atomic add on the least loaded one's.
/// It still selects slot 0.
#[sk_reuseport]
pub fn cost_loads(ctx: SkReuseportContext) -> u32 {
    if let Some(state) = STATE.get_ptr_mut(0) {
        // SAFETY: a map value (see `try_steer`).
        let generation =
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).active)) } & 1;
        let cfg: &Config = unsafe { &(*state).config[generation as usize] };
        let mut best = 0;
        let mut best_load = u64::MAX;
        let mut i = 0;
        while i < LEAST_LOADED_CHOICES {
            if i >= cfg.n_live {
                break;
            }
            if let Some(slot) = cfg.live_at(i) {
                // SAFETY: see `select`; an aligned 8-byte load is atomic.
                let load = WORKERS
                    .get_ptr(slot)
                    .map(|r| unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*r).load)) })
                    .unwrap_or(u64::MAX);
                if load < best_load {
                    best = slot;
                    best_load = load;
                }
            }
            i += 1;
        }
        if let Some(rec) = WORKERS.get_ptr_mut(best) {
            // SAFETY: see `select`.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                    core::ptr::addr_of_mut!((*rec).load),
                    1,
                )
            };
        }
    }
    let _ = SOCKETS.select_reuseport(&ctx, 0);
    sk_action::SK_PASS
}

/// Per-CPU tickets: each CPU's own counter, no shared cache line.
#[map]
static TICKETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `round-robin` with per-CPU tickets: each CPU walks the live slots from
/// its own offset. No cache line moves between CPUs, but the promise of
/// exact round robin (every worker within one of the others) no longer
/// holds: each CPU's walk is exact, their sum is only within one per CPU.
#[sk_reuseport]
pub fn round_robin_per_cpu(ctx: SkReuseportContext) -> u32 {
    let counters = COUNTERS.get_ptr_mut(0);
    finish(&ctx, counters, per_cpu_ticket(&ctx))
}

/// The same path as [`round_robin_per_cpu`] with the shared ticket
/// instead: what the shared ticket costs, everything else equal.
#[sk_reuseport]
pub fn round_robin_shared(ctx: SkReuseportContext) -> u32 {
    let counters = COUNTERS.get_ptr_mut(0);
    finish(&ctx, counters, ticket_turn(&ctx, false))
}

#[inline(always)]
fn per_cpu_ticket(ctx: &SkReuseportContext) -> Result<u32, ()> {
    ticket_turn(ctx, true)
}

/// Round robin by a per-CPU ticket (from this CPU's offset) or the shared
/// one.
#[inline(always)]
fn ticket_turn(ctx: &SkReuseportContext, per_cpu: bool) -> Result<u32, ()> {
    let state = STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: as in `try_steer`.
    let generation = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).active)) } & 1;
    let cfg: &Config = unsafe { &(*state).config[generation as usize] };
    let ticket = if per_cpu {
        let t = TICKETS.get_ptr_mut(0).ok_or(())?;
        // SAFETY: this CPU's own value; runs on one CPU do not overlap.
        let ticket = unsafe {
            let v = *t;
            *t = v + 1;
            v as u32
        };
        // SAFETY: a helper without arguments or side effects.
        ticket.wrapping_add(unsafe { bpf_get_smp_processor_id() })
    } else {
        next_ticket(state) as u32
    };
    let slot = cfg.live_at(ticket).ok_or(())?;
    select(ctx, cfg, slot)?;
    Ok(slot)
}

/// Reads packet data without a bounds check, which the verifier must
/// refuse. Loaded only by the tests of the verifier-rejection error path.
#[sk_reuseport]
pub fn verifier_reject(ctx: SkReuseportContext) -> u32 {
    // SAFETY: never runs: the verifier rejects the program at load time.
    unsafe { core::ptr::read_volatile(ctx.data() as *const u32) }
}
