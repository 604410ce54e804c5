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
    counter, map, worker_state, Config, GroupInfo, State, Table, WorkerRecord, MAX_WORKERS,
    TABLE_CAPACITY,
};

use crate::{
    error::{Error, Result},
    policy::Plan,
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
}

const _: () = assert!(size_of::<WorkerCounters>() == size_of::<WorkerRecord>());
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
    pub fn slot(&self, slot: u32) -> &WorkerCounters {
        assert!(slot < MAX_WORKERS, "slot {slot} out of range");
        let offset = slot as usize * size_of::<WorkerCounters>();
        // SAFETY: in bounds (checked above), 8-byte aligned (page-aligned
        // base, 56-byte records), and the type is atomics only, valid for
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
        Ok(Maps {
            sockets: typed(get(map::SOCKETS)?, map::SOCKETS)?,
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
    pub fn claim_this_slot(&self, slot: u32, cpu: u32, pid: u32) -> Result<()> {
        let _lock = self.lock()?;
        let rec = self.workers.slot(slot);
        if rec.state.load(Ordering::Acquire) != worker_state::EMPTY {
            return Err(Error::NotServing {
                slot,
                state: "taken by another worker",
            });
        }
        rec.cpu.store(cpu, Ordering::Relaxed);
        rec.pid.store(pid, Ordering::Relaxed);
        rec.state.store(worker_state::STARTING, Ordering::Release);
        Ok(())
    }

    /// Takes a free slot (its record empty) for a worker of process `pid`
    /// on `cpu`, under the group's lock: marks it starting. Whoever starts
    /// the worker marks it serving ([`WorkerCounters::reset`]).
    pub fn claim_slot(&self, cpu: u32, pid: u32) -> Result<u32> {
        let _lock = self.lock()?;
        for slot in 0..MAX_WORKERS {
            let rec = self.workers.slot(slot);
            if rec.state.load(Ordering::Acquire) == worker_state::EMPTY {
                rec.cpu.store(cpu, Ordering::Relaxed);
                rec.pid.store(pid, Ordering::Relaxed);
                rec.state.store(worker_state::STARTING, Ordering::Release);
                return Ok(slot);
            }
        }
        Err(Error::NoFreeSlot { max: MAX_WORKERS })
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
        match self.sockets.clear_index(&slot) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::bpf(format!("clearing slot {slot}"), e)),
        }
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

    /// Replaces the plan in force by `next(current)`, under the group's
    /// lock, so that no other writer changes it in between.
    pub fn update(&mut self, next: impl FnOnce(&Plan) -> Result<Plan>) -> Result<()> {
        let _lock = self.lock()?;
        let current = self.current_plan()?;
        let plan = next(&current)?;
        self.write(&plan)
    }

    fn write(&mut self, plan: &Plan) -> Result<()> {
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
    /// whoever writes the policy.
    fn lock(&self) -> Result<Option<nix::fcntl::Flock<File>>> {
        let Some(dir) = &self.pin_dir else {
            return Ok(None);
        };
        let f = File::open(dir).map_err(|e| Error::io(format!("opening {}", dir.display()), e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(Some)
            .map_err(|(_, e)| Error::io(format!("locking {}", dir.display()), e.into()))
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
