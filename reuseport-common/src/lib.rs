//! The contract between the `reuseport` eBPF program and its loader.
//!
//! Everything both sides must agree on lives here and only here: map names and
//! sizes, policy and key ids, the layout of the configuration record, the index
//! of every counter, and the pure slot arithmetic (hashing, tables) that the
//! program runs in the kernel and the loader runs to predict or build it.
//!
//! Every shared struct is `#[repr(C)]` with fixed-width fields and no implicit
//! padding, so the kernel and user space read the same bytes.
#![no_std]
#![deny(missing_docs)]

pub mod cookie;
pub mod flow;
pub mod hash;
pub mod table;

/// Largest number of workers (slots) in one group: the size of the socket
/// map. A power of two (see [`Config::live_at`]). A default `reuseport run`
/// starts one worker per usable CPU, so this is also the largest machine it
/// covers with a worker on every CPU.
pub const MAX_WORKERS: u32 = 1024;
const _: () = assert!(MAX_WORKERS.is_power_of_two());
const _: () = assert!(
    MAX_WORKERS <= u16::MAX as u32 + 1,
    "slots are stored as u16 in the tables"
);

/// CPUs the `cpu` policy has a row for ([`Config::cpu_rows`]); a power of
/// two. Packets received on a CPU above it are placed by the flow hash over
/// the live workers (still by the program, never by the kernel's hash).
pub const MAX_CPUS: u32 = 4096;
const _: () = assert!(MAX_CPUS.is_power_of_two());

/// Entries of one generation of the policy table (see [`Table`]); a power
/// of two, so an index can be masked into range.
pub const TABLE_CAPACITY: u32 = 65536;
const _: () = assert!(TABLE_CAPACITY.is_power_of_two());

/// Size of the `consistent` policy's Maglev lookup table for groups of up
/// to [`MAGLEV_SMALL_GROUP`] workers: a prime, as Maglev requires, with over
/// 100 entries per worker; 16 KiB, so the program's random reads stay in
/// the CPU's nearest cache.
pub const MAGLEV_TABLE_SIZE: u32 = 8191;
/// Size of the Maglev table for larger groups: the largest prime below
/// 2^16, 64 entries per worker at [`MAX_WORKERS`].
pub const MAGLEV_TABLE_SIZE_LARGE: u32 = 65521;
/// Largest group that uses [`MAGLEV_TABLE_SIZE`].
pub const MAGLEV_SMALL_GROUP: u32 = 64;
const _: () = assert!(MAGLEV_TABLE_SIZE_LARGE <= TABLE_CAPACITY);

/// Live slots the program tries after the policy's first choice turns out
/// empty (a worker gone before user space rebuilt the plan), spread over the
/// live list. Bounded so that a stale plan costs a few probes, not a scan of
/// every slot; past them the run falls back to the kernel's hash, counted.
pub const PROBES: u32 = 4;

/// Live workers `least-loaded` compares per run: all of them up to this
/// many (the exact minimum), else this many spread over the live list from
/// a start that moves at every run (power-of-d choices), so the cost does
/// not grow with the group.
pub const LEAST_LOADED_CHOICES: u32 = 4;

/// Names of the maps the eBPF program defines; the loader looks them up by name.
pub mod map {
    /// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`, [`MAX_WORKERS`](crate::MAX_WORKERS)
    /// entries: slot `i` holds the listening socket of worker `i`.
    pub const SOCKETS: &str = "SOCKETS";
    /// `BPF_MAP_TYPE_ARRAY` (memory-mappable) of one [`State`](crate::State):
    /// the generation in force, the ticket counter and both generations of
    /// the [`Config`](crate::Config). User space writes it through a shared
    /// mapping.
    pub const STATE: &str = "STATE";
    /// `BPF_MAP_TYPE_ARRAY` (memory-mappable) of two [`Table`](crate::Table)s,
    /// one per generation: the slot table of `weighted` and `consistent`
    /// (`cpu`'s rows live in the [`Config`](crate::Config)).
    pub const TABLE: &str = "TABLE";
    /// `BPF_MAP_TYPE_ARRAY` (memory-mappable) of `MAX_WORKERS`
    /// [`WorkerRecord`](crate::WorkerRecord)s: what each slot's worker is and
    /// has done, written by the workers, read by `stats` and `ctl`.
    pub const WORKERS: &str = "WORKERS";
    /// `BPF_MAP_TYPE_ARRAY` of one [`GroupInfo`](crate::GroupInfo): the group's
    /// address and owner, for `ctl` and `stats`.
    pub const GROUP: &str = "GROUP";
    /// `BPF_MAP_TYPE_PERCPU_ARRAY` of one [`Counters`](crate::Counters)
    /// record per CPU: one lookup per run reaches every counter.
    pub const COUNTERS: &str = "COUNTERS";
    /// `BPF_MAP_TYPE_ARRAY` of one [`Layout`](crate::Layout): which layout
    /// of these maps the group was created with, so that another build
    /// refuses them instead of misreading them.
    pub const LAYOUT: &str = "LAYOUT";
    /// `BPF_MAP_TYPE_LRU_HASH` from [`FlowKey`](crate::flow::FlowKey) (a
    /// UDP datagram's addresses and ports) to
    /// [`FlowEntry`](crate::flow::FlowEntry) (the slot and socket
    /// generation that serve the flow, and when it was last seen): the
    /// flow table of UDP groups (see [`flow`](crate::flow)). Its
    /// `max_entries` is the group's flow-table size, set when it is
    /// created; the kernel evicts the least recently used flow to make
    /// room. A takeover reuses its predecessor's table.
    pub const FLOWS: &str = "FLOWS";
}

