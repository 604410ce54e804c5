//! The `SK_REUSEPORT` program of a reuseport group.
//!
//! The kernel runs [`steer`] for every new TCP connection (on its SYN) and
//! every UDP datagram that reaches the group, before it picks a socket
//! (`reuseport_select_sock` in `net/core/sock_reuseport.c`). The program reads
//! the policy in force from `STATE`, picks a slot, and hands the packet to
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

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::MaybeUninit,
};

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, sk_action, BPF_F_MMAPABLE},
    helpers::{bpf_get_smp_processor_id, bpf_skb_load_bytes, bpf_skb_load_bytes_relative},
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
    EbpfContext,
};
use aya_log_ebpf::trace;

mod flows;
use reuseport_common::{
    cookie, counter,
    hash::{hash_dcid, hash_four_tuple, hash_payload, hash_src_ip, v4_mapped},
    key, policy, Config, Counters, GroupInfo, Layout, State, Table, WorkerRecord,
    LEAST_LOADED_CHOICES, MAX_WORKERS, PROBES, TABLE_CAPACITY,
};

#[map]
static SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_WORKERS, 0);

/// Memory-mappable: user space writes the configuration in place.
#[map]
static STATE: Array<State> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static TABLE: Array<Table> = Array::with_max_entries(2, BPF_F_MMAPABLE);

/// Memory-mappable so that workers update their own record with atomic
/// instructions instead of a syscall per connection.
#[map]
static WORKERS: Array<WorkerRecord> = Array::with_max_entries(MAX_WORKERS, BPF_F_MMAPABLE);

/// Not read here: the loader records the group's address and owner in it.
#[map]
static GROUP: Array<GroupInfo> = Array::with_max_entries(1, 0);

/// Not read here either: the loader records the maps' layout version in it.
#[map]
static LAYOUT: Array<Layout> = Array::with_max_entries(1, 0);

/// One record of every counter per CPU: one lookup per run.
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

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
    // This CPU's counters, looked up once for the whole run.
    let counters = COUNTERS.get_ptr_mut(0);
    if ctx.migrating_sk().is_some() {
        add(counters, counter::MIGRATED);
    }
    finish(&ctx, counters, try_steer(&ctx, counters))
}

/// The same steering, attached with plain `BPF_SK_REUSEPORT_SELECT` for
/// kernels without listener migration (before 5.14): it never reads
/// `migrating_sk`, which their verifier does not know.
#[sk_reuseport]
pub fn steer_select(ctx: SkReuseportContext) -> u32 {
    let counters = COUNTERS.get_ptr_mut(0);
    finish(&ctx, counters, try_steer(&ctx, counters))
}

/// Counts the outcome of a selection and lets the kernel go on.
#[inline(always)]
fn finish(
    ctx: &SkReuseportContext,
    counters: Option<*mut Counters>,
    selected: Result<u32, ()>,
) -> u32 {
    match selected {
        Ok(slot) => {
            add(counters, counter::SELECTED_BASE + slot);
            // Pruned by the verifier unless user space raised AYA_LOG_LEVEL
            // to trace at load time, so it costs nothing when off.
            trace!(ctx, "selected slot {}", slot);
        }
        Err(()) => add(counters, counter::FALLBACK),
    }
    // Returned whether or not a socket was selected: without a selection
    // the kernel falls back to its own hash, never drops.
    sk_action::SK_PASS
}

