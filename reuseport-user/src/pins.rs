//! Where a group's pins live, and whether the process that owns them runs.
//!
//! **Identity.** A group is (network namespace, protocol, address, port):
//! the kernel keeps one reuseport group per address and port in each
//! network namespace. bpffs, however, is one file system for every
//! namespace that mounts the same instance (a container runtime that
//! bind-mounts the host's `/sys/fs/bpf`, a shell entered with `nsenter
//! --net`), so the pins of two unrelated groups on `127.0.0.1:7100` in two
//! namespaces would collide if they were named after the address alone.
//! Each namespace therefore has a directory of its own,
//! `/sys/fs/bpf/reuseport/netns-<INODE>/`, where INODE is the inode number
//! of the namespace (what `readlink /proc/PID/ns/net` and `lsns -t net`
//! show), and a group's maps are pinned in `netns-<INODE>/<NAME>/`. A
//! process sees the groups of its own network namespace.
//!
//! A namespace's inode number can be given to a new namespace once the old
//! one is gone; its directory may then still hold the pins of a group
//! whose owner died with it. Such a group is dead (below), so the new
//! namespace's first `run` on that address replaces it, and `ctl`/`stats`
//! never pick it by default.
//!
//! **Liveness.** The owner of a group holds a shared `flock(2)` on the
//! group's `owner` directory for as long as it runs. The kernel drops the
//! lock when the last descriptor of it closes, whatever ended the process
//! (`kill -9` included), so a checker that can take it exclusively knows
//! the owner is gone. Unlike a pid, the lock cannot be confused with a
//! later process that reused the pid, and it reads the same from every pid
//! namespace. Pins without an `owner` directory (an older build's) fall
//! back to the owner's pid and start time from the group record.
//! Worker processes (joined, adopted) are told apart by pid and start
//! time: see [`process_alive`].

use std::{
    fs::{self, File},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use log::info;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::error::{Error, Result};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The directory of every namespace's groups.
pub const PIN_ROOT: &str = "/sys/fs/bpf/reuseport";
/// The directory in a group's pin directory whose lock says the owner runs.
const OWNER: &str = "owner";
/// How long a start waits for another start in the same namespace.
const START_WAIT: Duration = Duration::from_secs(30);

/// The network namespace of the calling thread: the inode number of its
/// nsfs file. (A thread may have its own: the tests' threads do.)
pub fn netns() -> Result<u64> {
    fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|e| Error::io("reading /proc/thread-self/ns/net", e))
}

/// The directory of the calling thread's network namespace's groups.
pub fn namespace_dir() -> Result<PathBuf> {
    Ok(pin_root().join(format!("netns-{}", netns()?)))
}

/// The pin directory of group `name` of the calling thread's network
/// namespace.
pub fn group_dir(name: &str) -> Result<PathBuf> {
    Ok(namespace_dir()?.join(name))
}

/// The name under which a successor of group `name` (`run --takeover`,
/// this process) pins its maps until they take the group's name; after
/// the takeover swaps the two directories, the previous owner's pins are
/// there while it drains. Such a directory is a generation of group
/// `name`, not a group of its own: it is not picked as the default group
/// (see [`is_aside`]).
pub fn aside_name(name: &str) -> String {
    format!("{name}-next-{}", std::process::id())
}

/// The group name whose aside name `name` is (see [`aside_name`]), if it
/// is one: `NAME-next-PID`.
pub fn is_aside(name: &str) -> Option<&str> {
    let (base, pid) = name.rsplit_once("-next-")?;
    (!base.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

/// Where a build without per-namespace directories pinned group `name`.
pub fn legacy_dir(name: &str) -> PathBuf {
    pin_root().join(name)
}

/// Whether `dir` holds the pins of a group made by a build without
/// per-namespace directories (its maps are pinned right in it).
pub fn is_legacy(dir: &Path) -> bool {
    dir.join(reuseport_common::map::SOCKETS).exists()
}

/// The start time of process `pid` (clock ticks after boot), if it is
/// running (a zombie, dead but not yet reaped, is not). Pids are those of
/// the caller's pid namespace.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = crate::sys::process_stat(pid)?;
    if matches!(stat.state, 'Z' | 'X') {
        return None;
    }
    Some(stat.starttime)
}

/// This process's start time (0 if /proc cannot say).
pub fn own_start_time() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| process_start_time(std::process::id()).unwrap_or(0))
}

