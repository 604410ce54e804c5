//! Control of a running group from any process: its maps are pinned under
//! `/sys/fs/bpf/reuseport/<group>/`.
//!
//! Why pinned maps: all of a group's policy state already lives in the
//! program's maps, so pinning them makes the group controllable by any
//! process of the owner with no protocol, daemon or socket of our own, and
//! the kernel enforces who may open them (mode 0600, owner only; CAP_BPF).
//! A policy switch is the same map write the running process would do.
//! Writers take an flock(2) on the group's directory so two switches cannot
//! interleave.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use log::{info, warn};
use reuseport_common::{group_flag, key, worker_state, Config, GroupInfo, WorkerRecord};

use crate::{
    error::{Error, Result},
    maps::{BpfCounters, Maps},
    policy::{self, HashKey, LiveSlot, Policy, PolicyKind},
    socket::Proto,
};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The directory of every group's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/reuseport";

/// The default name of a group: protocol, address and port, with the
/// address's dots and colons written as `_` (bpffs reserves dots in names).
pub fn default_group_name(proto: Proto, addr: SocketAddr) -> String {
    let ip = addr.ip().to_string().replace(['.', ':'], "_");
    format!("{proto}-{ip}-{}", addr.port())
}

/// Checks that `name` can be a directory name under [`PIN_ROOT`] (bpffs
/// refuses names with a dot: `bpf_lookup()` in `kernel/bpf/inode.c`).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadGroupName {
            name: name.to_string(),
        })
    }
}

/// The pin directory of group `name`.
pub fn group_dir(name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(name)
}

fn is_bpffs(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Fails, saying what to do, unless bpffs is mounted at [`BPFFS`].
fn require_bpffs() -> Result<()> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    Err(Error::io(
        format!("pinning the group's maps under {BPFFS}"),
        std::io::Error::other(
            "bpffs is not mounted there: mount it (mount -t bpf bpf /sys/fs/bpf), let the library do it (GroupBuilder::mount_bpffs), or do not pin (GroupBuilder::pin(false))",
        ),
    ))
}

/// Mounts bpffs at [`BPFFS`] if nothing is mounted there (some systems do
/// not mount it at boot). A change to the whole system: only when asked
/// ([`crate::GroupBuilder::mount_bpffs`]).
pub fn ensure_bpffs() -> Result<()> {
    if is_bpffs(BPFFS) {
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

/// The start time of process `pid` (clock ticks after boot), if it is
/// running (a zombie, dead but not yet reaped, is not).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = crate::sys::process_stat(pid)?;
    if stat.state == 'Z' || stat.state == 'X' {
        return None;
    }
    Some(stat.starttime)
}

/// Creates the pin directory of a new group `name` (mode 0700). Pins left
/// by a process that is gone are removed, with a warning; a group whose
/// owner still runs is an error.
pub fn claim(name: &str) -> Result<PathBuf> {
    validate_name(name)?;
    require_bpffs()?;
    make_private_dir(Path::new(PIN_ROOT))?;
    let dir = group_dir(name);
    if dir.exists() {
        let owner = Maps::from_pins(&dir).and_then(|m| m.group_info()).ok();
        match owner {
            Some(info) if process_start_time(info.owner_pid) == Some(info.owner_start) => {
                return Err(Error::GroupRunning {
                    name: name.to_string(),
                    pid: info.owner_pid,
                });
            }
            Some(info) => warn!(
                "removing stale pins of group {name} left by pid {}, which is gone",
                info.owner_pid
            ),
            None => warn!(
                "removing unreadable stale pins of group {name} in {}",
                dir.display()
            ),
        }
        release(&dir)?;
    }
    make_private_dir(&dir)?;
    Ok(dir)
}

fn make_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("creating {}", dir.display()), e)),
    }?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod 0700 {}", dir.display()), e))
}

