//! Typed handles on the program's maps, opened either from a freshly
//! loaded object (the process that runs the group) or from their pins under
//! bpffs (`reuseport ctl`, `reuseport stats`, a process that joins).
//!
//! All policy state is in these maps, so whoever holds them can read and
//! change the policy; nothing is kept only in the running process's memory.

use std::{
    fs::File,
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI32, AtomicU16, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, ReusePortSockArray},
    Ebpf,
};
use memmap2::{MmapOptions, MmapRaw};
use reuseport_common::{
    counter, group_flag, map, member_kind, Config, Counters, GroupInfo, State, Table, WorkerRecord,
    MAX_WORKERS, TABLE_CAPACITY,
};

use crate::{
    error::{Error, Result},
    policy::{self, LiveSlot, Plan},
    slots,
};

/// The program's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BpfCounters {
    /// Selections per slot (index = slot).
    pub selected: Vec<u64>,
    /// Runs that left the choice to the kernel's hash.
    pub fallback: u64,
    /// Runs that dropped the packet.
    pub dropped: u64,
    /// Picks that found their slot empty and moved on.
    pub empty_slot: u64,
    /// Packets whose key could not be read (the flow hash was used).
    pub key_unreadable: u64,
    /// Datagrams too short for the payload key.
    pub short_payload: u64,
    /// Runs on the migration path.
    pub migrated: u64,
    /// Datagrams a valid cookie of the slot's current socket steered.
    pub cookie_ok: u64,
    /// Datagrams whose cookie bytes failed the check (new flows, or not
    /// ours): placed by the policy.
    pub cookie_bad: u64,
    /// Datagrams with a valid cookie of a socket that is gone or was
    /// replaced: placed by the policy.
    pub cookie_old: u64,
    /// Datagrams the flow table sent to their flow's socket.
    pub flow_hit: u64,
    /// Datagrams of flows the flow table did not know.
    pub flow_miss: u64,
    /// New flows recorded in a full flow table (each evicted the least
    /// recently used flow), or not recorded at all.
    pub flow_full: u64,
    /// QUIC Initial and 0-RTT packets placed by the policy.
    pub quic_initial: u64,
    /// Datagrams without a readable QUIC header (too short, malformed,
    /// version negotiation, unknown version): placed by the policy.
    pub quic_unreadable: u64,
}

impl BpfCounters {
    /// All-zero counters (what a group without a program reports).
    pub fn zero() -> Self {
        BpfCounters {
            selected: vec![0; MAX_WORKERS as usize],
            ..Default::default()
        }
    }

    /// Runs of the program: every run ends in one selection, fallback or drop.
    pub fn runs(&self) -> u64 {
        self.selected.iter().sum::<u64>() + self.fallback + self.dropped
    }
}

/// A worker's record as atomics: the same layout as
/// [`WorkerRecord`], so it can be read and updated in place in the shared
/// mapping of the `WORKERS` map while the program adds to `load`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// A `reuseport_common::worker_state`.
    pub state: AtomicU32,
    /// The CPU the worker is pinned to.
    pub cpu: AtomicU32,
    /// The worker's process.
    pub pid: AtomicU32,
    /// Connections waiting in the accept queue (sampled every second).
    pub queued: AtomicU32,
    /// Connections (or datagrams) accepted.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Bytes served.
    pub bytes: AtomicU64,
    /// Connections that waited because the worker was at its limit.
    pub at_limit: AtomicU64,
    /// Start time of the process in `pid` (see `WorkerRecord::pid_start`).
    pub pid_start: AtomicU64,
    /// The slot's socket's descriptor in process `pid` (other processes'
    /// members; see `WorkerRecord::fd`).
    pub fd: AtomicI32,
    /// A `reuseport_common::member_kind`.
    pub kind: AtomicU32,
    /// Work steered to the slot and not finished (see `WorkerRecord::load`),
    /// on a cache line of its own.
    pub load: AtomicU64,
    /// The generation of the slot's socket (see `WorkerRecord::generation`).
    pub generation: AtomicU32,
    /// Unused (see `WorkerRecord::reserved0`).
    pub reserved0: AtomicU32,
    /// Unused (see `WorkerRecord::reserved`).
    pub reserved: [AtomicU64; 6],
}

const _: () = assert!(size_of::<WorkerCounters>() == size_of::<WorkerRecord>());
// Field by field: the program writes `load` at the contract's offset.
macro_rules! same_offset {
    ($($field:ident),*) => {
        $(const _: () = assert!(
            std::mem::offset_of!(WorkerCounters, $field) == std::mem::offset_of!(WorkerRecord, $field)
        );)*
    };
}
same_offset!(
    state, cpu, pid, queued, accepted, active, bytes, at_limit, pid_start, fd, kind, load,
    generation, reserved0, reserved
);
const _: () = assert!(align_of::<WorkerCounters>() <= 8);