/// Whether process `pid`, started at `start` (clock ticks after boot, as
/// [`process_start_time`] reads it), still runs. A pid alone could name a
/// later process that was given the same number; with its start time it
/// cannot. `start` 0 means unknown: the pid alone decides.
pub fn process_alive(pid: u32, start: u64) -> bool {
    pid != 0
        && match process_start_time(pid) {
            Some(s) => start == 0 || s == start,
            None => false,
        }
}

/// What is known of a group's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// It runs.
    Alive,
    /// It is gone: nothing will remove the group's pins but `cleanup` or
    /// the next `run` on the address.
    Gone,
}

/// Whether the owner of the group pinned in `dir` runs: by its lock, or,
/// for pins without one, by `fallback` (the owner's pid and start time
/// from the group record, if readable).
pub fn owner(dir: &Path, fallback: Option<(u32, u64)>) -> Owner {
    let by_pid = || match fallback {
        Some((pid, start)) if process_alive(pid, start) => Owner::Alive,
        _ => Owner::Gone,
    };
    let file = match File::open(dir.join(OWNER)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return by_pid(),
        // Not ours to look at (another user's group): the caller reports
        // that when it opens the maps.
        Err(_) => return Owner::Alive,
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        // Nobody holds it; dropping the guard lets it go again at once.
        Ok(_free) => Owner::Gone,
        Err((_, Errno::EWOULDBLOCK)) => Owner::Alive,
        Err(_) => by_pid(),
    }
}

/// The owner's hold on its group: while it is held, the group is alive.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: Flock<File>,
}

