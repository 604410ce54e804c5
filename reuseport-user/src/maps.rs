//! Typed handles on the program's maps, opened either from a freshly
//! loaded object (the process that runs the group) or from their pins under
//! bpffs (`reuseport ctl`, `reuseport stats`, a process that joins).
//!
//! All policy state is in these maps, so whoever holds them can read and
//! change the policy; nothing is kept only in the running process's memory.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, ReusePortSockArray},
    Ebpf,
};
use memmap2::{MmapMut, MmapOptions};
use reuseport_common::{
    counter, group_flag, map, worker_state, Config, GroupInfo, State, Table, WorkerRecord,
    MAX_WORKERS, TABLE_CAPACITY,
};

use crate::{
    error::{Error, Result},
    policy::{self, LiveSlot, Plan},
};

/// The maps that are pinned for other processes (the log ring buffer and
/// the ticket counter are private to the program).
pub const PINNED: [&str; 6] = [
    map::SOCKETS,
    map::STATE,
    map::TABLE,
    map::COUNTERS,
    map::WORKERS,
    map::GROUP,
];

/// The program's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Work steered to the slot and not finished (see `WorkerRecord::load`).
    pub load: AtomicU64,
    /// Connections that waited because the worker was at its limit.
    pub at_limit: AtomicU64,
    /// Unused (a record is one cache line).
    pub reserved: AtomicU64,
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
same_offset!(state, cpu, pid, queued, accepted, active, bytes, load, at_limit, reserved);
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
            load: self.load.load(Ordering::Relaxed),
            at_limit: self.at_limit.load(Ordering::Relaxed),
            reserved: 0,
        }
    }

    /// Takes one away from `load`, never below zero.
    pub fn finish_one(&self) {
        let _ = self
            .load
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Makes the record that of a new worker on `cpu` in this process.
    pub fn reset(&self, cpu: u32) {
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
        self.pid.store(std::process::id(), Ordering::Relaxed);
        self.state.store(worker_state::SERVING, Ordering::Release);
    }
}

/// The `WORKERS` records, mapped into this process (or, for a group
/// without BPF, plain anonymous memory of the same shape).
#[derive(Debug)]
pub struct WorkerRegion {
    mmap: MmapMut,
}

/// Maps `len` bytes of the memory-mappable array map whose descriptor is
/// `fd` (its elements back to back, each `value_size` rounded up to 8).
fn map_array(fd: BorrowedFd<'_>, len: usize, name: &str) -> Result<MmapMut> {
    let owned = fd
        .try_clone_to_owned()
        .map_err(|e| Error::io(format!("duplicating the {name} map descriptor"), e))?;
    let file = File::from(owned);
    // SAFETY: the map was created with BPF_F_MMAPABLE and holds at least
    // `len` bytes; the mapping stays valid after the descriptor closes. The
    // memory is shared with the program, so it is only accessed through
    // atomics or volatile reads and writes.
    unsafe { MmapOptions::new().len(len).map_mut(&file) }
        .map_err(|e| Error::io(format!("mapping the {name} map"), e))
}

impl WorkerRegion {
    const LEN: usize = MAX_WORKERS as usize * size_of::<WorkerRecord>();

