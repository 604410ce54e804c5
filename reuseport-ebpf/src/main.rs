//! The `SK_REUSEPORT` program of a reuseport group.
//!
//! The kernel runs [`steer`] for every new TCP connection (on its SYN) and
//! every UDP datagram that reaches the group, before it picks a socket
//! (`reuseport_select_sock` in `net/core/sock_reuseport.c`). The program reads
//! the policy in force from `CONFIG`, picks a slot, and hands the packet to
//! that slot's socket with `bpf_sk_select_reuseport`. Every run ends in
//! exactly one outcome counter (a slot's selections, a fallback, or a drop),
//! so user space can always tell this program's steering from the kernel's.
//!
//! Policy is data: changing it is a map write from user space, never a
//! reload. See `reuseport-common` for the layout of every map.
#![no_std]
#![no_main]
// The bpfel target has no compare-and-swap, so core's atomic types lack
// `fetch_add`; the intrinsic lowers to BPF's atomic fetch-and-add (ISA v3,
// kernel 5.12+). Always SeqCst: LLVM 22 lowers a Relaxed fetch-add whose
// result is used to the plain add without BPF_FETCH (a miscompile).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action, BPF_F_MMAPABLE},
    helpers::{bpf_get_smp_processor_id, bpf_skb_load_bytes, bpf_skb_load_bytes_relative},
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
    EbpfContext,
};
use aya_log_ebpf::trace;
use reuseport_common::{
    counter,
    hash::{hash_key, v4_mapped, Key},
    key, policy, Config, MAX_WORKERS, TABLE_CAPACITY,
};

#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_WORKERS, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(2, 0);

#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static TABLE: Array<u32> = Array::with_max_entries(2 * TABLE_CAPACITY, 0);

#[map]
static TICKETS: Array<u64> = Array::with_max_entries(1, 0);

/// Memory-mappable so that workers can decrement their own entry with an
/// atomic instruction instead of a syscall per closed connection.
#[map]
static LOAD: Array<u32> = Array::with_max_entries(MAX_WORKERS, BPF_F_MMAPABLE);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// `ETH_P_IP` and `ETH_P_IPV6` as the context reports them (network order).
const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPPROTO_UDP: u32 = 17;
const UDP_HEADER_LEN: u32 = 8;

/// The steering program. Attached with `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`,
/// so the kernel also asks it where to move the queued and half-open
/// connections of a listener that closes.
#[sk_reuseport(migrate)]
pub fn steer(ctx: SkReuseportContext) -> u32 {
    match try_steer(&ctx) {
        Ok(slot) => {
            count(counter::SELECTED_BASE + slot);
            // Pruned by the verifier unless user space raised AYA_LOG_LEVEL
            // to trace at load time, so it costs nothing when off.
            trace!(&ctx, "selected slot {}", slot);
        }
        Err(()) => count(counter::FALLBACK),
    }
    // Returned whether or not a socket was selected: without a selection
    // the kernel falls back to its own hash, never drops.
    sk_action::SK_PASS
}

/// Selects a socket and returns its slot, or `Err` to leave the choice to
/// the kernel's hash.
#[inline(always)]
fn try_steer(ctx: &SkReuseportContext) -> Result<u32, ()> {
    let generation = ACTIVE.get(0).copied().unwrap_or(0) & 1;
    let cfg = CONFIG.get(generation).ok_or(())?;
    let base = generation * TABLE_CAPACITY;
    if ctx.migrating_sk().is_some() {
        count(counter::MIGRATED);
    }
    // Each policy returns its first choice and a position in the live list
    // from which to look further if that slot turns out empty.
    let (first, probe_from) = match cfg.policy {
        policy::CPU => by_cpu(ctx, cfg, base)?,
        policy::HASH => by_hash(ctx, cfg)?,
        policy::ROUND_ROBIN => round_robin(cfg)?,
        policy::LEAST_LOADED => least_loaded(cfg)?,
        policy::WEIGHTED => weighted(cfg, base)?,
        policy::CONSISTENT => consistent(ctx, cfg, base)?,
        _ => return Err(()),
    };
    if select(ctx, cfg, first).is_ok() {
        return Ok(first);
    }
    count(counter::EMPTY_SLOT);
    // The slot is empty (its worker is gone or draining and user space has
    // not rebuilt the configuration yet): try the next live slots in turn.
    let mut i = 1;
    while i <= MAX_WORKERS {
        if i > cfg.n_live {
            break;
        }
        let slot = cfg.live_at(probe_from.wrapping_add(i)).ok_or(())?;
        if slot != first {
            if select(ctx, cfg, slot).is_ok() {
                return Ok(slot);
            }
            count(counter::EMPTY_SLOT);
        }
        i += 1;
    }
    Err(())
}