/// Takes the owner's lock of the group pinned in `dir` (creating its
/// `owner` directory). Held until the returned guard is dropped or the
/// process ends.
pub fn hold_owner(dir: &Path) -> Result<OwnerLock> {
    let path = dir.join(OWNER);
    make_private_dir(&path)?;
    // std opens with O_CLOEXEC: a program this process executes does not
    // keep the group alive.
    let mut file =
        File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // Shared, so that a checker's exclusive attempt fails; a checker holds
    // it exclusively for a moment only, hence the short wait.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(lock) => return Ok(OwnerLock { _lock: lock }),
            Err((back, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((_, e)) => return Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }
}

/// The lock that serialises starts in one network namespace: a start holds
/// it from before its first socket is bound until its sockets are visible
/// (listening) and its pins are claimed, so of two starts on one address
/// the second sees the first's sockets and refuses, and of two claims of
/// one name the second sees the first's pins.
///
/// It is an abstract unix socket bound to [`START_LOCK_NAME`]: abstract
/// names belong to the network namespace (`unix_find_abstract()` in
/// `net/unix/af_unix.c` looks them up in the caller's), binding one that is
/// taken fails with `EADDRINUSE`, no file permission applies (a start by
/// another user, which the kernel will refuse the port anyway, gets that
/// error rather than one about bpffs), and the name is free again the
/// moment the socket closes, however the process ended.
#[derive(Debug)]
pub struct StartLock {
    dir: PathBuf,
    _socket: std::os::unix::net::UnixDatagram,
}

/// The abstract socket name of the [`StartLock`].
pub const START_LOCK_NAME: &[u8] = b"reuseport/start";

impl StartLock {
    /// The namespace's pin directory (it may not exist yet).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the namespace's pin directory if needed. bpffs must be
    /// mounted already (or reached as [`pin_root`] says): mounting it is a
    /// change to the whole system, made only when asked ([`ensure_bpffs`],
    /// [`crate::GroupBuilder::mount_bpffs`]).
    pub fn make_dir(&self) -> Result<()> {
        require_bpffs()?;
        make_private_dir(pin_root())?;
        make_private_dir(&self.dir)
    }
}

fn try_start_lock() -> io::Result<Option<std::os::unix::net::UnixDatagram>> {
    use std::os::{linux::net::SocketAddrExt, unix::net};
    let addr = net::SocketAddr::from_abstract_name(START_LOCK_NAME)?;
    match net::UnixDatagram::bind_addr(&addr) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes the calling thread's network namespace's [`StartLock`], waiting
/// (at most 30 s) for another start to finish.
pub fn lock_namespace() -> Result<StartLock> {
    let dir = namespace_dir()?;
    let deadline = Instant::now() + START_WAIT;
    loop {
        match try_start_lock() {
            Ok(Some(socket)) => {
                return Ok(StartLock {
                    dir,
                    _socket: socket,
                })
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                return Err(Error::io(
                    "waiting for another start in this network namespace",
                    io::Error::other(format!(
                        "it has held the start lock (abstract socket @reuseport/start) for over {START_WAIT:?}"
                    )),
                ))
            }
            Err(e) => return Err(Error::io("binding the start lock's abstract socket", e)),
        }
    }
}

/// Removes namespace directory `dir` if no group is left in it and no
/// start is under way (one would hold the start lock).
pub fn remove_namespace_dir_if_empty(dir: &Path) {
    if let Ok(Some(_lock)) = try_start_lock() {
        // Fails (ENOTEMPTY) while a group is pinned in it: fine.
        let _ = fs::remove_dir(dir);
    }
}

fn is_bpffs(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The directory of every namespace's groups as this process reaches it:
/// [`PIN_ROOT`], unless this mount namespace hides the host's bpffs.
///
/// `ip netns exec` is the common case: it enters a new mount namespace and
/// mounts a fresh sysfs over `/sys` (`netns_switch()` in iproute2's
/// `lib/namespace.c`), which hides `/sys/fs/bpf`. A bpffs mounted there
/// anew would be an empty instance of its own, so `ctl` in one `ip netns
/// exec` would not see the group that `run` in another made; and the
/// kernel refuses to bind-mount the host's from another mount namespace
/// (`EINVAL`). Its files can still be reached through
/// `/proc/PID/root` of a process in the mount namespace that has it: the
/// nearest ancestor in another mount namespace, or init. This process opens
/// that directory once and keeps the descriptor, and reaches the pins as
/// `/proc/self/fd/N/reuseport` (which stays valid when that ancestor
/// exits). A container's own processes and its init share its mount
/// namespace, so nothing outside a container is reached this way.
pub fn pin_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if is_bpffs(BPFFS) {
            return PathBuf::from(PIN_ROOT);
        }
        match host_bpffs() {
            Some((pid, dir)) => {
                use std::os::fd::IntoRawFd;
                // Kept open for the life of the process (close-on-exec).
                let fd = dir.into_raw_fd();
                log::debug!(
                    "this mount namespace hides {BPFFS}: using the one process {pid} sees (through descriptor {fd})"
                );
                PathBuf::from(format!("/proc/self/fd/{fd}/reuseport"))
            }
            None => PathBuf::from(PIN_ROOT),
        }
    })
}