/// Selects a socket and returns its slot, or `Err` to leave the choice to
/// the kernel's hash: only when no live slot is configured (or the policy
/// is `kernel`), or when the first choice and [`PROBES`] more live slots
/// all turned out empty (a plan far behind the workers).
#[inline(always)]
fn try_steer(ctx: &SkReuseportContext, counters: Option<*mut Counters>) -> Result<u32, ()> {
    let state = STATE.get_ptr_mut(0).ok_or(())?;
    // SAFETY: a map value, valid while the map exists; user space rewrites
    // only the generation not in force, then flips `active`.
    let generation = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).active)) } & 1;
    let cfg: &Config = unsafe { &(*state).config[generation as usize] };
    // A flow the server already named (a cookie it minted) goes to its
    // socket, whatever the policy.
    if let Some(slot) = cookie_slot(ctx, cfg, counters) {
        return Ok(slot);
    }
    // A UDP flow the flow table knows keeps its socket; a new one is
    // recorded where the policy puts it.
    let flow = flows::lookup(ctx, cfg, counters);
    if let flows::Flow::Hit(slot) = flow {
        return Ok(slot);
    }
    let slot = by_policy(ctx, state, cfg, generation, counters)?;
    flows::record(&flow, state, cfg, slot, counters);
    Ok(slot)
}

/// The policy's choice, or further live slots if that one is empty; see
/// [`try_steer`].
#[inline(always)]
fn by_policy(
    ctx: &SkReuseportContext,
    state: *mut State,
    cfg: &Config,
    generation: u32,
    counters: Option<*mut Counters>,
) -> Result<u32, ()> {
    // Each policy returns its first choice and a position in the live list
    // from which to look further if that slot turns out empty. A policy
    // without a choice for this packet (a CPU without a row, an empty
    // table) gives `Err`: the flow hash then picks among the live slots,
    // so while a slot is live the kernel's hash never decides.
    let choice = match cfg.policy {
        policy::CPU => by_cpu(ctx, cfg),
        policy::HASH => by_hash(ctx, cfg),
        policy::ROUND_ROBIN => round_robin(state, cfg),
        policy::LEAST_LOADED => least_loaded(ctx, cfg, counters),
        policy::WEIGHTED => weighted(state, cfg, generation),
        policy::CONSISTENT => consistent(ctx, cfg, generation),
        _ => return Err(()),
    };
    let (first, probe_from) = match choice {
        Ok(c) => c,
        Err(()) => {
            let h = ctx.hash();
            (cfg.live_at(h).ok_or(())?, h)
        }
    };
    if select(ctx, cfg, first).is_ok() {
        return Ok(first);
    }
    add(counters, counter::EMPTY_SLOT);
    // The slot is empty (its worker is gone and user space has not rebuilt
    // the plan yet): try a few other live slots, spread over the live list
    // (workers that leave together often have neighbouring slots), at
    // distinct positions: `stride * PROBES` stays below `n_live`.
    let n = cfg.n_live;
    let stride = if n > PROBES + 1 { n / (PROBES + 1) } else { 1 };
    let mut i = 1;
    while i <= PROBES {
        if i >= n {
            break;
        }
        let slot = cfg.live_at(probe_from.wrapping_add(i * stride)).ok_or(())?;
        if slot != first {
            if select(ctx, cfg, slot).is_ok() {
                return Ok(slot);
            }
            add(counters, counter::EMPTY_SLOT);
        }
        i += 1;
    }
    Err(())
}

#[inline(always)]
fn select(ctx: &SkReuseportContext, cfg: &Config, slot: u32) -> Result<(), ()> {
    SOCKETS.select_reuseport(ctx, slot).map_err(|_| ())?;
    if cfg.policy == policy::LEAST_LOADED {
        // Count the work as the slot's from the moment it is steered, so a
        // burst of SYNs does not all go to the same least-loaded worker.
        // (Only under this policy: the atomic add is not free, and the
        // workers' audit brings the counts right after a switch.)
        if let Some(rec) = WORKERS.get_ptr_mut(slot) {
            // SAFETY: an array map value is valid, aligned memory for as
            // long as the map exists, which outlives this program run.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                    core::ptr::addr_of_mut!((*rec).load),
                    1,
                )
            };
        }
    }
    Ok(())
}

/// Entry `index` of generation `generation`'s slot table.
#[inline(always)]
fn table(generation: u32, index: u32) -> Result<u32, ()> {
    let t = TABLE.get_ptr(generation).ok_or(())?;
    // SAFETY: a map value; the mask keeps the index inside it.
    Ok(u32::from(unsafe {
        (*t).slots[(index & (TABLE_CAPACITY - 1)) as usize]
    }))
}

