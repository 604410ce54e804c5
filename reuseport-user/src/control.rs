//! Control of a running group from any process: its maps are pinned under
//! `/sys/fs/bpf/reuseport/netns-<INODE>/<group>/` (one directory per network
//! namespace: see [`pins`]).
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
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use log::{info, warn};
use reuseport_common::{group_flag, GroupInfo, WorkerRecord};

use crate::{
    error::{Error, Result},
    maps::{self, BpfCounters, Maps},
    pins::{self, Owner},
    policy::{self, HashKey, Policy, PolicyKind},
    slots,
    socket::Proto,
};

pub use crate::pins::release;
pub use crate::policy::policy_of;
pub use crate::slots::live_slots;

/// The default name of a group: protocol, address and port, with the
/// address's dots and colons written as `_` (bpffs reserves dots in names).
pub fn default_group_name(proto: Proto, addr: SocketAddr) -> String {
    let ip = addr.ip().to_string().replace(['.', ':'], "_");
    format!("{proto}-{ip}-{}", addr.port())
}

/// Checks that `name` can be a directory name under bpffs (bpffs
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

/// The pin directory of group `name` in the calling thread's network
/// namespace.
pub fn group_dir(name: &str) -> Result<PathBuf> {
    pins::group_dir(name)
}

/// The pin directory of the existing group `name` of this network
/// namespace; a group pinned by an older build (not per namespace) is
/// refused as one of another layout ([`Error::IncompatibleLayout`]).
pub fn existing_dir(name: &str) -> Result<PathBuf> {
    validate_name(name)?;
    let dir = group_dir(name)?;
    match check_exists(name, &dir) {
        Err(Error::NoSuchGroup { .. }) if pins::is_legacy(&pins::legacy_dir(name)) => {
            // Every build that pinned there is of an older layout: say
            // which, as for any group of another layout.
            crate::layout::check(&pins::legacy_dir(name))?;
            Err(Error::LegacyPins {
                name: name.to_string(),
                dir: pins::legacy_dir(name),
            })
        }
        r => r.map(|()| dir),
    }
}

/// Whether the owner of the group pinned in `dir` runs (see
/// [`pins::owner`]), with its group record if it could be read.
pub fn owner_of(dir: &Path) -> (Owner, Option<GroupInfo>) {
    let info = maps::group_info_at(dir).ok();
    let owner = pins::owner(dir, info.map(|i| (i.owner_pid, i.owner_start)));
    (owner, info)
}

/// Fails with [`Error::OwnerGone`] if the owner of group `name` (pinned in
/// `dir`, with record `info`) is gone.
pub fn check_alive(name: &str, dir: &Path, info: &GroupInfo) -> Result<()> {
    if pins::owner(dir, Some((info.owner_pid, info.owner_start))) == Owner::Gone {
        let (addr, proto) = addr_of(info);
        return Err(Error::OwnerGone {
            name: name.to_string(),
            pid: info.owner_pid,
            proto,
            addr,
        });
    }
    Ok(())
}

/// Fails unless the (running) owner of group `name` is in this process's
/// pid namespace: a process that names workers by pid (`join`, `adopt`,
/// `add-worker`) must share it with the owner, which checks on them by
/// that pid. Across pid namespaces the owner's pid names another process,
/// or none, so its start time does not match.
pub fn check_pid_namespace(name: &str, info: &GroupInfo) -> Result<()> {
    if pins::process_alive(info.owner_pid, info.owner_start) {
        Ok(())
    } else {
        Err(Error::OtherPidNamespace {
            name: name.to_string(),
            pid: info.owner_pid,
        })
    }
}

/// Creates the pin directory of a new group `name` on `addr`/`proto`
/// (mode 0700) and takes its owner's lock, under the namespace's start
/// lock. Dead groups on the same address, whatever their name, are
/// replaced (with a warning), and so are pins of that name whose owner is
/// gone; a group of that name whose owner runs is an error.
pub fn claim(
    start: &pins::StartLock,
    name: &str,
    addr: SocketAddr,
    proto: Proto,
) -> Result<(PathBuf, pins::OwnerLock)> {
    validate_name(name)?;
    start.make_dir()?;
    for other in pins::names_in(start.dir()) {
        let dir = start.dir().join(&other);
        if other == name {
            continue;
        }
        if crate::layout::check(&dir).is_err() {
            // Another build's: not ours to judge or to remove.
            continue;
        }
        if let (Owner::Gone, Some(info)) = owner_of(&dir) {
            if addr_of(&info) == (addr, proto) {
                warn!(
                    "removing stale pins of group {other} on {proto} {addr} left by pid {}, which is gone",
                    info.owner_pid
                );
                release_dead(start, &dir, Some(&info))?;
            }
        }
    }
    let dir = start.dir().join(name);
    if dir.exists() {
        // Another build's group: not ours to judge or to remove.
        crate::layout::check(&dir)?;
        let info = match owner_of(&dir) {
            (Owner::Alive, info) => {
                return Err(Error::GroupRunning {
                    name: name.to_string(),
                    pid: info.map_or(0, |i| i.owner_pid),
                });
            }
            (Owner::Gone, Some(info)) => {
                warn!(
                    "removing stale pins of group {name} left by pid {}, which is gone",
                    info.owner_pid
                );
                Some(info)
            }
            (Owner::Gone, None) => {
                warn!(
                    "removing unreadable stale pins of group {name} in {}",
                    dir.display()
                );
                None
            }
        };
        release_dead(start, &dir, info.as_ref())?;
    }
    pins::make_private_dir(&dir)?;
    let owner = pins::hold_owner(&dir).inspect_err(|_| {
        let _ = release(&dir);
    })?;
    Ok((dir, owner))
}

