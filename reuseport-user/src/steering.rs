//! Loading, attaching, configuring and detaching the steering program.
//!
//! The eBPF object is built by `build.rs` and embedded in this library. One
//! [`Steering`] owns one loaded copy of it: its maps (the socket map, the
//! configuration, the counters) and the program attached to one group.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    thread,
    time::Duration,
};

use aya::{
    maps::{Array, MapData, PerCpuArray, ReusePortSockArray},
    programs::{ProgramError, SkReuseport},
    Ebpf, EbpfError, EbpfLoader,
};
use log::{debug, warn};
use reuseport_common::{counter, map, Config, MAX_WORKERS, TABLE_CAPACITY};

use crate::{
    error::{Error, Result},
    policy::Plan,
};

/// The eBPF object, aligned as aya requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport-ebpf"));

/// Log target of the program's own log records (aya-log uses the eBPF
/// crate's module path).
pub const EBPF_LOG_TARGET: &str = "reuseport_ebpf";

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
    /// All-zero counters for `slots` slots (what a group without a program reports).
    pub fn zero(slots: usize) -> Self {
        BpfCounters {
            selected: vec![0; slots],
            ..Default::default()
        }
    }

    /// Runs of the program: every run ends in one selection, fallback or drop.
    pub fn runs(&self) -> u64 {
        self.selected.iter().sum::<u64>() + self.fallback + self.dropped
    }
}

/// A loaded steering program and its maps.
pub struct Steering {
    ebpf: Ebpf,
    program: String,
    sockets: ReusePortSockArray<MapData>,
    config: Array<MapData, Config>,
    active: Array<MapData, u32>,
    table: Array<MapData, u32>,
    counters: PerCpuArray<MapData, u64>,
    generation: u32,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("program", &self.program)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the object and the program named `program` (normally
    /// [`program::STEER`]) into the kernel. Nothing is attached yet.
    pub fn load(program: &str) -> Result<Self> {
        crate::sys::check_kernel("the steering program")?;
        crate::sys::check_bpf_privilege("loading the steering program")?;

        // The program's per-selection log records are compiled in but the
        // verifier prunes them unless this read-only global allows their
        // level, so they cost nothing at run time when the level is off.
        let level = ebpf_log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .map_err(|e| classify_load_error("loading the BPF object", e))?;
        spawn_log_reader(&mut ebpf);

        let prog: &mut SkReuseport = ebpf
            .program_mut(program)
            .ok_or_else(|| {
                Error::bpf(
                    format!("finding program `{program}`"),
                    io::Error::new(io::ErrorKind::NotFound, "no such program in the object"),
                )
            })?
            .try_into()
            .map_err(|e| Error::bpf(format!("program `{program}`"), e))?;
        prog.load().map_err(|e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => Error::Verifier {
                program: program.to_string(),
                source: io_error,
                log: verifier_log.to_string(),
            },
            other => Error::bpf(format!("loading program `{program}`"), other),
        })?;

        let sockets = take(&mut ebpf, map::SOCKETS)?;
        let config = take(&mut ebpf, map::CONFIG)?;
        let active = take(&mut ebpf, map::ACTIVE)?;
        let table = take(&mut ebpf, map::TABLE)?;
        let counters = take(&mut ebpf, map::COUNTERS)?;
        Ok(Steering {
            ebpf,
            program: program.to_string(),
            sockets,
            config,
            active,
            table,
            counters,
            generation: 0,
        })
    }

    fn prog(&self) -> Result<&SkReuseport> {
        self.ebpf
            .program(&self.program)
            .and_then(|p| <&SkReuseport>::try_from(p).ok())
            .ok_or_else(|| {
                Error::bpf(
                    "steering program",
                    io::Error::new(io::ErrorKind::NotFound, "program vanished"),
                )
            })
    }

    /// Attaches the program to the reuseport group of `socket`. One program
    /// serves the whole group: attaching through any member replaces the
    /// group's program (`reuseport_attach_prog()` in
    /// `net/core/sock_reuseport.c`).
    pub fn attach(&self, socket: BorrowedFd<'_>) -> Result<()> {
        self.prog()?
            .attach(socket)
            .map_err(|e| Error::bpf("attaching the program (SO_ATTACH_REUSEPORT_EBPF)", e))
    }