/// `cpu`: the slot the plan gives the CPU that received the packet: a
/// worker pinned to it, or for a CPU without one, a worker near it.
#[inline(always)]
fn by_cpu(ctx: &SkReuseportContext, cfg: &Config) -> Result<(u32, u32), ()> {
    // SAFETY: a helper without arguments or side effects (inlined by the
    // verifier into a per-CPU load).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let h = ctx.hash();
    Ok((cfg.cpu_slot(cpu, h).ok_or(())?, h))
}

/// `hash`: the live slot at the key's hash modulo the live slots.
#[inline(always)]
fn by_hash(ctx: &SkReuseportContext, cfg: &Config) -> Result<(u32, u32), ()> {
    let h = key_hash(ctx, cfg)?;
    Ok((cfg.live_at(h).ok_or(())?, h))
}

/// `round-robin`: the next ticket modulo the live slots.
#[inline(always)]
fn round_robin(state: *mut State, cfg: &Config) -> Result<(u32, u32), ()> {
    let ticket = next_ticket(state) as u32;
    Ok((cfg.live_at(ticket).ok_or(())?, ticket))
}

/// `least-loaded`: the live slot with the least work in flight (see
/// `WorkerRecord::load`) among [`LEAST_LOADED_CHOICES`] live slots: all of
/// them in a group that small (the exact minimum), else that many spread
/// evenly over the live list (power-of-d choices: the cost stays the same
/// however large the group). The first candidate moves on at every run (a
/// per-CPU turn counter, plus the flow hash), so equally loaded workers
/// share the work instead of the first one taking it all, without a shared
/// counter or a helper call for a random number.
#[inline(always)]
fn least_loaded(
    ctx: &SkReuseportContext,
    cfg: &Config,
    counters: Option<*mut Counters>,
) -> Result<(u32, u32), ()> {
    let turn = counters.map_or(0, |c| {
        // SAFETY: this CPU's own record; runs on one CPU do not overlap.
        unsafe {
            let t = &mut (*c).values[counter::TURN as usize];
            *t += 1;
            *t as u32
        }
    });
    // The golden-ratio step scatters consecutive turns over the list.
    let start = ctx.hash().wrapping_add(turn.wrapping_mul(0x9e37_79b9));
    let n = cfg.n_live;
    let stride = if n > LEAST_LOADED_CHOICES {
        n / LEAST_LOADED_CHOICES
    } else {
        1
    };
    let mut best = cfg.live_at(start).ok_or(())?;
    let mut best_load = u64::MAX;
    // Only map values flow into `best`: were the loop index kept with it,
    // every iteration would double the verifier's states.
    let mut i = 0;
    while i < LEAST_LOADED_CHOICES {
        if i >= n {
            break;
        }
        let slot = cfg.live_at(start.wrapping_add(i * stride)).ok_or(())?;
        // SAFETY: see `select`; an aligned 8-byte load is atomic.
        let load = WORKERS
            .get_ptr(slot)
            .map(|rec| unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*rec).load)) })
            .unwrap_or(u64::MAX);
        if load < best_load {
            best = slot;
            best_load = load;
        }
        i += 1;
    }
    Ok((best, start))
}

/// `weighted`: the next ticket's entry of the weighted sequence.
#[inline(always)]
fn weighted(state: *mut State, cfg: &Config, generation: u32) -> Result<(u32, u32), ()> {
    if cfg.table_len == 0 {
        return Err(());
    }
    let ticket = (next_ticket(state) % u64::from(cfg.table_len)) as u32;
    Ok((table(generation, ticket)?, ticket))
}

/// `consistent`: the Maglev table entry at the key's hash.
#[inline(always)]
fn consistent(ctx: &SkReuseportContext, cfg: &Config, generation: u32) -> Result<(u32, u32), ()> {
    if cfg.table_len == 0 {
        return Err(());
    }
    let h = key_hash(ctx, cfg)?;
    Ok((table(generation, h % cfg.table_len)?, h))
}