/// A dead group removed by [`Control::cleanup`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removed {
    /// The group's name.
    pub name: String,
    /// Its owner's pid, if its record could be read.
    pub owner_pid: Option<u32>,
    /// The value `net.ipv4.tcp_migrate_req` was put back to: the group (a
    /// group without a program) had set it, and its owner died before it
    /// could restore it.
    pub restored_migrate_req: Option<u32>,
    /// The group the value to put back `net.ipv4.tcp_migrate_req` to was
    /// handed to, instead of putting it back: a running group that relies
    /// on the sysctl, and puts the value back when it goes.
    pub migrate_req_left_for: Option<String>,
}

/// What became of the value of `net.ipv4.tcp_migrate_req` that a group
/// which goes had saved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MigrateReqFate {
    /// The group had saved none (or a successor took it over with it).
    Untouched,
    /// Put back to this value.
    Restored(u32),
    /// Could not be put back (the warning says why).
    Failed,
    /// Left set for this running group, which relies on it and now holds
    /// the value to put back.
    LeftFor(String),
}

/// Puts back `net.ipv4.tcp_migrate_req` for the group pinned in `leaving`
/// (namespace directory `ns`, record `info`) as it goes, unless another
/// running group of the namespace relies on the sysctl: that one is then
/// handed the value to put back, and the sysctl stays set. Call it under
/// the namespace's start lock, so that no group starts (and decides about
/// the sysctl) or goes meanwhile.
pub(crate) fn put_back_migrate_req(ns: &Path, leaving: &Path, info: &GroupInfo) -> MigrateReqFate {
    if info.migrate_req_saved == 0 || info.flags & group_flag::RETIRED != 0 {
        return MigrateReqFate::Untouched;
    }
    for other in pins::group_names_in(ns) {
        let dir = ns.join(&other);
        if dir == leaving {
            continue;
        }
        let (Owner::Alive, Some(mut record)) = owner_of(&dir) else {
            continue;
        };
        let relies = record.flags & group_flag::MIGRATE_REQ != 0
            && record.flags & group_flag::RETIRED == 0
            && record.migrate_req_saved == 0;
        if !relies {
            continue;
        }
        record.migrate_req_saved = info.migrate_req_saved;
        match maps::set_group_info_at(&dir, &record) {
            Ok(()) => {
                info!("left net.ipv4.tcp_migrate_req at 1 for group {other}, which relies on it");
                return MigrateReqFate::LeftFor(other);
            }
            Err(e) => warn!("could not hand the value of net.ipv4.tcp_migrate_req to group {other}: {e}"),
        }
    }
    let before = info.migrate_req_saved - 1;
    if crate::sys::write_migrate_req(before) {
        MigrateReqFate::Restored(before)
    } else {
        MigrateReqFate::Failed
    }
}

/// Removes the pins of a group whose owner is gone (`info`: its record, if
/// readable; `start`: the namespace's start lock, held), first putting
/// back `net.ipv4.tcp_migrate_req` if the group had set it, as its owner
/// would have on a clean exit (see [`put_back_migrate_req`]). Returns what
/// became of the sysctl.
fn release_dead(
    start: &pins::StartLock,
    dir: &Path,
    info: Option<&GroupInfo>,
) -> Result<MigrateReqFate> {
    let fate = info.map_or(MigrateReqFate::Untouched, |i| {
        put_back_migrate_req(start.dir(), dir, i)
    });
    release(dir)?;
    Ok(fate)
}