impl WorkerCounters {
    /// A plain copy of the record.
    pub fn snapshot(&self) -> WorkerRecord {
        WorkerRecord {
            state: self.state.load(Ordering::Relaxed),
            cpu: self.cpu.load(Ordering::Relaxed),
            pid: self.pid.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            at_limit: self.at_limit.load(Ordering::Relaxed),
            pid_start: self.pid_start.load(Ordering::Relaxed),
            fd: self.fd.load(Ordering::Relaxed),
            kind: self.kind.load(Ordering::Relaxed),
            load: self.load.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            reserved0: 0,
            reserved: [0; 6],
        }
    }

    /// Takes one away from `load`, never below zero.
    pub fn finish_one(&self) {
        let _ = self
            .load
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Makes the record, in a new group's own maps (which no other process
    /// sees yet), that of a new worker of the owner on `cpu` in this process
    /// and marks it serving ([`slots::serve_new`]); false if the slot was
    /// not free.
    #[must_use]
    pub fn reset(&self, cpu: u32) -> bool {
        if self.state.load(Ordering::Acquire) != slots::EMPTY {
            return false;
        }
        self.fill(cpu, std::process::id(), member_kind::OWNER, -1);
        slots::serve_new(&self.state)
    }

    /// Makes the record of a slot claimed for process `pid` ([`slots::claim`])
    /// that of its new worker on `cpu`, a member of `kind` (a
    /// `reuseport_common::member_kind`) whose socket is descriptor `fd` there
    /// (-1 for the owner's), and marks it serving ([`slots::serve`]). False,
    /// with the record untouched, if the claim is not (or no longer) that
    /// of `pid`: it was given up meanwhile, or given up and taken by another
    /// process.
    #[must_use]
    pub fn start_serving(&self, cpu: u32, pid: u32, kind: u32, fd: i32) -> bool {
        if self.state.load(Ordering::Acquire) != slots::STARTING
            || self.pid.load(Ordering::Acquire) != pid
        {
            return false;
        }
        self.fill(cpu, pid, kind, fd);
        slots::serve(&self.state)
    }

    /// Resets the record's counts and writes whose it is.
    fn fill(&self, cpu: u32, pid: u32, kind: u32, fd: i32) {
        self.next_generation();
        for c in [
            &self.accepted,
            &self.active,
            &self.bytes,
            &self.load,
            &self.at_limit,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.cpu.store(cpu, Ordering::Relaxed);
        self.set_process(pid);
        self.set_member(kind, fd);
    }

    /// Makes the record that of a member carried over from record `from`
    /// of the group's previous generation (a takeover; see
    /// `group::takeover`): its CPU, process and socket as they were, its
    /// counts at least as they were, and marks it serving; false if the
    /// slot was taken meanwhile.
    #[must_use]
    pub fn carry(&self, from: &WorkerRecord) -> bool {
        self.add_counts(from);
        self.active.store(from.active, Ordering::Relaxed);
        self.cpu.store(from.cpu, Ordering::Relaxed);
        self.pid.store(from.pid, Ordering::Relaxed);
        self.pid_start.store(from.pid_start, Ordering::Relaxed);
        // The same socket: the cookies minted for it stay valid.
        self.generation.store(from.generation, Ordering::Release);
        self.set_member(from.kind, from.fd);
        slots::serve_new(&self.state)
    }

    /// Raises the generation of the slot's socket (wrapping within the
    /// 16 bits a cookie carries, never 0): cookies minted for the slot's
    /// previous socket no longer name this one. Returns the new generation.
    pub fn next_generation(&self) -> u16 {
        let mut next = 0;
        let _ = self
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                next = match (g as u16).wrapping_add(1) {
                    0 => 1,
                    n => n,
                };
                Some(u32::from(next))
            });
        next
    }

    /// Counts that only grow: this record's become at least `from`'s.
    pub fn add_counts(&self, from: &WorkerRecord) {
        self.accepted.fetch_max(from.accepted, Ordering::Relaxed);
        self.bytes.fetch_max(from.bytes, Ordering::Relaxed);
        self.at_limit.fetch_max(from.at_limit, Ordering::Relaxed);
    }

    /// Records that the slot's worker runs in process `pid`, with its start
    /// time, so that liveness checks cannot mistake a later process with
    /// the same pid for it.
    pub fn set_process(&self, pid: u32) {
        let start = if pid == std::process::id() {
            crate::pins::own_start_time()
        } else {
            crate::pins::process_start_time(pid).unwrap_or(0)
        };
        self.pid.store(pid, Ordering::Relaxed);
        self.pid_start.store(start, Ordering::Relaxed);
    }

    /// Whether the process the record names still runs (by pid and start
    /// time).
    pub fn process_alive(&self) -> bool {
        crate::pins::process_alive(
            self.pid.load(Ordering::Relaxed),
            self.pid_start.load(Ordering::Relaxed),
        )
    }

    /// Records that the slot's socket is descriptor `fd` of this record's
    /// process, a member of `kind` (a `reuseport_common::member_kind`),
    /// so that a takeover can carry it into the new generation.
    pub fn set_member(&self, kind: u32, fd: i32) {
        self.fd.store(fd, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Relaxed);
    }
}