#[inline(always)]
fn select(ctx: &SkReuseportContext, cfg: &Config, slot: u32) -> Result<(), ()> {
    SOCKETS.select_reuseport(ctx, slot).map_err(|_| ())?;
    if cfg.policy == policy::LEAST_LOADED {
        // Count the connection as open from the moment it is steered, so a
        // burst of SYNs does not all go to the same least-loaded worker.
        if let Some(load) = LOAD.get_ptr_mut(slot) {
            // SAFETY: an array map value is valid, aligned memory for as
            // long as the map exists; the map outlives this program run.
            unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(load, 1) };
        }
    }
    Ok(())
}

#[inline(always)]
fn table(base: u32, index: u32) -> Result<u32, ()> {
    if index >= TABLE_CAPACITY {
        return Err(());
    }
    TABLE.get(base + index).copied().ok_or(())
}

/// `cpu`: the slot of a worker pinned to the CPU that received the packet.
#[inline(always)]
fn by_cpu(ctx: &SkReuseportContext, cfg: &Config, base: u32) -> Result<(u32, u32), ()> {
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let index = cfg.cpu_index(cpu, ctx.hash()).ok_or(())?;
    Ok((table(base, index)?, ctx.hash()))
}

/// `hash`: the live slot at the key's hash modulo the live slots.
#[inline(always)]
fn by_hash(ctx: &SkReuseportContext, cfg: &Config) -> Result<(u32, u32), ()> {
    let h = key_hash(ctx, cfg)?;
    Ok((cfg.live_at(h).ok_or(())?, h))
}

/// `round-robin`: the next ticket modulo the live slots.
#[inline(always)]
fn round_robin(cfg: &Config) -> Result<(u32, u32), ()> {
    let ticket = next_ticket()? as u32;
    Ok((cfg.live_at(ticket).ok_or(())?, ticket))
}

/// `least-loaded`: the live slot with the fewest open connections; the
/// first in live order among equals.
#[inline(always)]
fn least_loaded(cfg: &Config) -> Result<(u32, u32), ()> {
    let mut best = cfg.live_at(0).ok_or(())?;
    let mut best_load = u32::MAX;
    // Only map values flow into `best`: were the loop index kept with it,
    // every iteration would double the verifier's states.
    let mut i = 0;
    while i < MAX_WORKERS {
        if i >= cfg.n_live {
            break;
        }
        let slot = cfg.live_at(i).ok_or(())?;
        // SAFETY: see `select`; an aligned 4-byte load is atomic.
        let load = LOAD
            .get_ptr(slot)
            .map(|p| unsafe { core::ptr::read_volatile(p) })
            .unwrap_or(u32::MAX);
        if load < best_load {
            best = slot;
            best_load = load;
        }
        i += 1;
    }
    Ok((best, best))
}

/// `weighted`: the next ticket's entry of the weighted sequence.
#[inline(always)]
fn weighted(cfg: &Config, base: u32) -> Result<(u32, u32), ()> {
    if cfg.table_len == 0 {
        return Err(());
    }
    let ticket = (next_ticket()? % u64::from(cfg.table_len)) as u32;
    Ok((table(base, ticket)?, ticket))
}

/// `consistent`: the Maglev table entry at the key's hash.
#[inline(always)]
fn consistent(ctx: &SkReuseportContext, cfg: &Config, base: u32) -> Result<(u32, u32), ()> {
    if cfg.table_len == 0 {
        return Err(());
    }
    let h = key_hash(ctx, cfg)?;
    Ok((table(base, h % cfg.table_len)?, h))
}

#[inline(always)]
fn next_ticket() -> Result<u64, ()> {
    let p = TICKETS.get_ptr_mut(0).ok_or(())?;
    // SAFETY: see `select`.
    Ok(unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) })
}