/// The version of the pinned maps' layout (their records, sizes and
/// meanings). Raise it whenever any of them changes, so that a build that
/// opens a group created by another one refuses it with a clear error
/// (see [`Layout`]). Groups created before layouts were recorded (up to
/// layout 2: the WORKERS records became 64 bytes there) have no
/// [`map::LAYOUT`] map at all. Layout 3 gave the WORKERS records a member
/// kind and socket descriptor (64 bytes); layout 4 added the worker
/// process's start time, which made them 128 bytes; layout 5 moved the
/// `least-loaded` load to the records' second cache line, made the counters
/// one per-CPU record and sized the maps for 1,024 workers; layout 6 added
/// the slots' socket generations, the cookie secret and the cookie, flow
/// table and QUIC counters; layout 7 added the flow table ([`map::FLOWS`])
/// with its settings in the [`Config`] and its insert count in the
/// [`State`].
pub const LAYOUT_VERSION: u32 = 7;

/// Marks a [`Layout`] record as one of ours.
pub const LAYOUT_MAGIC: u32 = u32::from_le_bytes(*b"RPLY");

/// What a group's pinned maps look like, written once by the build that
/// created them. Its own size never changes (new fields take `reserved`),
/// so any build can read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// [`LAYOUT_MAGIC`].
    pub magic: u32,
    /// [`LAYOUT_VERSION`] of the build that created the group.
    pub version: u32,
    /// `size_of::<State>()` of that build.
    pub state_size: u32,
    /// `size_of::<Table>()`.
    pub table_size: u32,
    /// `size_of::<WorkerRecord>()`.
    pub worker_record_size: u32,
    /// `size_of::<GroupInfo>()`.
    pub group_info_size: u32,
    /// [`MAX_WORKERS`]: slots of the socket and worker maps.
    pub max_workers: u32,
    /// [`counter::LEN`].
    pub counters: u32,
    /// `size_of::<flow::FlowKey>()`.
    pub flow_key_size: u32,
    /// `size_of::<flow::FlowEntry>()`.
    pub flow_entry_size: u32,
    /// Reserved for later fields; zero.
    pub reserved: [u32; 6],
}

impl Layout {
    /// The layout of this build.
    pub const CURRENT: Layout = Layout {
        magic: LAYOUT_MAGIC,
        version: LAYOUT_VERSION,
        state_size: core::mem::size_of::<State>() as u32,
        table_size: core::mem::size_of::<Table>() as u32,
        worker_record_size: core::mem::size_of::<WorkerRecord>() as u32,
        group_info_size: core::mem::size_of::<GroupInfo>() as u32,
        max_workers: MAX_WORKERS,
        counters: counter::LEN,
        flow_key_size: core::mem::size_of::<flow::FlowKey>() as u32,
        flow_entry_size: core::mem::size_of::<flow::FlowEntry>() as u32,
        reserved: [0; 6],
    };
}