/// Removes the pins of dead group `name`, or with `None` of every dead
/// group of this network namespace; a group whose owner runs is refused.
/// Returns what was removed.
pub fn cleanup(name: Option<&str>) -> Result<Vec<Removed>> {
    crate::sys::check_bpf_privilege("removing a group's pins")?;
    // Under the start lock: a group being created has no owner lock yet.
    let start = pins::lock_namespace()?;
    let names = match name {
        Some(n) => {
            existing_dir(n)?;
            vec![n.to_string()]
        }
        None => pins::names_in(start.dir()),
    };
    let mut removed = Vec::new();
    for n in names {
        let dir = start.dir().join(&n);
        match owner_of(&dir) {
            (Owner::Alive, info) if name.is_some() => {
                return Err(Error::GroupRunning {
                    name: n,
                    pid: info.map_or(0, |i| i.owner_pid),
                })
            }
            (Owner::Alive, _) => {}
            (Owner::Gone, info) => {
                let fate = release_dead(&start, &dir, info.as_ref())?;
                removed.push(Removed {
                    name: n,
                    owner_pid: info.map(|i| i.owner_pid),
                    restored_migrate_req: match fate {
                        MigrateReqFate::Restored(before) => Some(before),
                        _ => None,
                    },
                    migrate_req_left_for: match fate {
                        MigrateReqFate::LeftFor(other) => Some(other),
                        _ => None,
                    },
                });
            }
        }
    }
    // Fails (ENOTEMPTY) while a group is left: fine.
    let _ = fs::remove_dir(start.dir());
    Ok(removed)
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
        owner_start: pins::own_start_time(),
        migrate_req_saved: 0,
        reserved: 0,
    }
}

/// A slot as `ctl status` and `stats` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStatus {
    /// The slot.
    pub slot: u32,
    /// Its worker's record.
    pub record: WorkerRecord,
    /// The program's selections of the slot.
    pub selected: u64,
}

impl SlotStatus {
    /// The slot's state.
    pub fn state(&self) -> crate::SlotState {
        crate::SlotState::from_raw(self.record.state)
    }
}