/// A random, non-zero cookie secret from the kernel's generator.
fn random_secret() -> Result<u32> {
    use std::io::Read;
    let mut b = [0u8; 4];
    loop {
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| Error::io("reading /dev/urandom for the cookie secret", e))?;
        // 0 means "none yet" (a new group's zeroed record).
        if b != [0; 4] {
            return Ok(u32::from_ne_bytes(b));
        }
    }
}

/// The `WORKERS` records, mapped into this process (or, for a group
/// without BPF, plain anonymous memory of the same shape).
#[derive(Debug)]
pub struct WorkerRegion {
    mmap: MmapRaw,
}

/// Maps `len` bytes of the memory-mappable array map whose descriptor is
/// `fd` (its elements back to back, each `value_size` rounded up to 8).
///
/// The mapping is shared with the program and with every process that
/// maps the same pinned map, any of which may write it at any moment, so
/// it is an [`MmapRaw`]: it hands out raw pointers only, and this module
/// reaches the memory through atomics ([`Shared`], [`WorkerCounters`]),
/// never through a reference to its bytes.
fn map_array(fd: BorrowedFd<'_>, len: usize, name: &str) -> Result<MmapRaw> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(|e| Error::io(format!("duplicating the {name} map descriptor"), e))?;
    let file = File::from(owned);
    // The map was created with BPF_F_MMAPABLE and holds at least `len`
    // bytes; the mapping stays valid after the descriptor closes.
    MmapOptions::new()
        .len(len)
        .map_raw(&file)
        .map_err(|e| Error::io(format!("mapping the {name} map"), e))
}

/// Types copied in and out of a [`Shared`] mapping word by word.
///
/// # Safety
///
/// `#[repr(C)]`, a size that is a multiple of 4 bytes, an alignment of at
/// least 4, no padding, and valid for any bit pattern (integers and arrays
/// of them only).
unsafe trait Words: Copy {}
// SAFETY: u32 fields and a byte array whose length is a multiple of 4.
unsafe impl Words for Config {}
const _: () = assert!(size_of::<Config>().is_multiple_of(4) && align_of::<Config>() >= 4);

/// A mapping of a memory-mappable array map that the program and other
/// processes read and write too: reached only through atomic loads and
/// stores of its words and bytes.
#[derive(Debug)]
struct Shared(MmapRaw);

impl Shared {
    /// The 4-byte word at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is out of bounds or not a multiple of 4: offsets come
    /// from `offset_of!` and `size_of!` of the contract's types, so such an
    /// offset is a bug of ours.
    fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.0.len(),
            "offset {offset}"
        );
        // SAFETY: in bounds and aligned (the base is page-aligned), valid
        // for as long as `self`; an atomic may be accessed concurrently
        // from other threads, processes and the program.
        unsafe { AtomicU32::from_ptr(self.0.as_mut_ptr().add(offset).cast()) }
    }

    /// The 8-byte word at `offset` (a count the program adds to).
    ///
    /// # Panics
    ///
    /// As [`Shared::word`], for an offset out of bounds or not a multiple
    /// of 8.
    fn dword(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.0.len(),
            "offset {offset}"
        );
        // SAFETY: as for `word`, aligned to 8.
        unsafe { AtomicU64::from_ptr(self.0.as_mut_ptr().add(offset).cast()) }
    }

    /// The 2-byte half-word at `offset` (a table entry).
    ///
    /// # Panics
    ///
    /// As [`Shared::word`], for an offset out of bounds or odd.
    fn half(&self, offset: usize) -> &AtomicU16 {
        assert!(
            offset.is_multiple_of(2) && offset + 2 <= self.0.len(),
            "offset {offset}"
        );
        // SAFETY: as for `word`, aligned to 2.
        unsafe { AtomicU16::from_ptr(self.0.as_mut_ptr().add(offset).cast()) }
    }

    /// Copies a `T` out of the mapping at `offset`, word by word.
    fn load<T: Words>(&self, offset: usize) -> T {
        let mut out = MaybeUninit::<T>::uninit();
        let dst = out.as_mut_ptr().cast::<u32>();
        for i in 0..size_of::<T>() / 4 {
            let w = self.word(offset + 4 * i).load(Ordering::Relaxed);
            // SAFETY: word `i` of `out`, aligned as `T` is (at least 4).
            unsafe { dst.add(i).write(w) };
        }
        // SAFETY: every word written, and any bit pattern is a valid `T`.
        unsafe { out.assume_init() }
    }

    /// Copies `value` into the mapping at `offset`, word by word.
    fn store<T: Words>(&self, offset: usize, value: &T) {
        let src = (value as *const T).cast::<u32>();
        for i in 0..size_of::<T>() / 4 {
            // SAFETY: word `i` of `value`, which has no padding.
            let w = unsafe { src.add(i).read() };
            self.word(offset + 4 * i).store(w, Ordering::Relaxed);
        }
    }
}

impl WorkerRegion {
    const LEN: usize = MAX_WORKERS as usize * size_of::<WorkerRecord>();

    /// Records in private memory, for a group that runs without BPF.
    pub fn anonymous() -> Result<Self> {
        let mmap = MmapOptions::new()
            .len(Self::LEN)
            .map_anon()
            .map_err(|e| Error::io("allocating worker records", e))?;
        Ok(WorkerRegion { mmap: mmap.into() })
    }