/// Removes a group's pins and its directory.
pub fn release(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        fs::remove_file(entry.path())
            .map_err(|e| Error::io(format!("removing {}", entry.path().display()), e))?;
    }
    fs::remove_dir(dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

/// Names of the groups pinned now.
pub fn groups() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(PIN_ROOT)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The group record of a group at `addr` created by this process.
pub fn group_info(addr: SocketAddr, proto: Proto, workers: u32, program: bool) -> GroupInfo {
    let pid = std::process::id();
    GroupInfo {
        addr: reuseport_common::hash::addr16(addr.ip()),
        port: addr.port().into(),
        family: if addr.is_ipv4() { 4 } else { 6 },
        protocol: match proto {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        },
        workers,
        owner_pid: pid,
        flags: if program { group_flag::PROGRAM } else { 0 },
        owner_start: process_start_time(pid).unwrap_or(0),
        migrate_req_saved: 0,
        reserved: 0,
    }
}

/// The policy a configuration record describes.
pub fn policy_of(config: &Config) -> Policy {
    let kind = PolicyKind::from_id(config.policy).unwrap_or(PolicyKind::Kernel);
    let key = match config.key {
        key::FOUR_TUPLE => HashKey::FourTuple,
        key::PAYLOAD => HashKey::Payload {
            offset: config.payload_offset as u16,
            len: config.payload_len as u8,
        },
        _ => HashKey::SrcIp,
    };
    let used = config
        .weights
        .iter()
        .rposition(|&w| w != 0)
        .map_or(0, |i| i + 1);
    Policy {
        kind,
        key,
        seed: config.seed,
        weights: config.weights[..used].to_vec(),
    }
}

/// A slot as `ctl status` and `stats` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotStatus {
    /// The slot.
    pub slot: u32,
    /// Its worker's record.
    pub record: WorkerRecord,
    /// The program's selections of the slot.
    pub selected: u64,
}

/// A snapshot of a running group.
#[derive(Clone, Debug)]
pub struct Status {
    /// The group's name.
    pub name: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Its protocol.
    pub proto: Proto,
    /// The process that runs it.
    pub owner_pid: u32,
    /// Whether the steering program is attached.
    pub steered: bool,
    /// The policy in force.
    pub policy: Policy,
    /// Slots that have (or had) a worker.
    pub slots: Vec<SlotStatus>,
    /// The program's counters.
    pub counters: BpfCounters,
}

/// A running group opened through its pins.
#[derive(Debug)]
pub struct Control {
    name: String,
    maps: Maps,
}

impl Control {
    /// Opens group `name`, or the only group pinned now when `name` is `None`.
    pub fn open(name: Option<&str>) -> Result<Self> {
        let name = match name {
            Some(n) => {
                validate_name(n)?;
                n.to_string()
            }
            None => {
                let all = groups();
                match all.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(Error::NoGroups),
                    _ => {
                        return Err(Error::WhichGroup {
                            names: all.join(", "),
                        })
                    }
                }
            }
        };
        let dir = group_dir(&name);
        check_exists(&name, &dir)?;
        crate::sys::check_bpf_privilege("opening a group's pinned maps")?;
        let maps = Maps::from_pins(&dir).map_err(|e| explain_open(&name, e))?;
        Ok(Control { name, maps })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The slots whose worker serves now, with their CPUs.
    pub fn live_slots(&self) -> Vec<LiveSlot> {
        live_slots(&self.maps.workers().snapshot())
    }

