//! Loading, attaching, configuring and detaching the steering program.
//!
//! The eBPF object is built by `build.rs` and embedded in this library
//! (see [`objects`](crate::objects)). One
//! [`Steering`] owns one loaded copy of it: its maps (the socket map, the
//! configuration, the counters) and the program attached to one group.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    thread,
    time::Duration,
};

use aya::{
    programs::{ProgramError, SkReuseport},
    Ebpf, EbpfError, EbpfLoader,
};
use log::{debug, warn};

use crate::{
    error::{Error, Result},
    features::{Feature, KernelFeatures},
    maps::Maps,
    objects::Object,
};

/// Log target of the program's own log records (aya-log uses the eBPF
/// crate's module path).
pub const EBPF_LOG_TARGET: &str = "reuseport_ebpf";

/// Where a group's flow table (`reuseport_common::flow`) comes from.
#[derive(Clone, Debug, Default)]
pub struct FlowTable {
    /// Entries of a new table (at least 1: a TCP group's is unused).
    pub size: u32,
    /// The pin of an existing table to use instead: a takeover's
    /// predecessor's, so that the flows it knows keep their sockets.
    pub reuse: Option<std::path::PathBuf>,
}

/// A loaded steering object: its maps and, unless the group runs on the
/// kernel's hash, the steering program.
pub struct Steering {
    /// `None` when the maps were opened from pins (a process that joined).
    ebpf: Option<Ebpf>,
    program: Option<String>,
    maps: Maps,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("program", &self.program)
            .field("maps", &self.maps)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the object's maps (pinning them in `pin_dir`) and, if
    /// `program` is given (normally [`STEER`](reuseport_common::program::STEER)), that program.
    /// Nothing is attached yet.
    ///
    /// The kernel's features are probed first (see
    /// [`features`](crate::features)): a missing required one is named in
    /// the error. Without listener migration (before 5.14) the steering
    /// program is loaded as [`STEER_SELECT`](reuseport_common::program::STEER_SELECT),
    /// for selection only, and the loss is logged once.
    ///
    /// The flow table is made `flows.size` entries large, or is the one
    /// pinned at `flows.reuse` (a takeover's predecessor's).
    #[cfg(feature = "internals")]
    pub fn load(program: Option<&str>, pin_dir: Option<&Path>, flows: &FlowTable) -> Result<Self> {
        Self::load_from(&Object::default(), program, pin_dir, flows)
    }

    /// [`load`](Self::load) from another object than the production one
    /// (the benchmark's and the tests' test object, see
    /// [`objects`](crate::objects)).
    pub fn load_from(
        object: &Object,
        program: Option<&str>,
        pin_dir: Option<&Path>,
        flows: &FlowTable,
    ) -> Result<Self> {
        let mut program = program;
        if program.is_some() {
            // Privilege first: without it every probe fails, and the
            // missing capability is the error to show.
            crate::sys::check_bpf_privilege("loading the steering program")?;
            let features = KernelFeatures::probe();
            features.require("the steering program")?;
            if program == Some(reuseport_common::program::STEER)
                && !features.has(Feature::Migration)
            {
                program = Some(reuseport_common::program::STEER_SELECT);
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(
                        "this kernel lacks {} (Linux {}): steering selects only; the connections queued on a worker's listener are reset when it closes (drain, exit, restart) instead of moving to another worker",
                        Feature::Migration.name(),
                        Feature::Migration.since()
                    )
                });
            }
        } else {
            crate::sys::check_bpf_privilege("creating the group's BPF maps")?;
        }

        // The program's per-selection log records are compiled in but the
        // verifier prunes them unless this read-only global allows their
        // level, so they cost nothing at run time when the level is off.
        let level = ebpf_log_level();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &level, true)
            // An LRU map has at least one entry; a table of size 0 is off.
            .map_max_entries(reuseport_common::map::FLOWS, flows.size.max(1));
        if let Some(path) = &flows.reuse {
            // Opens the map pinned there (aya creates and pins one only if
            // none is: the caller checked it is).
            loader.map_pin_path(reuseport_common::map::FLOWS, path.as_path());
        }
        let mut ebpf = loader
            .load(object.bytes())
            .map_err(|e| classify_load_error("loading the BPF object", e))?;

        if let Some(program) = program {
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
        }
        let maps = Maps::from_ebpf(&mut ebpf, pin_dir)?;
        Ok(Steering {
            ebpf: Some(ebpf),
            program: program.map(str::to_string),
            maps,
        })
    }

    /// The maps of a running group, opened from its pins in `dir`, without
    /// a program of our own (the group's owner attached one for all).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        Ok(Steering {
            ebpf: None,
            program: None,
            maps: Maps::from_pins(dir)?,
        })
    }

    /// Whether a program is loaded (not the case under the `kernel` policy).
    pub fn has_program(&self) -> bool {
        self.program.is_some()
    }

    /// The maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps, for writing.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    fn prog(&self) -> Result<&SkReuseport> {
        self.program
            .as_deref()
            .and_then(|name| self.ebpf.as_ref()?.program(name))
            .and_then(|p| <&SkReuseport>::try_from(p).ok())
            .ok_or_else(|| {
                Error::bpf(
                    "steering program",
                    io::Error::new(io::ErrorKind::NotFound, "no program loaded"),
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