/// `path` as an operator finds it: under [`PIN_ROOT`] (it may be reached
/// another way, see [`pin_root`]).
pub fn shown(path: &Path) -> PathBuf {
    match path.strip_prefix(pin_root()) {
        Ok(rest) => Path::new(PIN_ROOT).join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// The bpffs of the nearest ancestor (or of init) in another mount
/// namespace, opened, with that process's pid.
fn host_bpffs() -> Option<(u32, File)> {
    let mine = fs::metadata("/proc/self/ns/mnt").ok()?.ino();
    let parent = |pid: u32| -> Option<u32> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()
    };
    let mut candidates = Vec::new();
    let mut pid = std::process::id();
    // Bounded: a process tree is not this deep.
    for _ in 0..64 {
        match parent(pid) {
            Some(p) if p > 0 => {
                candidates.push(p);
                pid = p;
            }
            _ => break,
        }
    }
    candidates.push(1);
    candidates.into_iter().find_map(|p| {
        let ns = fs::metadata(format!("/proc/{p}/ns/mnt")).ok()?.ino();
        let path = format!("/proc/{p}/root{BPFFS}");
        if ns == mine || !is_bpffs(&path) {
            return None;
        }
        File::open(&path).ok().map(|f| (p, f))
    })
}

/// Fails, saying what to do, unless bpffs is mounted at [`BPFFS`] or
/// reached otherwise (see [`pin_root`]).
fn require_bpffs() -> Result<()> {
    if is_bpffs(BPFFS) || pin_root() != Path::new(PIN_ROOT) {
        return Ok(());
    }
    Err(Error::io(
        format!("pinning the group's maps under {BPFFS}"),
        io::Error::other(
            "bpffs is not mounted there: mount it (mount -t bpf bpf /sys/fs/bpf), let the library do it (GroupBuilder::mount_bpffs), or do not pin (GroupBuilder::pin(false))",
        ),
    ))
}

/// Mounts bpffs at [`BPFFS`] if nothing is mounted there (some systems do
/// not mount it at boot) and no host's bpffs is reached otherwise (see
/// [`pin_root`]). A change to the whole system: only when asked
/// ([`crate::GroupBuilder::mount_bpffs`]).
pub fn ensure_bpffs() -> Result<()> {
    if is_bpffs(BPFFS) || pin_root() != Path::new(PIN_ROOT) {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).map_err(|e| Error::io(format!("creating {BPFFS}"), e))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::io(format!("mounting bpffs at {BPFFS}"), e.into()))?;
    info!("mounted bpffs at {BPFFS} (it was not mounted) to pin the group's maps");
    Ok(())
}

/// Creates `dir` with mode 0700 (the owner only) if it does not exist
/// (the umask cannot widen it: the mode is set again). An existing
/// directory is left as it is.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod 0700 {}", dir.display()), e)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("creating {}", dir.display()), e)),
    }
}

/// Removes a group's pins, its `owner` directory and its directory.
pub fn release(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}

/// Names of the groups pinned in namespace directory `dir`, alive or
/// not, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Names of the groups pinned in namespace directory `dir`, as a user
/// names them: like [`names_in`], without the aside directories of a
/// takeover under way (`NAME-next-PID`, see [`aside_name`]) whose group
/// `NAME` is pinned too. During a takeover the group is one group, with
/// two generations, whichever of the two directories holds which.
pub fn group_names_in(dir: &Path) -> Vec<String> {
    let all = names_in(dir);
    all.iter()
        .filter(|n| !is_aside(n).is_some_and(|base| all.iter().any(|m| m == base)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let start = own_start_time();
        assert!(start > 0);
        assert!(process_alive(me, start));
        assert!(process_alive(me, 0), "unknown start: the pid decides");
        // Same pid, another start time: a later process with our number.
        assert!(!process_alive(me, start + 1));
        assert!(!process_alive(u32::MAX, 0));
        assert!(!process_alive(0, 0));
    }

    #[test]
    fn aside_names_are_told_from_group_names() {
        let aside = aside_name("tcp-127_0_0_1-7100");
        assert_eq!(is_aside(&aside), Some("tcp-127_0_0_1-7100"));
        assert_eq!(is_aside("tcp-127_0_0_1-7100"), None);
        assert_eq!(is_aside("a-next-"), None);
        assert_eq!(is_aside("-next-12"), None);
        assert_eq!(is_aside("a-next-1x"), None);
        assert_eq!(is_aside("a-next-b-next-12"), Some("a-next-b"));
    }

    #[test]
    fn the_namespace_is_in_the_path() {
        let ns = netns().unwrap();
        let dir = group_dir("g").unwrap();
        assert_eq!(dir, pin_root().join(format!("netns-{ns}")).join("g"));
    }
}