#[inline(always)]
fn next_ticket(state: *mut State) -> u64 {
    // SAFETY: see `select`; the tickets have a cache line of their own.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
            core::ptr::addr_of_mut!((*state).tickets),
            1,
        )
    }
}

/// The configured key's MurmurHash3 (see `reuseport_common::hash`). A key
/// that cannot be read falls back to the kernel's flow hash, counted.
#[inline(always)]
fn key_hash(ctx: &SkReuseportContext, cfg: &Config) -> Result<u32, ()> {
    let h = match cfg.key {
        key::SRC_IP => src_ip_hash(ctx, cfg),
        key::FOUR_TUPLE => addr_hash(ctx, cfg),
        key::PAYLOAD => payload_hash(ctx, cfg),
        key::QUIC => quic_dcid_hash(ctx, cfg),
        // `cookie`: a datagram without a valid cookie is a new flow, placed
        // on the kernel's flow hash (below).
        // `flow`, and any key this program does not know: the kernel's.
        _ => None,
    };
    Ok(h.unwrap_or_else(|| ctx.hash()))
}

/// Hashes the `src-ip` key: one helper call reads the source address only
/// (4 bytes of an IPv4 header, 16 of an IPv6 one).
#[inline(always)]
fn src_ip_hash(ctx: &SkReuseportContext, cfg: &Config) -> Option<u32> {
    let src = match ctx.eth_protocol() {
        // IPv4 header: source at 12.
        ETH_P_IP_BE => v4_mapped(load::<4>(ctx, 12, BPF_HDR_START_NET)?),
        // IPv6 header: source at 8.
        ETH_P_IPV6_BE => load::<16>(ctx, 8, BPF_HDR_START_NET)?,
        _ => {
            count(counter::KEY_UNREADABLE);
            return None;
        }
    };
    Some(hash_src_ip(cfg.seed, &src))
}

/// Hashes the `four-tuple` key read from the IP and L4 headers. One helper
/// call reads both addresses (the IP header lies before the context's
/// data, out of direct reach); the ports are read directly.
#[inline(always)]
fn addr_hash(ctx: &SkReuseportContext, cfg: &Config) -> Option<u32> {
    if !matches!(ctx.eth_protocol(), ETH_P_IP_BE | ETH_P_IPV6_BE) {
        count(counter::KEY_UNREADABLE);
        return None;
    }
    let (src, dst) = addresses(ctx)?;
    // TCP and UDP both start with source port then destination port, and
    // the context's data begins at the L4 header.
    let ports = l4_ports(ctx)?;
    Some(hash_four_tuple(cfg.seed, &src, &dst, ports))
}

/// The packet's source and destination addresses (IPv4 as v4-mapped IPv6),
/// or `None` for another network protocol or an unreadable header. One
/// helper call reads both (the IP header lies before the context's data,
/// out of direct reach).
#[inline(always)]
pub(crate) fn addresses(ctx: &SkReuseportContext) -> Option<([u8; 16], [u8; 16])> {
    match ctx.eth_protocol() {
        ETH_P_IP_BE => {
            // IPv4 header: source at 12, destination at 16.
            let a: [u8; 8] = load(ctx, 12, BPF_HDR_START_NET)?;
            Some((
                v4_mapped([a[0], a[1], a[2], a[3]]),
                v4_mapped([a[4], a[5], a[6], a[7]]),
            ))
        }
        ETH_P_IPV6_BE => {
            // IPv6 header: source at 8, destination at 24.
            let a: [u8; 32] = load(ctx, 8, BPF_HDR_START_NET)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&a[..16]);
            dst.copy_from_slice(&a[16..]);
            Some((src, dst))
        }
        _ => None,
    }
}

/// The first 4 bytes of the L4 header (both ports), read directly from the
/// packet: no helper call.
#[inline(always)]
fn l4_ports(ctx: &SkReuseportContext) -> Option<[u8; 4]> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 4 > end {
        // Not in the linear part: read it with the helper.
        return load(ctx, 0, L4_START);
    }
    // SAFETY: the 4 bytes at `data` are within [data, data_end).
    Some(unsafe { core::ptr::read_unaligned(data as *const [u8; 4]) })
}