    /// The record of `slot`.
    ///
    /// # Panics
    ///
    /// If `slot` is not below `MAX_WORKERS`: a slot number comes from a
    /// claim, or from the user and checked against it first, so a larger
    /// one is a bug of ours.
    pub fn slot(&self, slot: u32) -> &WorkerCounters {
        assert!(slot < MAX_WORKERS, "slot {slot} out of range");
        let offset = slot as usize * size_of::<WorkerCounters>();
        assert!(offset + size_of::<WorkerCounters>() <= self.mmap.len());
        // SAFETY: in bounds (checked above), 8-byte aligned (page-aligned
        // base, 128-byte records), and the type is atomics only: valid for
        // any bit pattern and for concurrent access from other processes
        // and the program (a reference to an atomic is not a claim that
        // nobody else writes it).
        unsafe { &*(self.mmap.as_ptr().add(offset) as *const WorkerCounters) }
    }

    /// Makes this mapping show the `WORKERS` map `fd` (of a group's next
    /// generation, after a takeover) instead of the map it was made from,
    /// at the same address: every reference into it, such as the running
    /// workers' [`WorkerStats`], then reads and counts in that map.
    /// `mmap(2)` with `MAP_FIXED` replaces the old pages in one step under
    /// the process's mmap lock, so a concurrent access sees one map or the
    /// other, never a hole. Hand-written: memmap2 cannot map over an
    /// existing mapping.
    pub fn remap(&self, fd: BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsRawFd;
        let addr = self.mmap.as_ptr() as *mut libc::c_void;
        // SAFETY: the range is this mapping's own (page-aligned, LEN
        // bytes); it stays mapped throughout, now backed by a map of the
        // same layout (checked when the map was opened), whose every bit
        // pattern is valid for the atomics that read it.
        let r = unsafe {
            libc::mmap(
                addr,
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(Error::io(
                format!("mapping the next generation's {} map", map::WORKERS),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Every slot's record.
    pub fn snapshot(&self) -> Vec<WorkerRecord> {
        (0..MAX_WORKERS).map(|s| self.slot(s).snapshot()).collect()
    }
}

/// One worker's record, shared with its worker thread.
#[derive(Clone, Debug)]
pub struct WorkerStats {
    region: Arc<WorkerRegion>,
    slot: u32,
}

impl WorkerStats {
    /// The record of `slot` in `region`.
    pub fn new(region: Arc<WorkerRegion>, slot: u32) -> Self {
        WorkerStats { region, slot }
    }
}

impl std::ops::Deref for WorkerStats {
    type Target = WorkerCounters;
    fn deref(&self) -> &WorkerCounters {
        self.region.slot(self.slot)
    }
}

/// Handles on every pinned map of a group.
pub struct Maps {
    sockets: ReusePortSockArray<MapData>,
    /// The socket map's descriptor, to hand out more handles on it.
    sockets_fd: std::os::fd::OwnedFd,
    /// The `WORKERS` map's descriptor (see [`WorkerRegion::remap`]).
    workers_fd: std::os::fd::OwnedFd,
    state: Shared,
    table: Shared,
    counters: PerCpuArray<MapData, Counters>,
    group: Array<MapData, GroupInfo>,
    workers: Arc<WorkerRegion>,
    pin_dir: Option<PathBuf>,
    /// The flow table (see `reuseport_common::flow`), held so that it is
    /// pinned with the rest.
    _flows: Map,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Maps {
    /// Takes the maps out of a loaded object, pinning them in `pin_dir`.
    /// The layout record is written and pinned first, so that no opener
    /// ever sees the other pins without it.
    pub fn from_ebpf(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self> {
        let mut layout = ebpf
            .take_map(map::LAYOUT)
            .ok_or_else(|| not_found(map::LAYOUT))?;
        crate::layout::write(&mut layout)?;
        if let Some(dir) = pin_dir {
            layout.pin(dir.join(map::LAYOUT)).map_err(|e| {
                Error::bpf(
                    format!("pinning map {} in {}", map::LAYOUT, dir.display()),
                    e,
                )
            })?;
        }
        let mut take = |name: &str| -> Result<Map> {
            let m = ebpf.take_map(name).ok_or_else(|| not_found(name))?;
            if let Some(dir) = pin_dir {
                m.pin(dir.join(name)).map_err(|e| {
                    Error::bpf(format!("pinning map {name} in {}", dir.display()), e)
                })?;
            }
            Ok(m)
        };
        Self::assemble(&mut take, pin_dir)
    }

    /// Opens the maps pinned in `dir`, after checking that they are of
    /// this build's layout ([`crate::layout::check`]).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        // Every map of one generation: the directory is opened once and each
        // pin is reached through that descriptor (`/proc/self/fd/N/NAME`
        // follows the directory itself, not its name), so a takeover that
        // swaps the group's directory meanwhile (`RENAME_EXCHANGE`, see
        // `group::takeover`) cannot hand us some maps of the old generation
        // and some of the new.
        let held =
            File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        use std::os::fd::AsRawFd;
        let through = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        let group = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::layout::check_group(&through, &group)?;
        let mut open = |name: &str| -> Result<Map> {
            let data = MapData::from_pin(through.join(name))
                .map_err(|e| Error::bpf(format!("opening {}", dir.join(name).display()), e))?;
            Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {name}"), e))
        };
        Self::assemble(&mut open, Some(dir))
    }

    fn assemble(get: &mut dyn FnMut(&str) -> Result<Map>, pin_dir: Option<&Path>) -> Result<Self> {
        let mut workers_fd = None;
        let mut mapped =
            |name: &str, len: usize| -> Result<MmapRaw> {
                match get(name)? {
                    Map::Array(data) => {
                        if name == map::WORKERS {
                            workers_fd =
                                Some(data.fd().as_fd().try_clone_to_owned().map_err(|e| {
                                    Error::io(format!("duplicating map {name}"), e)
                                })?);
                        }
                        map_array(data.fd().as_fd(), len, name)
                    }
                    _ => Err(wrong_type(name)),
                }
            };
        let workers = WorkerRegion {
            mmap: mapped(map::WORKERS, WorkerRegion::LEN)?,
        };
        let state = Shared(mapped(map::STATE, size_of::<State>())?);
        let table = Shared(mapped(map::TABLE, 2 * size_of::<Table>())?);
        let sockets = get(map::SOCKETS)?;
        let sockets_fd = match &sockets {
            Map::ReusePortSockArray(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicating map {}", map::SOCKETS), e))?,
            _ => return Err(wrong_type(map::SOCKETS)),
        };
        Ok(Maps {
            sockets: typed(sockets, map::SOCKETS)?,
            sockets_fd,
            workers_fd: workers_fd.ok_or_else(|| not_found(map::WORKERS))?,
            state,
            table,
            counters: typed(get(map::COUNTERS)?, map::COUNTERS)?,
            group: typed(get(map::GROUP)?, map::GROUP)?,
            workers: Arc::new(workers),
            pin_dir: pin_dir.map(Path::to_path_buf),
            _flows: get(map::FLOWS)?,
        })
    }

    /// Where the maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Records that the pins moved to `dir` (after a takeover).
    pub fn set_pin_dir(&mut self, dir: &Path) {
        self.pin_dir = Some(dir.to_path_buf());
    }

    /// Takes `slot` (it must be free) for a worker of process `pid` on `cpu`.
    /// `weight` as for [`Maps::claim_slot`] (none: keep the slot's).
    pub fn claim_this_slot(
        &mut self,
        slot: u32,
        cpu: u32,
        pid: u32,
        weight: Option<u32>,
    ) -> Result<()> {
        let _lock = self.lock()?;
        let taken = || Error::NotServing {
            slot,
            state: "taken by another worker",
        };
        if self.workers.slot(slot).state.load(Ordering::Acquire) != slots::EMPTY {
            return Err(taken());
        }
        self.give_weight(slot, weight)?;
        self.mark_claimed(slot, cpu, pid)
            .then_some(())
            .ok_or_else(taken)
    }

    /// Takes a free slot (its record empty) for a worker of process `pid`
    /// on `cpu`, under the group's lock: marks it starting. Whoever starts
    /// the worker marks it serving ([`WorkerCounters::reset`]).
    ///
    /// With `weight`, a steered group's configuration gets that weight for
    /// the slot (what `weighted` gives it) in the same locked step, so that
    /// whoever rebuilds the policy next sees both.
    pub fn claim_slot(&mut self, cpu: u32, pid: u32, weight: Option<u32>) -> Result<u32> {
        let _lock = self.lock()?;
        loop {
            let slot = (0..MAX_WORKERS)
                .find(|&slot| self.workers.slot(slot).state.load(Ordering::Acquire) == slots::EMPTY)
                .ok_or(Error::NoFreeSlot { max: MAX_WORKERS })?;
            self.give_weight(slot, weight)?;
            if self.mark_claimed(slot, cpu, pid) {
                return Ok(slot);
            }
            // A new group's member took it (EMPTY -> SERVING) meanwhile.
        }
    }

    /// Writes who claims `slot` (CPU, process) and then claims it
    /// ([`slots::claim`]), in that order: whoever sees it starting sees
    /// whose it is. Claimers hold the group's lock, so none writes over
    /// another's record.
    fn mark_claimed(&self, slot: u32, cpu: u32, pid: u32) -> bool {
        let rec = self.workers.slot(slot);
        rec.cpu.store(cpu, Ordering::Relaxed);
        rec.set_process(pid);
        slots::claim(&rec.state)
    }

    /// Under the group's lock: gives `slot` its `weight` in the policy in
    /// force, if that is `weighted` and the weight differs.
    fn give_weight(&mut self, slot: u32, weight: Option<u32>) -> Result<()> {
        let Some(w) = weight else {
            return Ok(());
        };
        if self.group_info()?.flags & group_flag::PROGRAM == 0 {
            return Ok(());
        }
        let current = self.current_plan()?;
        if current.config.policy != reuseport_common::policy::WEIGHTED
            || current.config.weights[slot as usize] == w
        {
            return Ok(());
        }
        let mut next = current;
        next.config.weights[slot as usize] = w;
        self.write(&next)
    }

    /// Drains `slot`, all under the group's lock so that no other writer
    /// computes the live workers in between: checks that it serves and is
    /// not the last live worker, rebuilds the policy without it (`steered`:
    /// a program is attached), empties its place in the socket map, and
    /// only then marks it draining, which tells its process to close it.
    pub fn drain_slot(&mut self, slot: u32, steered: bool) -> Result<()> {
        let _lock = self.lock()?;
        let records = self.workers.snapshot();
        let Some(rec) = records.get(slot as usize) else {
            return Err(Error::NotServing {
                slot,
                state: "out of range",
            });
        };
        if rec.state != slots::SERVING {
            return Err(Error::NotServing {
                slot,
                state: slots::name(rec.state),
            });
        }
        let live: Vec<LiveSlot> = slots::live_slots(&records)
            .into_iter()
            .filter(|l| l.slot != slot)
            .collect();
        if live.is_empty() {
            return Err(Error::LastWorker { slot });
        }
        if steered {
            let current = self.current_plan()?;
            let plan = policy::rebuild(&current, &live)?;
            self.write(&plan)?;
            // A UDP worker with a flow timeout, or under a key whose
            // datagrams carry cookies, keeps its socket in the map while it
            // drains: out of the policy, it gets no new flows, but its
            // flows' datagrams (the flow table's, or their cookies) still
            // reach it (see `reuseport_common::flow`). Closing it empties
            // the slot (the kernel detaches a closed socket from its
            // REUSEPORT_SOCKARRAY).
            if !current.config.keeps_flows()
                && !matches!(
                    current.config.key,
                    reuseport_common::key::COOKIE | reuseport_common::key::QUIC
                )
            {
                self.clear_slot(slot)?;
            }
        }
        let state = &self.workers.slot(slot).state;
        if !slots::drain(state) {
            // Its worker went meanwhile: the plan is already without it.
            return Err(Error::NotServing {
                slot,
                state: slots::name(state.load(Ordering::Acquire)),
            });
        }
        Ok(())
    }

    /// The workers' records.
    pub fn workers(&self) -> &Arc<WorkerRegion> {
        &self.workers
    }

    /// The `WORKERS` map's descriptor.
    pub fn workers_fd(&self) -> BorrowedFd<'_> {
        self.workers_fd.as_fd()
    }

    /// Puts `socket` into `slot` of the socket map. The socket must already
    /// be hashed (listening, for TCP; bound, for UDP).
    pub fn set_slot(&mut self, slot: u32, socket: &impl std::os::fd::AsRawFd) -> Result<()> {
        self.sockets
            .set(slot, socket, 0)
            .map_err(|e| Error::bpf(format!("placing a socket in slot {slot}"), e))
    }

    /// Empties `slot`: the program stops selecting it at once. A slot that
    /// is already empty (its socket closed) is fine.
    pub fn clear_slot(&mut self, slot: u32) -> Result<()> {
        clear(&mut self.sockets, slot)
    }

    /// A handle on the socket map of its own, for a worker's fault hook:
    /// it empties the worker's slot without waiting for whoever holds this
    /// one (a policy write waits for the group's lock and a grace period).
    pub fn socket_map_handle(&self) -> Result<SocketMapHandle> {
        let fd = self
            .sockets_fd
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating map {}", map::SOCKETS), e))?;
        let data =
            MapData::from_fd(fd).map_err(|e| Error::bpf(format!("map {}", map::SOCKETS), e))?;
        let map =
            Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {}", map::SOCKETS), e))?;
        Ok(SocketMapHandle(typed(map, map::SOCKETS)?))
    }

    /// `State::active`: the generation in force (the program only reads it).
    fn active(&self) -> &AtomicU32 {
        self.state.word(std::mem::offset_of!(State, active))
    }

    /// Where generation `g` of the configuration is in the STATE mapping.
    fn config_offset(g: u32) -> usize {
        std::mem::offset_of!(State, config) + g as usize * size_of::<Config>()
    }

    /// The generation in force.
    fn generation(&self) -> u32 {
        self.active().load(Ordering::Acquire) & 1
    }

    /// Puts a plan in force: writes the generation not in use, then makes it
    /// the active one with a single 4-byte write, so a concurrent run of the
    /// program sees either the old plan or the new one, never a mix. Holds
    /// the group's lock (when pinned) so two writers cannot interleave.
    pub fn apply(&mut self, plan: &Plan) -> Result<()> {
        let _lock = self.lock()?;
        self.write(plan)
    }

    /// Replaces the plan in force by `next(current, live)`, under the
    /// group's lock, so that no other writer changes it in between; `live`
    /// (the serving workers) is read under the lock too. Nothing is written
    /// when the plan does not change.
    pub fn update(&mut self, next: impl FnOnce(&Plan, &[LiveSlot]) -> Result<Plan>) -> Result<()> {
        let _lock = self.lock()?;
        let live = slots::live_slots(&self.workers.snapshot());
        let current = self.current_plan()?;
        let mut plan = next(&current, &live)?;
        plan.config.cookie_secret = self.cookie_secret(&plan.config)?;
        if plan == current {
            return Ok(());
        }
        self.write(&plan)
    }

    fn write(&mut self, plan: &Plan) -> Result<()> {
        // The generation about to be written was in force until the last
        // flip, and a run of the program that read `active` before it may
        // still be reading that generation. Runs are RCU read-side sections
        // (socket lookup), so after a grace period none is left.
        wait_for_program_runs();
        let mut config = plan.config;
        config.cookie_secret = self.cookie_secret(&plan.config)?;
        let next = self.generation() ^ 1;
        if plan.table.len() > TABLE_CAPACITY as usize {
            return Err(Error::bpf(
                "writing the policy table",
                io::Error::other("table larger than TABLE_CAPACITY"),
            ));
        }
        // Generation `next`, which the program does not read until
        // `active` flips: its table, then its configuration.
        let base = Self::table_offset(next);
        for (i, &slot) in plan.table.iter().enumerate() {
            // Slots are below MAX_WORKERS, so they fit a u16.
            self.table
                .half(base + 2 * i)
                .store(slot as u16, Ordering::Relaxed);
        }
        self.state.store(Self::config_offset(next), &config);
        // Release: the writes above are visible before the flip.
        self.active().store(next, Ordering::Release);
        Ok(())
    }

    /// The cookie secret a plan is written with: the plan's own if it has
    /// one (a takeover carries the old generation's), else the one in
    /// force (plans are built from scratch, and the secret is the group's,
    /// not the policy's), else, for a new group, a fresh random one.
    fn cookie_secret(&self, next: &Config) -> Result<u32> {
        if next.cookie_secret != 0 {
            return Ok(next.cookie_secret);
        }
        match self.config()?.cookie_secret {
            0 => random_secret(),
            s => Ok(s),
        }
    }

    /// Where generation `g`'s table is in the TABLE mapping.
    fn table_offset(g: u32) -> usize {
        g as usize * size_of::<Table>()
    }

    /// An exclusive lock on the group's pin directory (flock(2)), held by
    /// whoever writes the policy. Waits at most [`LOCK_WAIT`]: a writer
    /// that stopped holding it (a suspended `ctl`) must not stall the
    /// supervisor for good. Once the owner has left and removed the pins,
    /// the processes still serving write without it.
    fn lock(&self) -> Result<Option<nix::fcntl::Flock<File>>> {
        use nix::fcntl::{Flock, FlockArg};
        let Some(dir) = &self.pin_dir else {
            return Ok(None);
        };
        let mut f = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", dir.display()), e)),
        };
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(lock)),
                Err((back, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    f = back;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(Error::io(
                        format!("locking {}", dir.display()),
                        io::Error::other(format!(
                            "another process has held the group's lock for over {LOCK_WAIT:?} (a stopped `reuseport ctl`?)"
                        )),
                    ))
                }
                Err((_, e)) => {
                    return Err(Error::io(format!("locking {}", dir.display()), e.into()))
                }
            }
        }
    }

    /// The configuration in force. (A writer rewrites a generation only
    /// after another was put in force; under the group's lock, as in
    /// [`Maps::update`], no writer runs meanwhile.)
    pub fn config(&self) -> Result<Config> {
        Ok(self.state.load(Self::config_offset(self.generation())))
    }

    /// New flows the program has recorded in the flow table
    /// (`State::flow_inserts`).
    pub fn flow_inserts(&self) -> &AtomicU64 {
        self.state.dword(std::mem::offset_of!(State, flow_inserts))
    }

    /// The plan in force: the configuration and its table.
    pub fn current_plan(&self) -> Result<Plan> {
        let g = self.generation();
        let config: Config = self.state.load(Self::config_offset(g));
        let base = Self::table_offset(g);
        let table = (0..config.table_len.min(TABLE_CAPACITY) as usize)
            .map(|i| u32::from(self.table.half(base + 2 * i).load(Ordering::Relaxed)))
            .collect();
        Ok(Plan { config, table })
    }

    /// The group's record.
    pub fn group_info(&self) -> Result<GroupInfo> {
        self.group
            .get(&0, 0)
            .map_err(|e| Error::bpf("reading the group record", e))
    }

    /// Writes the group's record.
    pub fn set_group_info(&mut self, info: &GroupInfo) -> Result<()> {
        self.group
            .set(0, info, 0)
            .map_err(|e| Error::bpf("writing the group record", e))
    }

    /// Reads the counters, summed over CPUs (one lookup: each CPU has one
    /// record of all of them).
    pub fn counters(&self) -> Result<BpfCounters> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(|e| Error::bpf("reading the program's counters", e))?;
        let read = |i: u32| -> Result<u64> {
            Ok(per_cpu
                .iter()
                .map(|c| c.values.get(i as usize).copied().unwrap_or(0))
                .sum())
        };
        let mut c = BpfCounters::zero();
        for slot in 0..MAX_WORKERS {
            c.selected[slot as usize] = read(counter::SELECTED_BASE + slot)?;
        }
        c.fallback = read(counter::FALLBACK)?;
        c.dropped = read(counter::DROPPED)?;
        c.empty_slot = read(counter::EMPTY_SLOT)?;
        c.key_unreadable = read(counter::KEY_UNREADABLE)?;
        c.short_payload = read(counter::SHORT_PAYLOAD)?;
        c.migrated = read(counter::MIGRATED)?;
        c.cookie_ok = read(counter::COOKIE_OK)?;
        c.cookie_bad = read(counter::COOKIE_BAD)?;
        c.cookie_old = read(counter::COOKIE_OLD)?;
        c.flow_hit = read(counter::FLOW_HIT)?;
        c.flow_miss = read(counter::FLOW_MISS)?;
        c.flow_full = read(counter::FLOW_FULL)?;
        c.quic_initial = read(counter::QUIC_INITIAL)?;
        c.quic_unreadable = read(counter::QUIC_UNREADABLE)?;
        Ok(c)
    }
}

/// The group record of the group pinned in `dir`, read without opening its
/// other maps (to tell whose pins they are, and whether that owner runs).
pub fn group_info_at(dir: &Path) -> Result<GroupInfo> {
    let path = dir.join(map::GROUP);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
    let map = Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {}", map::GROUP), e))?;
    let group: Array<MapData, GroupInfo> = typed(map, map::GROUP)?;
    group
        .get(&0, 0)
        .map_err(|e| Error::bpf("reading the group record", e))
}

/// Writes the record of the group pinned in `dir`.
pub fn set_group_info_at(dir: &Path, info: &GroupInfo) -> Result<()> {
    let path = dir.join(map::GROUP);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
    let map = Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {}", map::GROUP), e))?;
    let mut group: Array<MapData, GroupInfo> = typed(map, map::GROUP)?;
    group
        .set(0, info, 0)
        .map_err(|e| Error::bpf("writing the group record", e))
}

/// A handle on a group's socket map (see [`Maps::socket_map_handle`]).
pub struct SocketMapHandle(ReusePortSockArray<MapData>);

impl SocketMapHandle {
    /// Empties `slot`, as [`Maps::clear_slot`] does.
    pub fn clear_slot(&mut self, slot: u32) -> Result<()> {
        clear(&mut self.0, slot)
    }
}

fn clear(sockets: &mut ReusePortSockArray<MapData>, slot: u32) -> Result<()> {
    match sockets.clear_index(&slot) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::bpf(format!("clearing slot {slot}"), e)),
    }
}