    /// A snapshot of the group.
    pub fn status(&self) -> Result<Status> {
        let info = self.maps.group_info()?;
        let config = self.maps.config()?;
        let counters = self.maps.counters()?;
        let records = self.maps.workers().snapshot();
        let slots = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state != worker_state::EMPTY || r.accepted > 0)
            .map(|(slot, r)| SlotStatus {
                slot: slot as u32,
                record: *r,
                selected: counters.selected[slot],
            })
            .collect();
        let (addr, proto) = addr_of(&info);
        Ok(Status {
            name: self.name.clone(),
            addr,
            proto,
            owner_pid: info.owner_pid,
            steered: info.flags & group_flag::PROGRAM != 0,
            policy: policy_of(&config),
            slots,
            counters,
        })
    }

    /// Rewrites the group's record.
    pub fn set_group_info(&mut self, info: &GroupInfo) -> Result<()> {
        self.maps.set_group_info(info)
    }

    /// Puts `policy` in force on the running group. Open connections are not
    /// touched; new ones follow it from now on.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        let info = self.maps.group_info()?;
        if info.flags & group_flag::PROGRAM == 0 {
            return Err(Error::NoProgram {
                name: self.name.clone(),
            });
        }
        let (_, proto) = addr_of(&info);
        crate::group::check_key(policy, proto)?;
        self.maps
            .update(|current, live| Ok(policy::replan(policy, live, current)?))
    }
}

impl Control {
    /// Asks the group's owner for one more worker on `cpu` (default: the
    /// usable CPU with the fewest serving workers) with `weight` under the
    /// `weighted` policy, and waits (at most `timeout`) until it serves.
    /// Returns its slot and CPU.
    pub fn add_worker(
        &mut self,
        cpu: Option<usize>,
        weight: u32,
        timeout: Duration,
    ) -> Result<(u32, usize)> {
        let info = self.maps.group_info()?;
        if process_start_time(info.owner_pid) != Some(info.owner_start) {
            return Err(Error::OwnerDidNot {
                what: format!("the group's owner (pid {}) is not running", info.owner_pid),
            });
        }
        let records = self.maps.workers().snapshot();
        let usable = crate::sys::usable_cpus_of(info.owner_pid)?;
        let cpu = match cpu {
            Some(c) if !usable.contains(&c) => {
                let usable: Vec<String> = usable.iter().map(usize::to_string).collect();
                return Err(Error::NoSuchCpu {
                    cpu: c,
                    usable: usable.join(","),
                });
            }
            Some(c) => c,
            None => {
                let busy = |c: usize| {
                    records
                        .iter()
                        .filter(|r| r.state == worker_state::SERVING && r.cpu as usize == c)
                        .count()
                };
                usable
                    .into_iter()
                    .min_by_key(|&c| (busy(c), c))
                    .unwrap_or(0)
            }
        };
        // The owner rebuilds the policy from the record in force: the
        // newcomer's weight is there as soon as its slot is claimed.
        let slot = self
            .maps
            .claim_slot(cpu as u32, info.owner_pid, Some(weight))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.maps.workers().slot(slot).state.load(Ordering::Acquire) {
                worker_state::SERVING => return Ok((slot, cpu)),
                worker_state::STARTING if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                worker_state::STARTING => {
                    // Unless the owner set it serving a moment ago.
                    let _ = self.maps.workers().slot(slot).state.compare_exchange(
                        worker_state::STARTING,
                        worker_state::EMPTY,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    return Err(Error::OwnerDidNot {
                        what: format!(
                            "the group's owner (pid {}) did not start worker {slot} within {timeout:?}",
                            info.owner_pid
                        ),
                    });
                }
                _ => {
                    return Err(Error::OwnerDidNot {
                        what: format!(
                            "the group's owner (pid {}) could not start worker {slot} on CPU {cpu}: see its log",
                            info.owner_pid
                        ),
                    })
                }
            }
        }
    }

    /// Drains worker `slot`: from now on the policy leaves it out and its
    /// place in the socket map is empty, so it gets no new connections; its
    /// process then closes its listener (whose queued connections move to
    /// the live workers) and lets its open connections finish.
    pub fn drain(&mut self, slot: u32) -> Result<()> {
        let steered = self.maps.group_info()?.flags & group_flag::PROGRAM != 0;
        self.maps.drain_slot(slot, steered)
    }
}