/// Names of the programs in the eBPF object.
pub mod program {
    /// The steering program: runs the configured policy.
    pub const STEER: &str = "steer";
    /// The same steering for kernels without listener migration (before
    /// 5.14): attached for `BPF_SK_REUSEPORT_SELECT` only.
    pub const STEER_SELECT: &str = "steer_select";
    /// The reference for the cost of a selection: always selects slot 0 and
    /// does nothing else (no config, no counters). In the test object only.
    pub const FLOOR: &str = "floor";
    /// A program the verifier rejects (it reads packet data without a bounds
    /// check); loaded only by tests of the verifier-error path. In the test
    /// object only.
    pub const VERIFIER_REJECT: &str = "verifier_reject";
}

/// Policy ids as stored in [`Config::policy`].
///
/// `0` means "not configured": the program selects nothing and counts a
/// fallback, so a zeroed map can never steer by accident.
pub mod policy {
    /// Not configured: fall back to the kernel's hash.
    pub const NONE: u32 = 0;
    /// By the CPU that received the packet, through a CPU-to-slot table.
    pub const CPU: u32 = 1;
    /// By a seeded hash of a key, modulo the live slots.
    pub const HASH: u32 = 2;
    /// Round robin over the live slots, by a global ticket counter.
    pub const ROUND_ROBIN: u32 = 3;
    /// The live slot with the fewest open connections.
    pub const LEAST_LOADED: u32 = 4;
    /// A weighted sequence of slots, by a global ticket counter.
    pub const WEIGHTED: u32 = 5;
    /// A Maglev lookup table indexed by the seeded hash of a key.
    pub const CONSISTENT: u32 = 6;
}

/// Hash key ids as stored in [`Config::key`]; see [`hash`] for the exact bytes.
pub mod key {
    /// No key (the policy does not hash).
    pub const NONE: u32 = 0;
    /// The client's address, as 16 bytes (IPv4 as v4-mapped IPv6).
    pub const SRC_IP: u32 = 1;
    /// Client and server address and port.
    pub const FOUR_TUPLE: u32 = 2;
    /// `payload_len` bytes at `payload_offset` of the L4 payload.
    pub const PAYLOAD: u32 = 3;
    /// The kernel's own hash of the 4-tuple (the context's `hash`): no
    /// header read and no hashing in the program, but salted per boot, so
    /// user space cannot predict it.
    pub const FLOW: u32 = 4;
    /// A [`cookie`](crate::cookie) at `payload_offset` of a UDP payload;
    /// a datagram without a valid one goes by the policy, keyed by the
    /// kernel's flow hash.
    pub const COOKIE: u32 = 5;
    /// QUIC (RFC 9000 invariants): short headers and long headers other
    /// than Initial and 0-RTT by the [`cookie`](crate::cookie) at the start
    /// of the destination connection ID; Initial and 0-RTT packets by the
    /// policy, keyed by a hash of the client's destination connection ID.
    pub const QUIC: u32 = 6;
}

/// Indices into the per-CPU [`Counters`] record of [`map::COUNTERS`].
///
/// Every run of the steering program ends in exactly one of
/// `SELECTED_BASE + slot` or [`FALLBACK`](counter::FALLBACK) (the program
/// never drops; [`DROPPED`](counter::DROPPED) is kept in the contract and on
/// `/metrics`, at 0, for a policy that would); the other counters record
/// why a run took a detour and may be counted in addition to the outcome.
pub mod counter {
    use crate::MAX_WORKERS;
    /// `SELECTED_BASE + slot`: the program selected that slot.
    pub const SELECTED_BASE: u32 = 0;
    /// The program selected no socket and returned `SK_PASS`: the kernel's
    /// own reuseport hash picked the socket.
    pub const FALLBACK: u32 = MAX_WORKERS;
    /// The program returned `SK_DROP`: the SYN or datagram was dropped.
    pub const DROPPED: u32 = MAX_WORKERS + 1;
    /// A slot the policy (or the flow table, for a flow it knew) picked
    /// held no socket (worker gone); the program moved on to other live
    /// slots (at most [`PROBES`](crate::PROBES)), or to the policy.
    pub const EMPTY_SLOT: u32 = MAX_WORKERS + 2;
    /// The packet's addresses or ports could not be read; the kernel's flow
    /// hash of the 4-tuple was used as the key instead.
    pub const KEY_UNREADABLE: u32 = MAX_WORKERS + 3;
    /// The payload was too short for a payload key.
    pub const SHORT_PAYLOAD: u32 = MAX_WORKERS + 4;
    /// The program ran on the migration path (a listener closed with
    /// connections still queued) and picked their new socket.
    pub const MIGRATED: u32 = MAX_WORKERS + 5;
    /// Not a count for people: `least-loaded`'s per-CPU turn counter, which
    /// rotates where its scan starts so that equally loaded workers share.
    pub const TURN: u32 = MAX_WORKERS + 6;
    /// A valid cookie of the slot's current socket steered the datagram.
    pub const COOKIE_OK: u32 = MAX_WORKERS + 7;
    /// Where a cookie was expected, the bytes did not pass its check (a new
    /// flow, or not one of ours): the policy placed the datagram.
    pub const COOKIE_BAD: u32 = MAX_WORKERS + 8;
    /// A valid cookie whose socket is gone or was replaced (another
    /// generation in the slot): the policy placed the datagram.
    pub const COOKIE_OLD: u32 = MAX_WORKERS + 9;
    /// The flow table knew the datagram's flow and sent it to its socket.
    pub const FLOW_HIT: u32 = MAX_WORKERS + 10;
    /// The flow table did not know the flow: the policy placed it.
    pub const FLOW_MISS: u32 = MAX_WORKERS + 11;
    /// The flow table was full: a new flow was recorded by evicting the
    /// least recently used one (an LRU map never refuses an insert: this
    /// counts the new flows recorded once the table had taken as many as
    /// it holds), or could not be recorded at all.
    pub const FLOW_FULL: u32 = MAX_WORKERS + 12;
    /// A QUIC Initial or 0-RTT packet, placed by the policy on a hash of
    /// its destination connection ID.
    pub const QUIC_INITIAL: u32 = MAX_WORKERS + 13;
    /// A datagram too short or malformed to read a QUIC header from (or a
    /// version negotiation packet): placed by the policy, never dropped.
    pub const QUIC_UNREADABLE: u32 = MAX_WORKERS + 14;
    /// Number of counters.
    pub const LEN: u32 = MAX_WORKERS + 16;
}