/// `bpf_skb_load_bytes` offsets are from the L4 header (the start of the
/// context's data), not a `BPF_HDR_START_*` base.
const L4_START: u32 = u32::MAX;

/// Reads `N` bytes at `offset` from the start of the IP header
/// (`BPF_HDR_START_NET`) or of the L4 header ([`L4_START`]). The buffer is
/// left uninitialised for the helper to fill: zeroing it first would cost a
/// byte-wise memset call in BPF.
#[inline(always)]
fn load<const N: usize>(ctx: &SkReuseportContext, offset: u32, base: u32) -> Option<[u8; N]> {
    let mut buf = MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helpers write at most `N` bytes into `buf` (and zero it
    // on failure).
    let ret = unsafe {
        if base == L4_START {
            bpf_skb_load_bytes(ctx.as_ptr(), offset, buf.as_mut_ptr().cast(), N as u32)
        } else {
            bpf_skb_load_bytes_relative(
                ctx.as_ptr(),
                offset,
                buf.as_mut_ptr().cast(),
                N as u32,
                base,
            )
        }
    };
    if ret == 0 {
        // SAFETY: the helper filled all `N` bytes.
        Some(unsafe { buf.assume_init() })
    } else {
        count(counter::KEY_UNREADABLE);
        None
    }
}

/// Hashes the payload key: `payload_len` bytes at `payload_offset` of a UDP
/// datagram's payload, zero-padded to 16. Too short a datagram gives `None`.
#[inline(always)]
fn payload_hash(ctx: &SkReuseportContext, cfg: &Config) -> Option<u32> {
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
    // Zero the padding with two volatile 8-byte stores: a plain `[0; 16]`
    // becomes a call of the byte-wise BPF memset.
    let mut buf = MaybeUninit::<[u64; 2]>::uninit();
    let p = buf.as_mut_ptr().cast::<u64>();
    // SAFETY: `p` points to two writable, aligned u64s; the helper then
    // writes `len` (1..=16) bytes into the same 16.
    let ret = unsafe {
        core::ptr::write_volatile(p, 0);
        core::ptr::write_volatile(p.add(1), 0);
        // 1..=16 in a form the verifier can see on any kernel (a plain
        // mask would let it think 0 possible: "invalid zero-sized read").
        bpf_skb_load_bytes(ctx.as_ptr(), start, p.cast(), ((len - 1) & 0xf) + 1)
    };
    if ret != 0 {
        count(counter::SHORT_PAYLOAD);
        return None;
    }
    // SAFETY: initialised above; any bytes are a valid [u8; 16].
    let bytes: [u8; 16] = unsafe { core::mem::transmute(buf.assume_init()) };
    Some(hash_payload(cfg.seed, &bytes))
}

// ---------------------------------------------------------------------
// Cookies and QUIC (keys `cookie:OFFSET` and `quic`; see
// `reuseport_common::cookie`).

/// QUIC version 1 (RFC 9000) and version 2 (RFC 9369): the two whose long
/// header packet types the program knows.
const QUIC_V1: u32 = 0x0000_0001;
const QUIC_V2: u32 = 0x6b33_43cf;
/// Smallest datagram with a cookie in a QUIC header: a short header's
/// first byte and 8 bytes of destination connection ID.
const QUIC_MIN_SHORT: u32 = 1 + cookie::LEN as u32;
/// A long header: first byte, version (4), DCID length (1), then the DCID.
const QUIC_LONG_DCID_AT: u32 = 6;

/// Where a QUIC datagram's server-minted cookie may be.
enum Quic {
    /// A short header, or a long header the client sends once it has the
    /// server's connection ID (Handshake): the first 8 bytes of its DCID
    /// must be one of our cookies.
    Cookie([u8; cookie::LEN]),
    /// Initial or 0-RTT: the DCID is the client's own choice until the
    /// server's first answer, the server's (a cookie) after it.
    Initial([u8; cookie::LEN]),
}

/// The slot whose socket the datagram's cookie names, if the group's key
/// carries cookies and this one is valid and names a socket that still
/// serves in that slot; the datagram is then selected there (the caller
/// counts the selection). `None`: the policy places the datagram (and
/// why is counted: `COOKIE_BAD`, `COOKIE_OLD`, `QUIC_INITIAL`,
/// `QUIC_UNREADABLE`).
#[inline(always)]
fn cookie_slot(
    ctx: &SkReuseportContext,
    cfg: &Config,
    counters: Option<*mut Counters>,
) -> Option<u32> {
    let (bytes, initial) = match cfg.key {
        key::COOKIE => (payload_cookie(ctx, cfg, counters)?, false),
        key::QUIC => match quic_header(ctx, counters)? {
            Quic::Cookie(b) => (b, false),
            Quic::Initial(b) => (b, true),
        },
        _ => return None,
    };
    let Some(c) = cookie::read(cfg.cookie_secret, &bytes) else {
        // A client's own connection ID is no cookie: a new connection.
        add(
            counters,
            if initial {
                counter::QUIC_INITIAL
            } else {
                counter::COOKIE_BAD
            },
        );
        return None;
    };
    let slot = u32::from(c.slot);
    // The check held, so a server of this group minted it, for a slot
    // below MAX_WORKERS; the map lookup bounds it anyway.
    let Some(rec) = WORKERS.get_ptr(slot) else {
        add(counters, counter::COOKIE_BAD);
        return None;
    };
    // SAFETY: a map value, valid while the map exists; an aligned 4-byte
    // load is atomic. User space raises the generation before it puts a
    // new socket in the slot.
    let now = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*rec).generation)) };
    if now != u32::from(c.generation) || SOCKETS.select_reuseport(ctx, slot).is_err() {
        // The socket the cookie was minted for is gone (the slot is empty
        // or holds a newer socket): its flow cannot be served any more,
        // and the policy treats the datagram as new.
        add(counters, counter::COOKIE_OLD);
        return None;
    }
    add(counters, counter::COOKIE_OK);
    Some(slot)
}