fn typed<T>(m: Map, name: &str) -> Result<T>
where
    T: TryFrom<Map>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    T::try_from(m).map_err(|e| Error::bpf(format!("map {name}"), e))
}

fn not_found(name: &str) -> Error {
    Error::bpf(
        format!("finding map {name}"),
        io::Error::new(io::ErrorKind::NotFound, "no such map in the object"),
    )
}

fn wrong_type(name: &str) -> Error {
    Error::bpf(
        format!("map {name}"),
        io::Error::new(io::ErrorKind::InvalidData, "unexpected map type"),
    )
}

/// How long a writer waits for the group's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until every run of the program that started before now has ended:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period (a few
/// milliseconds). Kernels with `nohz_full` CPUs refuse that command; a
/// pause far longer than any run stands in.
fn wait_for_program_runs() {
    use rustix::thread::{membarrier, MembarrierCommand};
    if membarrier(MembarrierCommand::Global).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_serves_only_a_slot_still_claimed_for_its_process() {
        let me = std::process::id();
        let rec = WorkerCounters::default();
        // Not claimed: nobody serves it.
        assert!(!rec.start_serving(3, me, member_kind::OWNER, -1));
        // Claimed for this process, then given up (`ctl add-worker` timed
        // out): the owner's late start must not serve it.
        rec.set_process(me);
        assert!(slots::claim(&rec.state) && slots::abandon(&rec.state));
        assert!(!rec.start_serving(3, me, member_kind::OWNER, -1));
        assert_eq!(rec.state.load(Ordering::Relaxed), slots::EMPTY);
        // Given up and claimed again by another process: not taken over,
        // and its record is left as its claimer wrote it.
        rec.set_process(me + 1);
        rec.cpu.store(1, Ordering::Relaxed);
        assert!(slots::claim(&rec.state));
        assert!(!rec.start_serving(3, me, member_kind::OWNER, -1));
        assert_eq!(rec.state.load(Ordering::Relaxed), slots::STARTING);
        assert_eq!(rec.pid.load(Ordering::Relaxed), me + 1);
        assert_eq!(rec.cpu.load(Ordering::Relaxed), 1);
        // Its claimer serves it.
        assert!(rec.start_serving(1, me + 1, member_kind::JOINED, 9));
        assert_eq!(rec.state.load(Ordering::Relaxed), slots::SERVING);
        // A new group's own slot serves from empty, once.
        let fresh = WorkerCounters::default();
        assert!(fresh.reset(0));
        assert!(!fresh.reset(0));
    }
}