/// The program's counters on one CPU: the value of [`map::COUNTERS`]
/// (a per-CPU array of one entry), indexed by [`counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// `values[i]` is counter `i`.
    pub values: [u64; counter::LEN as usize],
}

impl Counters {
    /// All zero.
    pub const ZERO: Counters = Counters {
        values: [0; counter::LEN as usize],
    };
}

/// One CPU's row of the `cpu` policy: the slots at
/// `Config::cpu_slots[start..start + len]` serve packets received on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuRow {
    /// First entry of the row in [`Config::cpu_slots`].
    pub start: u16,
    /// Entries in the row: the workers pinned to the CPU, or 1 (the one
    /// worker the plan gives a CPU without a worker of its own); 0 for no row.
    pub len: u16,
}

/// One generation of the steering configuration.
///
/// The loader writes the generation not in force, then flips
/// [`State::active`], so the program never sees a half-written record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A [`policy`] id.
    pub policy: u32,
    /// A [`key`] id, for the policies that hash.
    pub key: u32,
    /// Seed of the key hash.
    pub seed: u32,
    /// Number of valid entries in `live`.
    pub n_live: u32,
    /// Number of valid entries of this generation's table.
    pub table_len: u32,
    /// `cpu` policy: CPUs with a row in `cpu_rows`.
    pub n_cpus: u32,
    /// Payload key: offset into the L4 payload.
    pub payload_offset: u32,
    /// Payload key: length in bytes (1 to 16).
    pub payload_len: u32,
    /// The secret of the group's [`cookie`]s' check bits.
    pub cookie_secret: u32,
    /// UDP: how long a flow of the [flow table](flow) may stay silent and
    /// still keep its socket, in milliseconds; also how long a draining UDP
    /// worker must have received nothing before it closes. 0: no flow
    /// table (TCP groups; UDP groups under the `kernel` policy).
    pub flow_timeout_ms: u32,
    /// The flow table's size (its map's `max_entries`), so that the program
    /// can tell when a new flow evicts another ([`counter::FLOW_FULL`]).
    pub flow_table_size: u32,
    /// Reserved for later settings; zero.
    pub reserved: [u32; 5],
    /// The slots that hold a serving socket, in slot order.
    pub live: [u32; MAX_WORKERS as usize],
    /// `weighted`: the weight of each slot (by slot number). Kept with the
    /// rest so that any process can rebuild the table from this record.
    pub weights: [u32; MAX_WORKERS as usize],
    /// `cpu` policy: each CPU's row of `cpu_slots` (see
    /// [`Config::cpu_slot`]); here rather than in [`Table`] so that the
    /// cheapest policy touches one map value only.
    pub cpu_rows: [CpuRow; MAX_CPUS as usize],
    /// `cpu` policy: the live slots ordered by CPU, each CPU's workers
    /// together, so a CPU's row is a range of this list.
    pub cpu_slots: [u16; MAX_WORKERS as usize],
}