    /// Maps the `WORKERS` map whose descriptor is `fd`.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Self> {
        Ok(WorkerRegion {
            mmap: map_array(fd, Self::LEN, map::WORKERS)?,
        })
    }

    /// Records in private memory, for a group that runs without BPF.
    pub fn anonymous() -> Result<Self> {
        let mmap =
            MmapMut::map_anon(Self::LEN).map_err(|e| Error::io("allocating worker records", e))?;
        Ok(WorkerRegion { mmap })
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
        // SAFETY: in bounds (checked above), 8-byte aligned (page-aligned
        // base, 64-byte records), and the type is atomics only, valid for
        // any bit pattern and for concurrent access from other processes
        // and the program.
        unsafe { &*(self.mmap.as_ptr().add(offset) as *const WorkerCounters) }
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
    state: MmapMut,
    table: MmapMut,
    counters: PerCpuArray<MapData, u64>,
    group: Array<MapData, GroupInfo>,
    workers: Arc<WorkerRegion>,
    pin_dir: Option<PathBuf>,
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
    pub fn from_ebpf(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self> {
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

    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self> {
        let mut open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
            Map::from_map_data(data).map_err(|e| Error::bpf(format!("map {name}"), e))
        };
        Self::assemble(&mut open, Some(dir))
    }

    fn assemble(get: &mut dyn FnMut(&str) -> Result<Map>, pin_dir: Option<&Path>) -> Result<Self> {
        let mut mapped = |name: &str, len: usize| -> Result<MmapMut> {
            match get(name)? {
                Map::Array(data) => map_array(data.fd().as_fd(), len, name),
                _ => Err(wrong_type(name)),
            }
        };
        let workers = WorkerRegion {
            mmap: mapped(map::WORKERS, WorkerRegion::LEN)?,
        };
        let state = mapped(map::STATE, size_of::<State>())?;
        let table = mapped(map::TABLE, 2 * size_of::<Table>())?;
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
            state,
            table,
            counters: typed(get(map::COUNTERS)?, map::COUNTERS)?,
            group: typed(get(map::GROUP)?, map::GROUP)?,
            workers: Arc::new(workers),
            pin_dir: pin_dir.map(Path::to_path_buf),
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
        let rec = self.workers.slot(slot);
        if rec.state.load(Ordering::Acquire) != worker_state::EMPTY {
            return Err(Error::NotServing {
                slot,
                state: "taken by another worker",
            });
        }
        self.give_weight(slot, weight)?;
        let rec = self.workers.slot(slot);
        rec.cpu.store(cpu, Ordering::Relaxed);
        rec.pid.store(pid, Ordering::Relaxed);
        rec.state.store(worker_state::STARTING, Ordering::Release);
        Ok(())
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
        let slot = (0..MAX_WORKERS)
            .find(|&slot| {
                self.workers.slot(slot).state.load(Ordering::Acquire) == worker_state::EMPTY
            })
            .ok_or(Error::NoFreeSlot { max: MAX_WORKERS })?;
        self.give_weight(slot, weight)?;
        let rec = self.workers.slot(slot);
        rec.cpu.store(cpu, Ordering::Relaxed);
        rec.pid.store(pid, Ordering::Relaxed);
        rec.state.store(worker_state::STARTING, Ordering::Release);
        Ok(slot)
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
        if rec.state != worker_state::SERVING {
            return Err(Error::NotServing {
                slot,
                state: crate::control::state_name(rec.state),
            });
        }
        let live: Vec<LiveSlot> = crate::control::live_slots(&records)
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
            self.clear_slot(slot)?;
        }
        self.workers
            .slot(slot)
            .state
            .store(worker_state::DRAINING, Ordering::Release);
        Ok(())
    }

    /// The workers' records.
    pub fn workers(&self) -> &Arc<WorkerRegion> {
        &self.workers
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

    fn state(&self) -> *mut State {
        self.state.as_ptr() as *mut State
    }

    /// The generation in force.
    fn generation(&self) -> u32 {
        // SAFETY: `active` is the first, 4-byte aligned field of the mapped
        // State; the program only reads it.
        let active = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.state()).active)) };
        active.load(Ordering::Acquire) & 1
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
        let live = crate::control::live_slots(&self.workers.snapshot());
        let current = self.current_plan()?;
        let plan = next(&current, &live)?;
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
        let next = self.generation() ^ 1;
        if plan.table.len() > TABLE_CAPACITY as usize {
            return Err(Error::bpf(
                "writing the policy table",
                io::Error::other("table larger than TABLE_CAPACITY"),
            ));
        }
        let table = self.table_ptr(next);
        for (i, &slot) in plan.table.iter().enumerate() {
            // SAFETY: in bounds (checked above) of generation `next`'s
            // table, which the program does not read until `active` flips.
            unsafe { std::ptr::write_volatile(table.add(i), slot as u8) };
        }
        // SAFETY: as above, for generation `next` of the configuration.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*self.state()).config[next as usize]),
                plan.config,
            )
        };
        // SAFETY: see `generation`.
        let active = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.state()).active)) };
        // Release: the writes above are visible before the flip.
        active.store(next, Ordering::Release);
        Ok(())
    }

    fn table_ptr(&self, generation: u32) -> *mut u8 {
        // SAFETY: generation is 0 or 1, and the mapping holds two tables.
        unsafe { (self.table.as_ptr() as *mut u8).add(generation as usize * size_of::<Table>()) }
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

    /// The configuration in force.
    pub fn config(&self) -> Result<Config> {
        let g = self.generation();
        // SAFETY: generation `g` is not written while it is in force.
        Ok(unsafe {
            std::ptr::read_volatile(std::ptr::addr_of!((*self.state()).config[g as usize]))
        })
    }

    /// The plan in force: the configuration and its table.
    pub fn current_plan(&self) -> Result<Plan> {
        let g = self.generation();
        let config = self.config()?;
        let table = self.table_ptr(g);
        let table = (0..config.table_len.min(TABLE_CAPACITY) as usize)
            // SAFETY: in bounds of generation `g`'s table.
            .map(|i| u32::from(unsafe { std::ptr::read_volatile(table.add(i)) }))
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

    /// Reads the counters, summed over CPUs.
    pub fn counters(&self) -> Result<BpfCounters> {
        let read = |i: u32| -> Result<u64> {
            let values = self
                .counters
                .get(&i, 0)
                .map_err(|e| Error::bpf("reading the program's counters", e))?;
            Ok(values.iter().sum())
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
        Ok(c)
    }
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