/// A snapshot of a running group.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// Removes the pins of dead group `name` (its owner was killed or
    /// crashed), or with `None` of every dead group of this network
    /// namespace; a group whose owner runs is refused
    /// ([`Error::GroupRunning`]) or, unnamed, left alone. Returns what was
    /// removed.
    pub fn cleanup(name: Option<&str>) -> Result<Vec<Removed>> {
        cleanup(name)
    }

    /// Opens group `name` of this network namespace, or, when `name` is
    /// `None`, the only one whose owner runs. Fails with
    /// [`Error::OwnerGone`] if the group's owner is gone.
    pub fn open(name: Option<&str>) -> Result<Self> {
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let ns = pins::namespace_dir()?;
                // A takeover's aside directory is a generation of a group
                // listed under its own name, not a group of its own.
                let all = pins::group_names_in(&ns);
                let (live, dead): (Vec<String>, Vec<String>) = all
                    .into_iter()
                    .partition(|n| owner_of(&ns.join(n)).0 == Owner::Alive);
                match (live.as_slice(), dead.as_slice()) {
                    ([one], _) => one.clone(),
                    ([], []) => {
                        return Err(Error::NoGroups {
                            dir: pins::shown(&ns),
                        })
                    }
                    // Opening it says whose it was and what to do.
                    ([], [one]) => one.clone(),
                    ([], _) => {
                        return Err(Error::NoLiveGroup {
                            dead: dead.join(", "),
                        })
                    }
                    _ => {
                        return Err(Error::WhichGroup {
                            names: live.join(", "),
                        })
                    }
                }
            }
        };
        let dir = existing_dir(&name)?;
        crate::sys::check_bpf_privilege("opening a group's pinned maps")?;
        let maps = Maps::from_pins(&dir).map_err(|e| explain_open(&name, e))?;
        check_alive(&name, &dir, &maps.group_info()?)?;
        Ok(Control { name, maps })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails with [`Error::OwnerGone`] once the group's owner is gone (for
    /// a handle held a while, as `stats --watch` holds it).
    pub fn check_owner(&self) -> Result<()> {
        match self.maps.pin_dir() {
            Some(dir) => check_alive(&self.name, dir, &self.maps.group_info()?),
            None => Ok(()),
        }
    }

    /// The group's maps.
    pub(crate) fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The group's maps, for writing.
    pub(crate) fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Every slot's worker record, read from the shared mapping (no
    /// syscall), as [`GroupHandle::workers`](crate::GroupHandle::workers)
    /// gives it to the owner.
    pub fn workers(&self) -> Vec<WorkerRecord> {
        self.maps.workers().snapshot()
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
            .filter(|(_, r)| r.state != slots::EMPTY || r.accepted > 0)
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

    /// The cookie minter of the socket in `slot` now (see
    /// [`crate::cookie`]): for a server that runs its own sockets in the
    /// group (`join`, `adopt`), or a client that tests the steering.
    pub fn cookie_minter(&self, slot: u32) -> Result<crate::cookie::Minter> {
        if slot >= reuseport_common::MAX_WORKERS {
            return Err(Error::NotServing {
                slot,
                state: "out of range",
            });
        }
        let secret = self.maps.config()?.cookie_secret;
        let generation = self
            .maps
            .workers()
            .slot(slot)
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        Ok(crate::cookie::Minter::new(secret, slot, generation as u16))
    }

    /// Switches the running group to policy `kind`, keeping the key, seed
    /// and weights in force unless given. The merge reads the policy in
    /// force under the group's lock and writes the result in the same
    /// locked step, so a concurrent writer cannot slip in between. Returns
    /// the policy put in force.
    pub fn switch_policy(
        &mut self,
        kind: PolicyKind,
        key: Option<HashKey>,
        seed: Option<u32>,
        weights: Option<Vec<u32>>,
    ) -> Result<Policy> {
        let info = self.maps.group_info()?;
        if info.flags & group_flag::PROGRAM == 0 {
            return Err(Error::NoProgram {
                name: self.name.clone(),
            });
        }
        let (_, proto) = addr_of(&info);
        let mut chosen = None;
        self.maps.update(|current, live| {
            let now = policy_of(&current.config);
            if kind == PolicyKind::Weighted && weights.is_none() && now.kind != kind {
                // The weights kept from an earlier `weighted` may not cover
                // workers that came since.
                if let Some(l) = live
                    .iter()
                    .find(|l| now.weights.get(l.slot as usize).copied().unwrap_or(0) == 0)
                {
                    return Err(policy::PolicyError::NoWeight { slot: l.slot }.into());
                }
            }
            let next = Policy {
                kind,
                key: key.unwrap_or(now.key),
                seed: seed.unwrap_or(now.seed),
                weights: weights.unwrap_or(now.weights),
            };
            policy::check_key(&next, proto)?;
            let plan = policy::replan(&next, live, current)?;
            chosen = Some(next);
            Ok(plan)
        })?;
        // Set by the closure, which ran (update calls it once, or fails).
        Ok(chosen.unwrap_or_else(|| Policy::new(kind)))
    }

    /// Rewrites the group's record.
    pub(crate) fn set_group_info(&mut self, info: &GroupInfo) -> Result<()> {
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
        policy::check_key(policy, proto)?;
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
        if let Some(dir) = self.maps.pin_dir() {
            check_alive(&self.name, dir, &info)?;
        }
        // Its usable CPUs are looked up by its pid.
        check_pid_namespace(&self.name, &info)?;
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
                        .filter(|r| r.state == slots::SERVING && r.cpu as usize == c)
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
                slots::SERVING => return Ok((slot, cpu)),
                slots::STARTING if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                slots::STARTING => {
                    // Unless the owner set it serving a moment ago.
                    if !slots::abandon(&self.maps.workers().slot(slot).state) {
                        continue;
                    }
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
        // The owner checks on the adopted program by the pid given here.
        check_pid_namespace(&self.name, &info)?;
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
            // Its worker is another program: the record is ours to keep,
            // with that program's pid, so the owner notices when it exits,
            // and its descriptor there, so a takeover can carry it.
            let (kind, fd) = (reuseport_common::member_kind::ADOPTED, fd);
            if !self
                .maps
                .workers()
                .slot(slot)
                .start_serving(cpu, pid, kind, fd)
            {
                return Err(Error::NotServing {
                    slot,
                    state: "taken by another worker",
                });
            }
            self.maps
                .update(|current, live| Ok(policy::rebuild(current, live)?))
        });
        if let Err(e) = placed {
            slots::release(&self.maps.workers().slot(slot).state);
            let _ = self.maps.clear_slot(slot);
            return Err(e);
        }
        Ok(slot)
    }
}

/// Checks that `socket` (descriptor `fd` of `pid`) can serve the group at
/// `addr`/`proto`: a socket, of the protocol, bound to the address with
/// `SO_REUSEPORT`, listening (TCP), and of this user.
pub(crate) fn check_adoptable(
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

/// Fails unless group `name`'s pin directory exists; one this process may
/// not even look at belongs to another user.
pub fn check_exists(name: &str, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::NotOwner {
            name: name.to_string(),
            owner: fs::metadata(pins::pin_root()).map(|m| m.uid()).unwrap_or(0),
        }),
        Err(_) => Err(Error::NoSuchGroup {
            name: name.to_string(),
            dir: pins::shown(dir),
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
        let owner = group_dir(name)
            .and_then(|d| fs::metadata(d).map_err(|e| Error::io("stat", e)))
            .map(|m| m.uid())
            .unwrap_or(0);
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
    use crate::pins::process_start_time;
    use crate::policy::LiveSlot;

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
}