impl Config {
    /// A configuration that steers nothing (policy [`policy::NONE`]).
    pub const EMPTY: Config = Config {
        policy: policy::NONE,
        key: key::NONE,
        seed: 0,
        n_live: 0,
        table_len: 0,
        n_cpus: 0,
        payload_offset: 0,
        payload_len: 0,
        cookie_secret: 0,
        flow_timeout_ms: 0,
        flow_table_size: 0,
        reserved: [0; 5],
        live: [0; MAX_WORKERS as usize],
        weights: [0; MAX_WORKERS as usize],
        cpu_rows: [CpuRow { start: 0, len: 0 }; MAX_CPUS as usize],
        cpu_slots: [0; MAX_WORKERS as usize],
    };

    /// Whether the program consults the [flow table](flow): a UDP group
    /// (a flow timeout) with a table (a size), under a key that does not
    /// name the flow itself: not a cookie key, and not a payload key of a
    /// hashing policy (the session in the payload is then the flow, which
    /// a 4-tuple would contradict: one socket may carry many sessions).
    #[inline(always)]
    pub fn flow_table_on(&self) -> bool {
        let hashes = self.policy == policy::HASH || self.policy == policy::CONSISTENT;
        self.flow_timeout_ms != 0
            && self.flow_table_size != 0
            && self.policy != policy::NONE
            && self.key != key::COOKIE
            && self.key != key::QUIC
            && !(hashes && self.key == key::PAYLOAD)
    }

    /// Whether the program consults the flow table for the datagrams no
    /// cookie placed: where [`Config::flow_table_on`], and also under the
    /// `quic` key with a policy that does not hash (round robin, least
    /// loaded, weighted, cpu). There the Initials of a handshake, which
    /// carry no cookie yet, would each go by the policy: a client that
    /// sends its Initial again would reach another worker than the one with
    /// its handshake. The table keeps them on the first one's worker (a
    /// hashing policy keeps them together by the connection ID's hash).
    #[inline(always)]
    pub fn flow_table_consulted(&self) -> bool {
        let hashes = self.policy == policy::HASH || self.policy == policy::CONSISTENT;
        self.flow_table_on()
            || (self.key == key::QUIC
                && !hashes
                && self.policy != policy::NONE
                && self.flow_timeout_ms != 0
                && self.flow_table_size != 0)
    }

    /// Whether a drained UDP socket has flows to finish: those of the
    /// flow table or those its cookies name. It then stays in the socket
    /// map while it drains, and a takeover carries it over, draining.
    #[inline(always)]
    pub fn keeps_flows(&self) -> bool {
        self.flow_timeout_ms != 0
            && (self.flow_table_on() || self.key == key::COOKIE || self.key == key::QUIC)
    }

    /// The live slot at position `x` modulo the number of live slots.
    #[inline(always)]
    pub fn live_at(&self, x: u32) -> Option<u32> {
        if self.n_live == 0 {
            return None;
        }
        // The eBPF verifier does not follow the bounds of a modulo, so the
        // index is masked: a no-op for any valid `n_live` (at most
        // MAX_WORKERS, a power of two) that proves the index in range.
        let i = (x % self.n_live) & (MAX_WORKERS - 1);
        self.live.get(i as usize).copied()
    }

    /// The slot the `cpu` policy gives a packet received on `cpu` whose
    /// kernel flow hash is `flow_hash`, or `None` when the CPU has no row
    /// (above [`MAX_CPUS`] or above the plan's CPUs).
    ///
    /// A CPU with workers pinned to it has them as its row, and the flow
    /// hash picks among them; a CPU without one has a row of one worker,
    /// chosen by the plan (`table::cpu_plan`).
    #[inline(always)]
    pub fn cpu_slot(&self, cpu: u32, flow_hash: u32) -> Option<u32> {
        if cpu >= self.n_cpus {
            return None;
        }
        // Masks: no-ops for valid values that prove the indices in range
        // to the verifier, which does not follow comparisons made above.
        let row = self.cpu_rows.get((cpu & (MAX_CPUS - 1)) as usize)?;
        let len = u32::from(row.len);
        if len == 0 {
            return None;
        }
        let pick = if len == 1 { 0 } else { flow_hash % len };
        let i = (u32::from(row.start) + pick) & (MAX_WORKERS - 1);
        self.cpu_slots.get(i as usize).map(|&s| u32::from(s))
    }
}