/// The configured key's MurmurHash3 (see `reuseport_common::hash`). A key
/// that cannot be read falls back to the kernel's flow hash, counted.
#[inline(always)]
fn key_hash(ctx: &SkReuseportContext, cfg: &Config) -> Result<u32, ()> {
    let key = match cfg.key {
        key::SRC_IP | key::FOUR_TUPLE => addr_key(ctx, cfg.key),
        key::PAYLOAD => payload_key(ctx, cfg),
        _ => None,
    };
    match key {
        Some(key) => Ok(hash_key(cfg.seed, &key)),
        None => Ok(ctx.hash()),
    }
}

/// Builds the `src-ip` or `four-tuple` key from the IP and L4 headers.
#[inline(always)]
fn addr_key(ctx: &SkReuseportContext, kind: u32) -> Option<Key> {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    match ctx.eth_protocol() {
        ETH_P_IP_BE => {
            // IPv4 header: source at 12, destination at 16.
            let mut addrs = [0u8; 8];
            load_net(ctx, 12, &mut addrs)?;
            src = v4_mapped([addrs[0], addrs[1], addrs[2], addrs[3]]);
            dst = v4_mapped([addrs[4], addrs[5], addrs[6], addrs[7]]);
        }
        ETH_P_IPV6_BE => {
            // IPv6 header: source at 8, destination at 24.
            load_net(ctx, 8, &mut src)?;
            load_net(ctx, 24, &mut dst)?;
        }
        _ => {
            count(counter::KEY_UNREADABLE);
            return None;
        }
    }
    if kind == key::SRC_IP {
        return Some(Key::src_ip(&src));
    }
    // Both TCP and UDP start with source port then destination port; the
    // context's data begins at the L4 header.
    let mut ports = [0u8; 4];
    // SAFETY: the helper writes at most `ports.len()` bytes into `ports`.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            0,
            ports.as_mut_ptr().cast(),
            ports.len() as u32,
        )
    };
    if ret != 0 {
        count(counter::KEY_UNREADABLE);
        return None;
    }
    Some(Key::four_tuple(&src, &dst, ports))
}

/// Reads `buf.len()` bytes at `offset` from the start of the IP header.
#[inline(always)]
fn load_net<const N: usize>(
    ctx: &SkReuseportContext,
    offset: u32,
    buf: &mut [u8; N],
) -> Option<()> {
    // SAFETY: the helper writes at most `N` bytes into `buf`.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    if ret == 0 {
        Some(())
    } else {
        count(counter::KEY_UNREADABLE);
        None
    }
}

/// Builds the payload key: `payload_len` bytes at `payload_offset` of a UDP
/// datagram's payload, zero-padded. Too short a datagram gives `None`.
#[inline(always)]
fn payload_key(ctx: &SkReuseportContext, cfg: &Config) -> Option<Key> {
    let len = cfg.payload_len;
    if ctx.ip_protocol() != IPPROTO_UDP || len == 0 || len > 16 {
        count(counter::KEY_UNREADABLE);
        return None;
    }
    let start = UDP_HEADER_LEN.checked_add(cfg.payload_offset)?;
    if (ctx.len() as u32) < start.checked_add(len)? {
        count(counter::SHORT_PAYLOAD);
        return None;
    }
    let mut bytes = [0u8; 16];
    // SAFETY: `len` is in 1..=16, the size of `bytes`.
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.as_ptr(), start, bytes.as_mut_ptr().cast(), len & 0x1f) };
    if ret != 0 {
        count(counter::SHORT_PAYLOAD);
        return None;
    }
    Some(Key::payload(&bytes))
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU value is only touched by this CPU, and a program
        // run is not preempted by another run on the same CPU.
        unsafe { *c += 1 };
    }
}

/// The cost floor: selects slot 0 and does nothing else. Benchmarks compare
/// every policy with it in the same run.
#[sk_reuseport]
pub fn floor(ctx: SkReuseportContext) -> u32 {
    let _ = SOCKETS.select_reuseport(&ctx, 0);
    sk_action::SK_PASS
}

/// Reads packet data without a bounds check, which the verifier must
/// refuse. Loaded only by the tests of the verifier-rejection error path.
#[sk_reuseport]
pub fn verifier_reject(ctx: SkReuseportContext) -> u32 {
    // SAFETY: never runs: the verifier rejects the program at load time.
    unsafe { core::ptr::read_volatile(ctx.data() as *const u32) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