impl Control {
    /// Adopts descriptor `fd` of process `pid`, a socket that program bound
    /// with `SO_REUSEPORT` to this group's address (so the kernel already
    /// put it in the group), into `slot` (default: a free one): from now
    /// on the policy gives it its share. The program keeps serving from it
    /// unchanged; when it closes the socket, the kernel empties the slot
    /// and the group's owner takes it out of the policy. Returns the slot.
    pub fn adopt(&mut self, pid: u32, fd: i32, slot: Option<u32>) -> Result<u32> {
        let info = self.maps.group_info()?;
        if info.flags & group_flag::PROGRAM == 0 {
            return Err(Error::NoProgram {
                name: self.name.clone(),
            });
        }
        let (addr, proto) = addr_of(&info);
        let socket = crate::sys::take_fd(pid, fd)?;
        check_adoptable(&socket, pid, fd, addr, proto)?;
        let cpu = crate::sys::last_cpu(pid).unwrap_or(0);
        let slot = match slot {
            Some(s) if s >= reuseport_common::MAX_WORKERS => {
                return Err(Error::NotServing {
                    slot: s,
                    state: "out of range",
                })
            }
            Some(s) => {
                self.maps.claim_this_slot(s, cpu, pid, Some(1))?;
                s
            }
            None => self.maps.claim_slot(cpu, pid, Some(1))?,
        };
        let placed = self.maps.set_slot(slot, &socket).and_then(|()| {
            let rec = self.maps.workers().slot(slot);
            rec.reset(cpu);
            // Its worker is another program: the record is ours to keep,
            // with that program's pid, so the owner notices when it exits.
            rec.pid.store(pid, Ordering::Release);
            self.maps
                .update(|current, live| Ok(policy::rebuild(current, live)?))
        });
        if let Err(e) = placed {
            self.maps
                .workers()
                .slot(slot)
                .state
                .store(worker_state::EMPTY, Ordering::Release);
            let _ = self.maps.clear_slot(slot);
            return Err(e);
        }
        Ok(slot)
    }
}

/// Checks that `socket` (descriptor `fd` of `pid`) can serve the group at
/// `addr`/`proto`: a socket, of the protocol, bound to the address with
/// `SO_REUSEPORT`, listening (TCP), and of this user.
fn check_adoptable(
    socket: &std::os::fd::OwnedFd,
    pid: u32,
    fd: i32,
    addr: SocketAddr,
    proto: Proto,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let sock = socket2::SockRef::from(socket);
    let what = |w: String| Error::Adopt { what: w };
    let file = std::fs::File::from(socket.try_clone().map_err(|e| Error::io("dup", e))?);
    let meta = file.metadata().map_err(|e| Error::io("fstat", e))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(what(format!(
            "descriptor {fd} of process {pid} is not a socket"
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(what(format!(
            "the socket (descriptor {fd} of process {pid}) belongs to uid {}, the group to uid {me}",
            meta.uid()
        )));
    }
    let ty = sock
        .r#type()
        .map_err(|e| Error::io("getsockopt SO_TYPE", e))?;
    let want = match proto {
        Proto::Tcp => socket2::Type::STREAM,
        Proto::Udp => socket2::Type::DGRAM,
    };
    if ty != want {
        return Err(what(format!(
            "descriptor {fd} of process {pid} is not a {proto} socket: it cannot serve a {proto} group"
        )));
    }
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| what(format!("descriptor {fd} of process {pid} is not bound")))?;
    if local != addr {
        return Err(what(format!(
            "descriptor {fd} of process {pid} is bound to {local}, not to the group's {addr}: it belongs to another group"
        )));
    }
    if !sock
        .reuse_port()
        .map_err(|e| Error::io("getsockopt SO_REUSEPORT", e))?
    {
        return Err(what(format!(
            "descriptor {fd} of process {pid} was bound without SO_REUSEPORT: it is not in the group"
        )));
    }
    if proto == Proto::Tcp
        && !sock
            .is_listener()
            .map_err(|e| Error::io("getsockopt SO_ACCEPTCONN", e))?
    {
        return Err(what(format!(
            "descriptor {fd} of process {pid} is not listening"
        )));
    }
    Ok(())
}

/// A worker state's name.
pub fn state_name(state: u32) -> &'static str {
    match state {
        worker_state::SERVING => "serving",
        worker_state::DRAINING => "draining",
        worker_state::STARTING => "starting",
        _ => "gone",
    }
}