/// Everything the program reads on every run, in one map value (one
/// lookup, two pages), written by user space through a shared mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// The generation of `config` (and of the [`Table`]) in force: 0 or 1.
    pub active: u32,
    /// Reserved (keeps `tickets` on a cache line of its own).
    pub reserved: [u32; 15],
    /// Ticket counter of `round-robin` and `weighted`, advanced by the
    /// program with an atomic fetch-and-add.
    pub tickets: u64,
    /// New flows the program has recorded in the [flow table](flow)
    /// (atomic fetch-and-add, on a miss only): once it reaches the table's
    /// size, every new flow evicts another. A takeover that reuses its
    /// predecessor's table starts from the predecessor's count.
    pub flow_inserts: u64,
    /// Reserved (keeps the configurations off the tickets' cache line).
    pub reserved2: [u64; 6],
    /// The two generations of the configuration.
    pub config: [Config; 2],
}

impl State {
    /// A state with nothing configured.
    pub const EMPTY: State = State {
        active: 0,
        reserved: [0; 15],
        tickets: 0,
        flow_inserts: 0,
        reserved2: [0; 6],
        config: [Config::EMPTY; 2],
    };
}

/// One generation's slot table: slot numbers as `u16`, indexed by ticket
/// (`weighted`) or key hash (`consistent`). Two bytes an entry keep the
/// Maglev table, which the program reads at random, at 128 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// The first `Config::table_len` entries are in use.
    pub slots: [u16; TABLE_CAPACITY as usize],
}

/// States of a slot's worker ([`WorkerRecord::state`]).
pub mod worker_state {
    /// No worker.
    pub const EMPTY: u32 = 0;
    /// Accepting and serving.
    pub const SERVING: u32 = 1;
    /// No longer given new connections; finishing its open ones.
    pub const DRAINING: u32 = 2;
    /// Asked for (`ctl add-worker`): the group's owner is to start it.
    pub const STARTING: u32 = 3;
}

/// What a slot's worker is and has done. One per slot in
/// [`map::WORKERS`]; the owning worker updates it with atomic instructions
/// through a shared memory mapping, the program adds to `load`.
///
/// Two 64-byte cache lines: the first is written by the worker on every
/// connection (`accepted`, `active`, `bytes`), the second holds only
/// `load`, which the program reads and adds to on other CPUs, so neither
/// side's writes evict the line the other one uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerRecord {
    /// A [`worker_state`].
    pub state: u32,
    /// The CPU the worker is pinned to.
    pub cpu: u32,
    /// The process the worker runs in.
    pub pid: u32,
    /// Connections waiting in the worker's accept queue (sampled every
    /// second by the worker).
    pub queued: u32,
    /// Connections (or datagrams) accepted.
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Bytes served.
    pub bytes: u64,
    /// Connections that waited because the worker was at its connection limit.
    pub at_limit: u64,
    /// Start time of the process in `pid` (clock ticks after boot, as
    /// `/proc/PID/stat` field 22 gives it; 0: unknown), so that a later
    /// process given the same pid is not taken for it.
    pub pid_start: u64,
    /// The slot's socket's descriptor number in process `pid`, for a
    /// member of another process ([`member_kind::JOINED`] or
    /// [`member_kind::ADOPTED`]): a takeover duplicates it from there
    /// (`pidfd_getfd`) into the new generation's socket map.
    pub fd: i32,
    /// A [`member_kind`].
    pub kind: u32,
    /// Work steered to this slot and not finished: the program adds one per
    /// selection, the worker takes one away when it is done with it. The
    /// `least-loaded` policy picks the slot where it is smallest. At the
    /// start of the record's second cache line, away from the counters the
    /// worker writes, so the program's adds do not contend with them.
    pub load: u64,
    /// The generation of the slot's socket: user space raises it (wrapping,
    /// never 0) whenever the slot is given a new socket. A
    /// [`cookie`] or flow entry of another generation no
    /// longer names this socket. Read by the program, written rarely: on
    /// the second cache line.
    pub generation: u32,
    /// Unused; zero.
    pub reserved0: u32,
    /// Unused: fills the second cache line and leaves room for later fields.
    pub reserved: [u64; 6],
}