    /// Detaches whatever program the group of `socket` has
    /// (`SO_DETACH_REUSEPORT_BPF`). Dropping a [`Steering`] does not do this.
    pub fn detach(socket: BorrowedFd<'_>) -> Result<()> {
        SkReuseport::detach(socket)
            .map_err(|e| Error::bpf("detaching the program (SO_DETACH_REUSEPORT_BPF)", e))
    }

    /// Puts `socket` into `slot` of the socket map. The socket must already
    /// be hashed (listening, for TCP; bound, for UDP).
    pub fn set_slot(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<()> {
        self.sockets
            .set(slot, socket, 0)
            .map_err(|e| Error::bpf(format!("placing a socket in slot {slot}"), e))
    }

    /// Empties `slot`: the program stops selecting it at once.
    pub fn clear_slot(&mut self, slot: u32) -> Result<()> {
        self.sockets
            .clear_index(&slot)
            .map_err(|e| Error::bpf(format!("clearing slot {slot}"), e))
    }

    /// Puts a plan in force: writes the generation not in use, then makes it
    /// the active one with a single 4-byte write, so a concurrent run of the
    /// program sees either the old plan or the new one, never a mix.
    pub fn apply(&mut self, plan: &Plan) -> Result<()> {
        let next = self.generation ^ 1;
        let base = next * TABLE_CAPACITY;
        if plan.table.len() > TABLE_CAPACITY as usize {
            return Err(Error::bpf(
                "writing the policy table",
                io::Error::other("table larger than TABLE_CAPACITY"),
            ));
        }
        for (i, slot) in plan.table.iter().enumerate() {
            self.table
                .set(base + i as u32, slot, 0)
                .map_err(|e| Error::bpf("writing the policy table", e))?;
        }
        self.config
            .set(next, plan.config, 0)
            .map_err(|e| Error::bpf("writing the policy configuration", e))?;
        self.active
            .set(0, next, 0)
            .map_err(|e| Error::bpf("switching the policy generation", e))?;
        self.generation = next;
        Ok(())
    }

    /// The configuration in force.
    pub fn current_config(&self) -> Result<Config> {
        self.config
            .get(&self.generation, 0)
            .map_err(|e| Error::bpf("reading the policy configuration", e))
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
        let mut c = BpfCounters::zero(MAX_WORKERS as usize);
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

    /// The kernel's run-time statistics of the program: total time spent in
    /// it and number of runs. They only move while statistics are enabled
    /// (see [`enable_run_stats`]).
    pub fn run_stats(&self) -> Result<(Duration, u64)> {
        let info = self
            .prog()?
            .info()
            .map_err(|e| Error::bpf("reading the program's info", e))?;
        Ok((info.run_time(), info.run_count()))
    }
}

/// Turns on the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`)
/// for as long as the returned descriptor is open.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| Error::bpf("enabling BPF run-time statistics", e))
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let m = ebpf.take_map(name).ok_or_else(|| {
        Error::bpf(
            format!("finding map {name}"),
            io::Error::new(io::ErrorKind::NotFound, "no such map in the object"),
        )
    })?;
    T::try_from(m).map_err(|e| Error::bpf(format!("map {name}"), e))
}

/// The `aya_log_common::Level` the program may log at: the most verbose level
/// the user's logger has enabled for [`EBPF_LOG_TARGET`], or 0 (off).
fn ebpf_log_level() -> u8 {
    use log::Level;
    [
        (Level::Trace, 5u8),
        (Level::Debug, 4),
        (Level::Info, 3),
        (Level::Warn, 2),
        (Level::Error, 1),
    ]
    .into_iter()
    .find(|(l, _)| log::log_enabled!(target: EBPF_LOG_TARGET, *l))
    .map_or(0, |(_, v)| v)
}

/// Forwards the program's log records to the `log` crate from a thread of
/// its own that sleeps in poll(2) until the ring buffer has data.
fn spawn_log_reader(ebpf: &mut Ebpf) {
    if ebpf_log_level() == 0 {
        return;
    }
    let mut logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("the program's log records will not be shown: {e}");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || loop {
            let fd = logger.as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => logger.flush(),
                Err(e) => {
                    debug!("the program's log reader stopped: {e}");
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        warn!("the program's log records will not be shown: {e}");
    }
}

fn classify_load_error(context: &str, e: EbpfError) -> Error {
    if let EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }) = &e {
        if io_error.raw_os_error() == Some(libc::EPERM) {
            return Error::NoPrivilege {
                action: "creating BPF maps",
                missing: "the permission (EPERM)".into(),
            };
        }
    }
    Error::bpf(context, e)
}