/// Slots whose record says serving, in slot order.
pub fn live_slots(records: &[WorkerRecord]) -> Vec<LiveSlot> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == worker_state::SERVING)
        .map(|(slot, r)| LiveSlot {
            slot: slot as u32,
            cpu: r.cpu,
        })
        .collect()
}

/// Fails unless group `name`'s pin directory exists; one this process may
/// not even look at belongs to another user.
pub fn check_exists(name: &str, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::NotOwner {
            name: name.to_string(),
            owner: fs::metadata(PIN_ROOT).map(|m| m.uid()).unwrap_or(0),
        }),
        Err(_) => Err(Error::NoSuchGroup {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        }),
    }
}

/// An error opening group `name`'s pins, with the reason spelled out when
/// it is that the pins belong to someone else.
pub fn explain_open(name: &str, e: Error) -> Error {
    use std::os::unix::fs::MetadataExt;
    let denied = matches!(&e, Error::Bpf { source, .. } if {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        let mut found = false;
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                found |= io.kind() == io::ErrorKind::PermissionDenied;
            }
            cause = c.source();
        }
        found || source.to_string().contains("ermission denied")
    });
    if denied {
        let owner = fs::metadata(group_dir(name)).map(|m| m.uid()).unwrap_or(0);
        return Error::NotOwner {
            name: name.to_string(),
            owner,
        };
    }
    e
}

/// The address and protocol a group record describes.
pub fn addr_of(info: &GroupInfo) -> (SocketAddr, Proto) {
    (
        SocketAddr::new(ip_of(info), info.port as u16),
        if info.protocol == 17 {
            Proto::Udp
        } else {
            Proto::Tcp
        },
    )
}

fn ip_of(info: &GroupInfo) -> IpAddr {
    let v6 = Ipv6Addr::from(info.addr);
    match (info.family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        (4, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        _ => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["tcp-127_0_0_1-7878", "udp-__1-53", "my_group", "A-1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "..", "a.b", "sp ace", "x:y", &"x".repeat(101)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        for (proto, addr) in [
            (Proto::Tcp, "127.0.0.1:7878"),
            (Proto::Udp, "[::1]:53"),
            (Proto::Tcp, "[::]:1"),
        ] {
            let name = default_group_name(proto, addr.parse().unwrap());
            assert!(validate_name(&name).is_ok(), "{name}");
        }
        assert_eq!(
            default_group_name(Proto::Tcp, "127.0.0.1:7878".parse().unwrap()),
            "tcp-127_0_0_1-7878"
        );
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn policy_round_trips_through_the_config_record() {
        let live: Vec<LiveSlot> = (0..3).map(|s| LiveSlot { slot: s, cpu: s }).collect();
        for policy in [
            Policy::new(PolicyKind::Cpu),
            Policy {
                kind: PolicyKind::Consistent,
                key: HashKey::FourTuple,
                seed: 9,
                weights: vec![],
            },
            Policy {
                kind: PolicyKind::Weighted,
                key: HashKey::SrcIp,
                seed: 0,
                weights: vec![3, 1, 2],
            },
        ] {
            let plan = policy::plan(&policy, &live).unwrap();
            assert_eq!(policy_of(&plan.config), policy);
        }
    }

    #[test]
    fn live_slots_are_the_serving_records() {
        let mut records = vec![WorkerRecord::default(); 4];
        records[0].state = worker_state::SERVING;
        records[2].state = worker_state::SERVING;
        records[2].cpu = 1;
        records[3].state = worker_state::DRAINING;
        assert_eq!(
            live_slots(&records),
            vec![LiveSlot { slot: 0, cpu: 0 }, LiveSlot { slot: 2, cpu: 1 }]
        );
    }
}