/// `cookie:OFFSET`: the cookie bytes at `payload_offset` of a UDP payload.
#[inline(always)]
fn payload_cookie(
    ctx: &SkReuseportContext,
    cfg: &Config,
    counters: Option<*mut Counters>,
) -> Option<[u8; cookie::LEN]> {
    let start = UDP_HEADER_LEN.checked_add(cfg.payload_offset)?;
    if ctx.ip_protocol() != IPPROTO_UDP
        || (ctx.len() as u32) < start.checked_add(cookie::LEN as u32)?
    {
        add(counters, counter::SHORT_PAYLOAD);
        return None;
    }
    let b = load_l4(ctx, start);
    if b.is_none() {
        add(counters, counter::SHORT_PAYLOAD);
    }
    b
}

/// Reads what steering needs from a QUIC header (the invariants of RFC
/// 8999, and the long header types of versions 1 and 2). `None` for a
/// datagram to place by the policy without a cookie, counted
/// `QUIC_UNREADABLE`: too short, a version negotiation packet, a version
/// this program does not know, a Retry (a server's packet), or a long
/// header whose DCID is shorter than a cookie.
#[inline(always)]
fn quic_header(ctx: &SkReuseportContext, counters: Option<*mut Counters>) -> Option<Quic> {
    let unreadable = || {
        add(counters, counter::QUIC_UNREADABLE);
        None
    };
    let len = ctx.len() as u32;
    if ctx.ip_protocol() != IPPROTO_UDP || len < UDP_HEADER_LEN + QUIC_MIN_SHORT {
        return unreadable();
    }
    // A short header is at least as long as the 6 bytes read here.
    let Some(h) = load_l4::<6>(ctx, UDP_HEADER_LEN) else {
        return unreadable();
    };
    if h[0] & 0x80 == 0 {
        // Short header: the DCID, of the length the server chose, right
        // after the first byte; ours start with the cookie.
        return match load_l4(ctx, UDP_HEADER_LEN + 1) {
            Some(b) => Some(Quic::Cookie(b)),
            None => unreadable(),
        };
    }
    let version = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    // Long packet type (RFC 9000 17.2, RFC 9369 3.2): 0 Initial, 1 0-RTT,
    // 2 Handshake, 3 Retry in version 1; version 2 rotates them by one.
    let bits = (h[0] >> 4) & 3;
    let ty = match version {
        QUIC_V1 => bits,
        QUIC_V2 => bits.wrapping_sub(1) & 3,
        // 0 is version negotiation (sent by servers, not clients); any
        // other version's types are unknown: the server will answer with
        // version negotiation, whichever worker gets it.
        _ => return unreadable(),
    };
    if h[5] < cookie::LEN as u8 || len < UDP_HEADER_LEN + QUIC_LONG_DCID_AT + cookie::LEN as u32 {
        return unreadable();
    }
    let Some(dcid) = load_l4(ctx, UDP_HEADER_LEN + QUIC_LONG_DCID_AT) else {
        return unreadable();
    };
    match ty {
        0 | 1 => Some(Quic::Initial(dcid)),
        2 => Some(Quic::Cookie(dcid)),
        _ => unreadable(),
    }
}