/// Who serves a slot ([`WorkerRecord::kind`]).
pub mod member_kind {
    /// A worker of the group's owner.
    pub const OWNER: u32 = 0;
    /// A worker of a process that joined (`reuseport join`).
    pub const JOINED: u32 = 1;
    /// A socket of another program (`reuseport adopt`).
    pub const ADOPTED: u32 = 2;
}

/// Bits of [`GroupInfo::flags`].
pub mod group_flag {
    /// The steering program is attached (the group was not started with
    /// the `kernel` policy).
    pub const PROGRAM: u32 = 1;
    /// A new generation took the group over (`run --takeover`): the owner
    /// drains its workers and exits without detaching the program, which
    /// is now the new generation's.
    pub const RETIRED: u32 = 2;
    /// The group relies on `net.ipv4.tcp_migrate_req` being 1 (a TCP group
    /// without a program that asked for it): a group that set the sysctl
    /// and goes first leaves it set, and hands the value to put back to
    /// this one.
    pub const MIGRATE_REQ: u32 = 4;
}

/// The group a set of maps belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    /// The address, as 16 bytes (IPv4 v4-mapped).
    pub addr: [u8; 16],
    /// The port.
    pub port: u32,
    /// 4 or 6.
    pub family: u32,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u32,
    /// Slots in use at start.
    pub workers: u32,
    /// The process that created the group.
    pub owner_pid: u32,
    /// [`group_flag`] bits.
    pub flags: u32,
    /// Start time of the owner (clock ticks after boot, `/proc/PID/stat`
    /// field 22), to tell it from a later process with the same pid.
    pub owner_start: u64,
    /// `net.ipv4.tcp_migrate_req` as it was before the group set it, plus
    /// one (0: the group did not touch it). Handed on at a takeover.
    pub migrate_req_saved: u32,
    /// Reserved.
    pub reserved: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all three): `repr(C)`, fixed-width integer fields only, no
    // padding (checked by the size tests), every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::State {}
    unsafe impl aya::Pod for super::Table {}
    unsafe impl aya::Pod for super::WorkerRecord {}
    unsafe impl aya::Pod for super::GroupInfo {}
    unsafe impl aya::Pod for super::Layout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_structs_have_no_padding() {
        assert_eq!(
            core::mem::size_of::<Config>(),
            4 * (16 + 2 * MAX_WORKERS as usize) + 4 * MAX_CPUS as usize + 2 * MAX_WORKERS as usize
        );
        assert_eq!(core::mem::size_of::<CpuRow>(), 4);
        assert_eq!(core::mem::size_of::<WorkerRecord>(), 128);
        assert_eq!(core::mem::offset_of!(WorkerRecord, load), 64);
        assert_eq!(core::mem::size_of::<Counters>(), 8 * counter::LEN as usize);
        // A per-CPU map value must fit the kernel's per-CPU unit (32 KiB).
        assert!(core::mem::size_of::<Counters>() <= 32 * 1024);
        assert_eq!(core::mem::size_of::<Table>(), 2 * TABLE_CAPACITY as usize);
        assert_eq!(
            core::mem::size_of::<State>(),
            128 + 2 * core::mem::size_of::<Config>()
        );
        assert_eq!(core::mem::offset_of!(State, tickets), 64);
        assert_eq!(core::mem::offset_of!(State, config), 128);
        assert_eq!(core::mem::size_of::<WorkerRecord>() % 8, 0);
        assert_eq!(core::mem::size_of::<GroupInfo>(), 16 + 4 * 6 + 8 + 4 * 2);
        assert_eq!(core::mem::size_of::<Layout>(), 64, "never changes size");
        assert_eq!(core::mem::size_of::<flow::FlowKey>(), 36);
        assert_eq!(core::mem::size_of::<flow::FlowEntry>(), 16);
    }

    /// A tripwire: the sizes of the pinned records are those of
    /// [`LAYOUT_VERSION`]. When this fails, a record changed: raise the
    /// version (and update the sizes here), or an older group's maps will
    /// be misread by this build instead of refused.
    #[test]
    fn the_layout_version_matches_the_records() {
        let l = Layout::CURRENT;
        assert_eq!(
            (
                l.version,
                l.state_size,
                l.table_size,
                l.worker_record_size,
                l.group_info_size,
                l.max_workers,
                l.counters
            ),
            (7, 53504, 131072, 128, 56, 1024, 1040)
        );
    }

    #[test]
    fn the_flow_table_is_off_where_the_key_names_the_flow() {
        let mut c = Config::EMPTY;
        c.policy = policy::ROUND_ROBIN;
        c.key = key::PAYLOAD;
        assert!(!c.flow_table_on() && !c.keeps_flows(), "TCP: no timeout");
        c.flow_timeout_ms = 30_000;
        c.flow_table_size = 8;
        assert!(c.flow_table_on(), "a payload key that round robin ignores");
        c.policy = policy::HASH;
        assert!(
            !c.flow_table_on() && !c.keeps_flows(),
            "the payload names it"
        );
        c.key = key::SRC_IP;
        assert!(c.flow_table_on() && c.keeps_flows());
        c.key = key::QUIC;
        assert!(!c.flow_table_on() && c.keeps_flows(), "cookies name it");
        assert!(
            !c.flow_table_consulted(),
            "the ID's hash keeps Initials together"
        );
        c.policy = policy::ROUND_ROBIN;
        assert!(
            c.flow_table_consulted(),
            "the table keeps Initials together"
        );
        c.policy = policy::HASH;
        c.key = key::SRC_IP;
        c.flow_table_size = 0;
        assert!(!c.flow_table_on() && !c.keeps_flows(), "no table");
        c.flow_table_size = 8;
        c.policy = policy::NONE;
        assert!(!c.flow_table_on(), "the kernel policy");
    }

    #[test]
    fn live_at_wraps_over_live_slots_only() {
        let mut c = Config::EMPTY;
        assert_eq!(c.live_at(3), None);
        c.n_live = 3;
        c.live[..3].copy_from_slice(&[0, 2, 5]);
        assert_eq!(c.live_at(0), Some(0));
        assert_eq!(c.live_at(1), Some(2));
        assert_eq!(c.live_at(5), Some(5));
        assert_eq!(c.live_at(u32::MAX), Some(c.live[(u32::MAX % 3) as usize]));
    }

    #[test]
    fn cpu_slot_reads_the_cpu_row_and_stays_in_range() {
        let mut c = Config::EMPTY;
        assert_eq!(c.cpu_slot(0, 7), None);
        // CPU 0: slots 4 and 6; CPU 1: slot 9; CPU 2: no row.
        c.cpu_slots[..3].copy_from_slice(&[4, 6, 9]);
        c.cpu_rows[0] = CpuRow { start: 0, len: 2 };
        c.cpu_rows[1] = CpuRow { start: 2, len: 1 };
        c.n_cpus = 3;
        assert_eq!(c.cpu_slot(0, 7), Some(6));
        assert_eq!(c.cpu_slot(0, 8), Some(4));
        assert_eq!(c.cpu_slot(1, 8), Some(9));
        assert_eq!(c.cpu_slot(2, 0), None);
        assert_eq!(c.cpu_slot(3, 0), None);
        assert_eq!(c.cpu_slot(u32::MAX, 0), None);
        // A corrupt row never reads out of the list.
        c.cpu_rows[1] = CpuRow {
            start: u16::MAX,
            len: u16::MAX,
        };
        assert!(c.cpu_slot(1, u32::MAX).is_some());
    }

    #[test]
    fn counter_indices_are_distinct_and_in_range() {
        let all = [
            counter::FALLBACK,
            counter::DROPPED,
            counter::EMPTY_SLOT,
            counter::KEY_UNREADABLE,
            counter::SHORT_PAYLOAD,
            counter::MIGRATED,
            counter::TURN,
            counter::COOKIE_OK,
            counter::COOKIE_BAD,
            counter::COOKIE_OLD,
            counter::FLOW_HIT,
            counter::FLOW_MISS,
            counter::FLOW_FULL,
            counter::QUIC_INITIAL,
            counter::QUIC_UNREADABLE,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(*a >= counter::SELECTED_BASE + MAX_WORKERS && *a < counter::LEN);
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    mod properties {
        extern crate std;
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn live_at_only_returns_live_slots(
                live in proptest::collection::btree_set(0..MAX_WORKERS, 0..=MAX_WORKERS as usize),
                x in any::<u32>(),
            ) {
                let live: std::vec::Vec<u32> = live.into_iter().collect();
                let mut c = Config::EMPTY;
                c.n_live = live.len() as u32;
                c.live[..live.len()].copy_from_slice(&live);
                match c.live_at(x) {
                    Some(s) => prop_assert!(live.contains(&s)),
                    None => prop_assert!(live.is_empty()),
                }
            }
        }
    }
}