/// The `quic` key's hash for the policy: the first 8 bytes of the DCID
/// ([`hash_dcid`]), so that every packet of one handshake (the client's
/// Initials with its own DCID, retransmissions, 0-RTT) reaches the same
/// worker whatever its source port. `None` (the kernel's flow hash) where
/// there is no such DCID; [`quic_header`] has counted it.
#[inline(always)]
fn quic_dcid_hash(ctx: &SkReuseportContext, cfg: &Config) -> Option<u32> {
    let len = ctx.len() as u32;
    if ctx.ip_protocol() != IPPROTO_UDP || len < UDP_HEADER_LEN + QUIC_MIN_SHORT {
        return None;
    }
    let h = load_l4::<6>(ctx, UDP_HEADER_LEN)?;
    let at = if h[0] & 0x80 == 0 {
        1
    } else {
        if h[5] < cookie::LEN as u8 || len < UDP_HEADER_LEN + QUIC_LONG_DCID_AT + cookie::LEN as u32
        {
            return None;
        }
        QUIC_LONG_DCID_AT
    };
    Some(hash_dcid(cfg.seed, &load_l4(ctx, UDP_HEADER_LEN + at)?))
}

/// `N` bytes at `offset` from the start of the L4 header, or `None`;
/// not counted (the callers count what it means).
#[inline(always)]
fn load_l4<const N: usize>(ctx: &SkReuseportContext, offset: u32) -> Option<[u8; N]> {
    let mut buf = MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helper writes at most `N` bytes into `buf`.
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.as_ptr(), offset, buf.as_mut_ptr().cast(), N as u32) };
    // SAFETY: on success the helper filled all `N` bytes.
    (ret == 0).then(|| unsafe { buf.assume_init() })
}

/// Adds one to counter `index` of this CPU's record (`counters`, looked up
/// once per run).
#[inline(always)]
fn add(counters: Option<*mut Counters>, index: u32) {
    if let Some(c) = counters {
        // SAFETY: a per-CPU value is only touched by this CPU, and a program
        // run is not preempted by another run on the same CPU. The index is
        // checked against the record's length (for the verifier).
        unsafe {
            if let Some(v) = (*c).values.get_mut(index as usize) {
                *v += 1;
            }
        }
    }
}

/// [`add`] for the rare paths deep in the key readers, which look the
/// record up themselves rather than carry it.
#[inline(always)]
fn count(index: u32) {
    add(COUNTERS.get_ptr_mut(0), index);
}

// The benchmark's reference programs and the verifier-rejection test's
// program live in a test build of this object only (feature
// `test-programs`): the object the library embeds holds `steer` and
// `steer_select` alone.
#[cfg(feature = "test-programs")]
mod test_programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
