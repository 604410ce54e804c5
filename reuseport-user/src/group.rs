//! A reuseport group: the member sockets, one per worker slot, the steering
//! program attached to them, and the pinned maps that let other processes
//! see, steer and join it.
//!
//! A process holds a group in one of three roles:
//! - **owner**: it created the group (`run`): it loaded and attached the
//!   program, pinned the maps, and starts the workers `ctl add-worker` asks for;
//! - **joined**: it added sockets of its own to a running group (`join`),
//!   using the owner's program and maps;
//! - **successor**: it took the group over (`run --takeover`) with a program
//!   and maps of its own, carrying the other processes' members into them
//!   and taking the group's name at once (see `takeover`); once the old
//!   owner has drained and exited it is the owner.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use log::{info, warn};
use reuseport_common::{group_flag, member_kind, program, GroupInfo, MAX_WORKERS};
use socket2::Socket;

mod takeover;

use crate::{
    control,
    error::{Error, Result},
    maps::{BpfCounters, WorkerRegion, WorkerStats},
    objects::Object,
    policy::{self, LiveSlot, Policy, PolicyError, PolicyKind},
    signals, slots,
    socket::{self, Proto},
    steering::Steering,
    sys,
};

/// Listen backlog of each member: large, so that a burst of connections
/// waits in the kernel rather than being refused while workers catch up
/// (the kernel caps it at `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: i32 = 4096;

/// Settings of a group; see [`Group::builder`].
#[derive(Clone, Debug)]
pub struct GroupBuilder {
    addr: Option<SocketAddr>,
    proto: Proto,
    workers: Option<usize>,
    cpus: Option<Vec<usize>>,
    policy: Policy,
    backlog: i32,
    program: String,
    object: Object,
    name: Option<String>,
    pin: bool,
    takeover: Option<String>,
    mount_bpffs: bool,
    tcp_migrate_req: bool,
    flow_table_size: u32,
    flow_timeout: Duration,
}

/// One member of the group: the socket of one worker slot.
#[derive(Debug)]
pub struct Member {
    /// Slot in the socket map (also the worker's number).
    pub slot: u32,
    /// The CPU the worker of this slot runs on.
    pub cpu: usize,
    socket: Socket,
}

impl Member {
    /// A new handle (dup) of this member's socket as a std TCP listener.
    pub fn tcp_listener(&self) -> Result<std::net::TcpListener> {
        let s = self
            .socket
            .try_clone()
            .map_err(|e| Error::io("duplicating a listener", e))?;
        Ok(s.into())
    }

    /// A new handle (dup) of this member's socket as a std UDP socket.
    pub fn udp_socket(&self) -> Result<std::net::UdpSocket> {
        let s = self
            .socket
            .try_clone()
            .map_err(|e| Error::io("duplicating a UDP socket", e))?;
        Ok(s.into())
    }

    /// A new handle of this member's socket as a tokio listener. Call it
    /// inside the runtime that will serve it (normally, a current-thread
    /// runtime on a thread pinned to [`Member::cpu`]).
    pub fn tokio_tcp_listener(&self) -> Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::from_std(self.tcp_listener()?)
            .map_err(|e| Error::io("registering a listener with tokio", e))
    }

    /// A new handle of this member's socket as a tokio UDP socket (see
    /// [`Member::tokio_tcp_listener`]).
    pub fn tokio_udp_socket(&self) -> Result<tokio::net::UdpSocket> {
        tokio::net::UdpSocket::from_std(self.udp_socket()?)
            .map_err(|e| Error::io("registering a UDP socket with tokio", e))
    }
}

/// A handle on a running group's policy and counters that any thread can
/// hold (the [`Group`] itself stays with whoever closes it).
#[derive(Clone, Debug)]
pub struct GroupHandle {
    steering: Option<Arc<Mutex<Steering>>>,
    workers: Arc<WorkerRegion>,
    proto: Proto,
}

impl GroupHandle {
    /// The policy in force.
    pub fn policy(&self) -> Result<Policy> {
        match &self.steering {
            Some(s) if steered(s)? => Ok(policy::policy_of(&lock(s).maps().config()?)),
            _ => Ok(Policy::new(PolicyKind::Kernel)),
        }
    }

    /// Puts another policy in force. Open connections are not touched; new
    /// ones follow the new policy from the switch on.
    pub fn set_policy(&self, policy: &Policy) -> Result<()> {
        policy::check_key(policy, self.proto)?;
        let steering = self.steering.as_ref().ok_or(PolicyError::Kernel)?;
        if !steered(steering)? {
            return Err(PolicyError::Kernel.into());
        }
        lock(steering)
            .maps_mut()
            .update(|current, live| Ok(policy::replan(policy, live, current)?))
    }

    /// The program's counters (all zero when no program is attached).
    pub fn counters(&self) -> Result<BpfCounters> {
        match &self.steering {
            Some(s) => lock(s).maps().counters(),
            None => Ok(BpfCounters::zero()),
        }
    }

    /// Every slot's worker record: state, CPU, process, accepted, open,
    /// bytes, load.
    pub fn workers(&self) -> Vec<reuseport_common::WorkerRecord> {
        self.workers.snapshot()
    }
}

fn steered(steering: &Mutex<Steering>) -> Result<bool> {
    Ok(lock(steering).maps().group_info()?.flags & group_flag::PROGRAM != 0)
}

/// Removes a group's pins when dropped: on a clean close, and also when
/// building fails half-way or the group is dropped without `close`. Holds
/// the owner's lock (see [`pins`](crate::pins)) until then: while it is
/// held, the group is alive.
///
/// Once its maps are pinned it knows them by the `GROUP` map's id, and
/// removes the directory that holds them wherever it is now: a successor
/// swaps its own pin directory with ours at a takeover, and ours must not
/// remove the successor's. The owner's lock is on a directory inside the
/// pin directory, so it moves with it: the lock stays ours wherever the
/// swap put our pins.
#[derive(Debug)]
struct Pins {
    /// Where the pins are (as far as this process moved them).
    dir: PathBuf,
    /// The id of the pinned `GROUP` map, once pinned.
    maps: Option<u32>,
    /// The owner's lock, held (never read) while the group runs.
    _owner: Option<crate::pins::OwnerLock>,
}

impl Pins {
    /// Records the id of the `GROUP` map pinned in the directory now.
    fn remember_maps(&mut self) {
        self.maps = pinned_group_id(&self.dir);
    }

    /// The directory that holds our maps now, if any.
    fn locate(&self) -> Option<PathBuf> {
        let Some(id) = self.maps else {
            return Some(self.dir.clone());
        };
        if pinned_group_id(&self.dir) == Some(id) {
            return Some(self.dir.clone());
        }
        let siblings = std::fs::read_dir(self.dir.parent()?).ok()?;
        siblings
            .flatten()
            .map(|e| e.path())
            .find(|d| pinned_group_id(d) == Some(id))
    }
}

/// The id of the `GROUP` map pinned in `dir`, if any.
fn pinned_group_id(dir: &Path) -> Option<u32> {
    aya::maps::MapInfo::from_pin(dir.join(reuseport_common::map::GROUP))
        .ok()
        .map(|i| i.id())
}

impl Drop for Pins {
    fn drop(&mut self) {
        let Some(dir) = self.locate() else {
            return;
        };
        if let Err(e) = control::release(&dir) {
            warn!("{e}");
        }
        if let Some(ns) = dir.parent() {
            crate::pins::remove_namespace_dir_if_empty(ns);
        }
    }
}

/// How this process holds the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It created the group.
    Owner,
    /// It joined another process's group.
    Joined,
    /// It took the group over from `old_pid`, whose pins are at `old_name`.
    Successor {
        /// The previous owner.
        old_pid: u32,
        /// The group's name (the old owner's pin directory).
        old_name: String,
    },
}

/// A group of `SO_REUSEPORT` sockets on one address, steered by a policy.
#[derive(Debug)]
pub struct Group {
    name: Option<String>,
    addr: SocketAddr,
    proto: Proto,
    backlog: i32,
    cpus: Vec<usize>,
    role: Role,
    members: Vec<Member>,
    steering: Option<Arc<Mutex<Steering>>>,
    workers: Arc<WorkerRegion>,
    /// Where the maps are pinned (ours, or the owner's when joined).
    dir: Option<PathBuf>,
    // Declared last: dropped after the sockets and maps it describes.
    pins: Option<Pins>,
}

impl Group {
    /// Settings with defaults: `127.0.0.1:7878`, TCP, one worker per usable
    /// CPU, policy `cpu`, maps pinned under the default group name.
    pub fn builder() -> GroupBuilder {
        GroupBuilder {
            addr: None,
            proto: Proto::Tcp,
            workers: None,
            cpus: None,
            policy: Policy::new(PolicyKind::Cpu),
            backlog: DEFAULT_BACKLOG,
            program: program::STEER.to_string(),
            object: Object::default(),
            name: None,
            pin: true,
            takeover: None,
            mount_bpffs: false,
            tcp_migrate_req: false,
            flow_table_size: reuseport_common::flow::DEFAULT_TABLE_SIZE,
            flow_timeout: Duration::from_millis(u64::from(
                reuseport_common::flow::DEFAULT_TIMEOUT_MS,
            )),
        }
    }

    /// Joins the running group `name` (pinned by its owner) with `workers`
    /// sockets of this process, placed on `cpus` (default: the usable CPUs).
    /// Each takes a free slot; the policy is rebuilt to include them.
    pub fn join(
        name: &str,
        workers: usize,
        cpus: Option<Vec<usize>>,
        backlog: i32,
    ) -> Result<Group> {
        let dir = control::existing_dir(name)?;
        sys::check_bpf_privilege("joining a group")?;
        let steering = Steering::from_pins(&dir).map_err(|e| control::explain_open(name, e))?;
        let info = steering.maps().group_info()?;
        control::check_alive(name, &dir, &info)?;
        // The owner checks on this process's workers by its pid.
        control::check_pid_namespace(name, &info)?;
        let (addr, proto) = control::addr_of(&info);
        let cpus = match cpus {
            Some(c) if !c.is_empty() => c,
            _ => sys::usable_cpus()?,
        };
        if workers == 0 || workers > MAX_WORKERS as usize {
            return Err(Error::WorkerCount {
                requested: workers,
                max: MAX_WORKERS,
            });
        }
        let region = steering.maps().workers().clone();
        let mut group = Group {
            name: Some(name.to_string()),
            addr,
            proto,
            backlog,
            cpus: cpus.clone(),
            role: Role::Joined,
            members: Vec::new(),
            steering: Some(Arc::new(Mutex::new(steering))),
            workers: region,
            dir: Some(dir),
            pins: None,
        };
        for i in 0..workers {
            let cpu = cpus[i % cpus.len()];
            let slot = group.claim_slot(cpu)?;
            if let Err(e) = group.add_member(slot, cpu) {
                slots::release(&group.workers.slot(slot).state);
                let _ = group.close();
                return Err(e);
            }
        }
        Ok(group)
    }

    /// The group's name (that of its pin directory), if it is pinned.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Where the group's maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Where the group's maps are pinned, if they are, as an operator finds
    /// them (under `/sys/fs/bpf/reuseport`, even when this process reaches
    /// them another way because its mount namespace hides that bpffs).
    pub fn pin_dir_shown(&self) -> Option<PathBuf> {
        self.dir.as_deref().map(crate::pins::shown)
    }

    /// How this process holds the group.
    pub(crate) fn role(&self) -> &Role {
        &self.role
    }

    /// The address the group is bound to (with the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The group's protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The CPUs this group's workers are placed on.
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// This process's members, in slot order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The policy in force (read from the maps: another process may have
    /// switched it).
    pub fn policy(&self) -> Result<Policy> {
        self.handle().policy()
    }

    /// A handle on the policy and counters for other threads.
    pub fn handle(&self) -> GroupHandle {
        GroupHandle {
            steering: self.steering.clone(),
            workers: self.workers.clone(),
            proto: self.proto,
        }
    }

    /// Whether the group has a steering program (ours or the owner's).
    fn steered(&self) -> Result<bool> {
        match &self.steering {
            Some(s) => steered(s),
            None => Ok(false),
        }
    }

    /// The loaded object (or, when joined, the group's maps), or `None`
    /// when the group runs without BPF. Internal (for the benchmark).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn steering(&self) -> Option<Arc<Mutex<Steering>>> {
        self.steering_shared()
    }

    /// [`Group::steering`], inside the crate.
    pub(crate) fn steering_shared(&self) -> Option<Arc<Mutex<Steering>>> {
        self.steering.clone()
    }

    /// Every slot's worker record (this process's and others').
    pub(crate) fn worker_region(&self) -> Arc<WorkerRegion> {
        self.workers.clone()
    }

    /// The shared record of the worker of `slot`. Internal (for the
    /// benchmark).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn worker_stats(&self, slot: u32) -> WorkerStats {
        self.stats_of(slot)
    }

    /// The shared record of the worker of `slot`.
    pub(crate) fn stats_of(&self, slot: u32) -> WorkerStats {
        WorkerStats::new(self.workers.clone(), slot)
    }

    /// The cookie minter of the socket in `slot` now: the group's cookie
    /// secret, the slot and its socket's generation (see
    /// [`crate::cookie`]). A group without maps has secret 0: its cookies
    /// steer nothing.
    pub fn cookie_minter(&self, slot: u32) -> Result<crate::cookie::Minter> {
        let secret = match &self.steering {
            Some(s) => lock(s).maps().config()?.cookie_secret,
            None => 0,
        };
        let generation = self.workers.slot(slot).generation.load(Ordering::Acquire);
        // Kept within 16 bits by `WorkerCounters::next_generation`.
        Ok(crate::cookie::Minter::new(secret, slot, generation as u16))
    }

    /// Whether a successor took the group over (`run --takeover`): this
    /// process is to drain its workers and exit, leaving the program alone.
    pub(crate) fn retired(&self) -> bool {
        self.group_info()
            .is_some_and(|i| i.flags & group_flag::RETIRED != 0)
    }

    fn group_info(&self) -> Option<GroupInfo> {
        self.steering
            .as_ref()
            .and_then(|s| lock(s).maps().group_info().ok())
    }

    /// Puts another policy in force on the running group. Open connections
    /// are not touched; new ones follow the new policy from the switch on.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        self.handle().set_policy(policy)
    }

    /// Rebuilds the policy in force over the workers serving now (after one
    /// came or went). Nothing to do without a program or without workers.
    pub(crate) fn rebalance(&self) -> Result<()> {
        let Some(steering) = &self.steering else {
            return Ok(());
        };
        if !self.steered()? {
            return Ok(());
        }
        lock(steering)
            .maps_mut()
            .update(|current, live| Ok(policy::rebuild(current, live)?))
    }

    /// Takes a free slot for a worker of this process on `cpu` (weight 1
    /// under `weighted`, as `ctl add-worker` gives by default).
    fn claim_slot(&self, cpu: usize) -> Result<u32> {
        let steering = self.steering.as_ref().ok_or_else(|| {
            Error::io(
                "adding a worker",
                std::io::Error::other("the group has no maps"),
            )
        })?;
        let mut guard = lock(steering);
        guard
            .maps_mut()
            .claim_slot(cpu as u32, std::process::id(), Some(1))
    }

    /// Claims `slot` again for a worker of this process on `cpu` (to restart
    /// one that died there), unless someone else took it meanwhile.
    pub(crate) fn claim_slot_again(&self, slot: u32, cpu: usize) -> Result<()> {
        match &self.steering {
            Some(s) => {
                lock(s)
                    .maps_mut()
                    .claim_this_slot(slot, cpu as u32, std::process::id(), None)
            }
            None => Ok(()),
        }
    }

    /// Adds a member in `slot` (already claimed) with a worker on `cpu`:
    /// binds and joins its socket, places it in the socket map, marks the
    /// slot serving and rebuilds the policy to include it.
    pub(crate) fn add_member(&mut self, slot: u32, cpu: usize) -> Result<&Member> {
        let socket = socket::bind_member(self.addr, self.proto)?;
        if self.proto == Proto::Tcp {
            socket::listen(&socket, self.backlog)?;
        }
        if let Some(s) = &self.steering {
            if self.steered()? {
                lock(s).maps_mut().set_slot(slot, &socket)?;
            }
        }
        // A joined member's record names its socket: where a successor
        // finds it to carry it over.
        let (kind, fd) = match self.role {
            Role::Joined => (member_kind::JOINED, socket.as_raw_fd()),
            // A UDP owner's too: a takeover carries them, draining.
            _ if self.proto == Proto::Udp => (member_kind::OWNER, socket.as_raw_fd()),
            _ => (member_kind::OWNER, -1),
        };
        let me = std::process::id();
        if !self
            .workers
            .slot(slot)
            .start_serving(cpu as u32, me, kind, fd)
        {
            if let Some(s) = &self.steering {
                let _ = lock(s).maps_mut().clear_slot(slot);
            }
            return Err(Error::NotServing {
                slot,
                state: "given up or taken by another worker while it started",
            });
        }
        self.members.push(Member { slot, cpu, socket });
        self.members.sort_by_key(|m| m.slot);
        self.rebalance()?;
        info!("worker {slot} joined the group on CPU {cpu}");
        self.members
            .iter()
            .find(|m| m.slot == slot)
            .ok_or_else(|| Error::io("adding a worker", std::io::Error::other("member vanished")))
    }

    /// Takes `slot` out of the policy: marks it draining, empties its place
    /// in the socket map and rebuilds the policy without it. New work stops
    /// going there at once; what is already queued moves when its socket
    /// closes ([`Group::remove_member`]).
    pub(crate) fn retire_slot(&self, slot: u32) -> Result<()> {
        self.retire_slots(&[slot])
    }

    /// [`Group::retire_slot`] for several slots, with one rebuild of the
    /// policy for all.
    pub(crate) fn retire_slots(&self, slots: &[u32]) -> Result<()> {
        for &slot in slots {
            // Only a serving slot drains; one starting or gone stays so.
            crate::slots::drain(&self.workers.slot(slot).state);
        }
        if self.retired() {
            return Ok(());
        }
        match &self.steering {
            Some(s) if self.steered()? => {
                let mut s = lock(s);
                for &slot in slots {
                    if let Err(e) = s.maps_mut().clear_slot(slot) {
                        warn!("slot {slot} stays in the socket map until its socket closes: {e}");
                    }
                }
            }
            _ => {}
        }
        self.rebalance()
    }

    /// Closes this process's socket of `slot`. When it was a TCP listener
    /// the kernel hands the connections in its queues to the live members
    /// (the program is attached for `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, so
    /// it picks where). Its worker must have dropped its own handle too.
    pub(crate) fn remove_member(&mut self, slot: u32) {
        self.members.retain(|m| m.slot != slot);
    }

    /// Marks `slot`'s record empty (its worker is gone).
    pub(crate) fn release_slot(&self, slot: u32) {
        let rec = self.workers.slot(slot);
        rec.active.store(0, Ordering::Relaxed);
        rec.load.store(0, Ordering::Relaxed);
        slots::release(&rec.state);
    }

    /// Slots whose worker belongs to another process that no longer runs:
    /// marks them empty and rebuilds the policy. Returns them.
    pub(crate) fn reap_dead_workers(&self) -> Result<Vec<(u32, u32)>> {
        let me = std::process::id();
        let mut dead = Vec::new();
        for (slot, r) in self.workers.snapshot().iter().enumerate() {
            let slot = slot as u32;
            // Starting too: a `join` or `adopt` that died while claiming.
            let busy = slots::held(r.state);
            let rec = self.workers.slot(slot);
            if busy && r.pid != me && r.pid != 0 && !rec.process_alive() {
                if let Some(s) = &self.steering {
                    let _ = lock(s).maps_mut().clear_slot(slot);
                }
                self.release_slot(slot);
                dead.push((slot, r.pid));
            }
        }
        if !dead.is_empty() {
            self.rebalance()?;
        }
        Ok(dead)
    }

    /// Whether the previous owner of a group this process took over still
    /// runs, by its lock: its pins are where the takeover's swap put them
    /// (or still under the group's name, if the swap failed). False for a
    /// process that took nothing over.
    pub(crate) fn previous_owner_running(&self) -> bool {
        let Role::Successor { old_name, .. } = &self.role else {
            return false;
        };
        let Ok(final_dir) = control::group_dir(old_name) else {
            return false;
        };
        let exchanged = self.pins.as_ref().is_some_and(|p| p.dir == final_dir);
        let old_dir = match exchanged {
            true => match control::group_dir(&crate::pins::aside_name(old_name)) {
                Ok(d) => d,
                Err(_) => return false,
            },
            false => final_dir,
        };
        control::owner_of(&old_dir).0 == crate::pins::Owner::Alive
    }

    /// After a takeover: waits (at most `timeout`) for the old owner to
    /// exit, then moves this group's pins to the group's own name (unless
    /// the takeover's swap did already).
    pub(crate) fn finish_takeover(&mut self, timeout: Duration) -> Result<()> {
        let Role::Successor { old_pid, old_name } = self.role.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        while self.previous_owner_running() {
            if Instant::now() > deadline {
                warn!("the previous owner (pid {old_pid}) has not exited after {timeout:?}; taking its group's name anyway");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let final_dir = control::group_dir(&old_name)?;
        let aside = control::group_dir(&crate::pins::aside_name(&old_name))?;
        let exchanged = self.pins.as_ref().is_some_and(|p| p.dir == final_dir);
        if exchanged {
            // The previous owner's pins, swapped aside at the takeover; it
            // removes them itself as it exits, unless it was killed.
            let ours = self.pins.as_ref().and_then(|p| p.maps);
            if aside.exists()
                && pinned_group_id(&aside) != ours
                && control::owner_of(&aside).0 == crate::pins::Owner::Gone
            {
                control::release(&aside)?;
            }
        } else if let Some(mut pins) = self.pins.take() {
            // The exchange failed at the takeover: take the name now.
            if final_dir.exists() {
                control::release(&final_dir)?;
            }
            if let Err(e) = std::fs::rename(&pins.dir, &final_dir) {
                let what = format!("renaming {} to {}", pins.dir.display(), final_dir.display());
                self.pins = Some(pins);
                return Err(Error::io(what, e));
            }
            // The owner's lock moves with the directory.
            pins.dir = final_dir.clone();
            self.pins = Some(pins);
            self.dir = Some(final_dir.clone());
            if let Some(s) = &self.steering {
                lock(s).maps_mut().set_pin_dir(&final_dir);
            }
        }
        self.name = Some(old_name.clone());
        self.role = Role::Owner;
        info!("took over group {old_name} from pid {old_pid}");
        Ok(())
    }

    /// Before an owner closes: if workers of other processes serve the
    /// group too, takes this process's slots out of the policy and the
    /// socket map first, so that new connections go to them while this
    /// process's workers still accept what is queued for them. Returns how
    /// many of the others serve.
    pub(crate) fn step_aside(&self) -> Result<usize> {
        let owner = matches!(self.role, Role::Owner | Role::Successor { .. });
        if !owner || self.retired() || !self.steered()? {
            return Ok(0);
        }
        let mine: Vec<u32> = self.members.iter().map(|m| m.slot).collect();
        let others = control::live_slots(&self.workers.snapshot())
            .iter()
            .filter(|l| !mine.contains(&l.slot))
            .count();
        if others > 0 {
            self.retire_slots(&mine)?;
            info!("{others} worker(s) of other processes take this process's share of new connections");
        }
        Ok(others)
    }

    /// Stops the group's part in this process: takes this process's slots
    /// out of the policy, detaches the program (if this process owns the
    /// group, no successor took it over and no other process's workers
    /// serve it; those go on under the policy in force), closes the sockets
    /// and removes the pins. Connections still in the accept queues move to
    /// another process's members if any are left, else the kernel resets
    /// them; accepted connections are not affected.
    pub fn close(mut self) -> Result<()> {
        let retired = self.retired();
        let slots: Vec<u32> = self.members.iter().map(|m| m.slot).collect();
        if self.role == Role::Joined {
            self.retire_slots(&slots)?;
        }
        let owner = matches!(self.role, Role::Owner | Role::Successor { .. });
        if owner && !retired && self.steered()? {
            let others = control::live_slots(&self.workers.snapshot())
                .iter()
                .filter(|l| !slots.contains(&l.slot))
                .count();
            if others > 0 {
                // The program stays: it steers their connections by the
                // policy in force, and moves what waits in this process's
                // queues to them as its listeners close. With the pins gone,
                // `ctl` can no longer change it.
                warn!(
                    "{others} worker(s) of other processes go on serving {} under the policy in force",
                    self.addr
                );
            } else if let Some(first) = self.members.first() {
                Steering::detach(first.socket.as_fd())?;
                info!("detached the steering program from {}", self.addr);
            }
        }
        for &slot in &slots {
            self.release_slot(slot);
        }
        self.members.clear();
        if owner {
            self.restore_migrate_req(retired);
        }
        if let Some(pins) = self.pins.take() {
            let dir = pins.locate().unwrap_or_else(|| pins.dir.clone());
            drop(pins);
            info!("removed the pins in {}", crate::pins::shown(&dir).display());
        }
        Ok(())
    }

    /// Puts back `net.ipv4.tcp_migrate_req` if this group changed it,
    /// unless another running group relies on it (see
    /// [`control::put_back_migrate_req`]); a retired owner leaves that to
    /// its successor.
    fn restore_migrate_req(&self, retired: bool) {
        if retired || self.group_info().is_none_or(|i| i.migrate_req_saved == 0) {
            return;
        }
        // A group without pins is seen by no other, but may still leave the
        // sysctl to a pinned one that relies on it.
        let dir = self
            .pins
            .as_ref()
            .map(|p| p.locate().unwrap_or_else(|| p.dir.clone()));
        // Under the start lock, read anew: a group that went meanwhile may
        // have handed this one its value.
        let start = crate::pins::lock_namespace()
            .inspect_err(|e| warn!("{e}: putting back net.ipv4.tcp_migrate_req without it"));
        let Some(mut info) = self.group_info() else {
            return;
        };
        let ns = match &start {
            Ok(lock) => lock.dir().to_path_buf(),
            Err(_) => dir
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        control::put_back_migrate_req(&ns, dir.as_deref().unwrap_or(Path::new("")), &info);
        // Gone as far as the others can tell: none hands its value back here.
        info.flags &= !group_flag::MIGRATE_REQ;
        info.migrate_req_saved = 0;
        if let Some(s) = &self.steering {
            let _ = lock(s).maps_mut().set_group_info(&info);
        }
    }
}


impl GroupBuilder {
    /// Address and port to serve (port 0: any free port, shared by all
    /// members). Required (there is no default), except for a takeover,
    /// which serves the old group's address.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Whether to mount bpffs at `/sys/fs/bpf` when nothing is mounted
    /// there and the maps are to be pinned (default no: a mount is a change
    /// to the whole system, so [`GroupBuilder::build`] then fails and says
    /// so). The `reuseport` command line turns it on.
    pub fn mount_bpffs(mut self, mount: bool) -> Self {
        self.mount_bpffs = mount;
        self
    }

    /// Whether a group under the `kernel` policy (no program) may set the
    /// system-wide sysctl `net.ipv4.tcp_migrate_req` to 1, so that a closing
    /// listener hands its queued connections to the others rather than
    /// resetting them; the old value is put back when the group closes.
    /// Default no. (With a program, its attach type asks for migration
    /// and no sysctl is changed.) The `reuseport` command line turns it on.
    pub fn tcp_migrate_req(mut self, set: bool) -> Self {
        self.tcp_migrate_req = set;
        self
    }

    /// TCP or UDP.
    pub fn proto(mut self, proto: Proto) -> Self {
        self.proto = proto;
        self
    }

    /// Number of workers (slots); default one per usable CPU.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// CPUs to place workers on, worker `i` on `cpus[i % len]`; default the
    /// CPUs this process may run on.
    pub fn cpus(mut self, cpus: Vec<usize>) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// The steering policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Listen backlog of each member.
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// The group's name: its maps are pinned in
    /// `/sys/fs/bpf/reuseport/netns-<INODE>/<name>/` (INODE: the network
    /// namespace's). Default:
    /// `<proto>-<address>-<port>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether to pin the maps for `reuseport ctl` and `stats` (default yes).
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Takes over the running group `name` instead of creating one: binds
    /// to its address, attaches a program of our own to it, and tells the
    /// old owner to drain and exit; serving the group with a [`Server`](crate::Server)
    /// finishes the takeover once it is ready.
    pub fn takeover(mut self, name: impl Into<String>) -> Self {
        self.takeover = Some(name.into());
        self
    }

    /// UDP: how many flows the flow table remembers at once (default
    /// 65,536); past that, each new flow evicts the least recently used
    /// one; 0: no flow table (datagrams are placed one by one, and a
    /// drained worker closes at once). Fixed when the group is made; a
    /// takeover keeps its predecessor's table. See
    /// `reuseport_common::flow`.
    pub fn flow_table_size(mut self, flows: u32) -> Self {
        self.flow_table_size = flows;
        self
    }

    /// UDP: how long a flow may stay silent and keep its socket (default
    /// 30 s, at least 1 ms); also how long a draining UDP worker must have
    /// received nothing before it closes (within the drain timeout).
    pub fn flow_timeout(mut self, timeout: Duration) -> Self {
        self.flow_timeout = timeout;
        self
    }

    /// Loads another program of the object instead of the steering program
    /// (benchmarks load the cost floor; tests load one the verifier rejects).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn program(mut self, name: &str) -> Self {
        self.program = name.to_string();
        self
    }

    /// The flow table the group's object is loaded with: a UDP group's
    /// of the size asked for, or, for a takeover of a group that keeps its
    /// flows, the predecessor's own (pinned).
    fn flow_table(
        &self,
        with_program: bool,
        old: Option<&control::Control>,
        keeps_flows: bool,
    ) -> Result<crate::steering::FlowTable> {
        if self.proto != Proto::Udp || !with_program {
            return Ok(crate::steering::FlowTable {
                size: 1,
                reuse: None,
            });
        }
        if let (Some(old), true) = (old, keeps_flows) {
            let pin = old
                .maps()
                .pin_dir()
                .map(|d| d.join(reuseport_common::map::FLOWS));
            if let Some(pin) = pin.filter(|p| p.exists()) {
                let size = old.maps().config()?.flow_table_size;
                if size != self.flow_table_size {
                    info!("the takeover keeps the group's flow table ({size} flows), whatever its own size");
                }
                return Ok(crate::steering::FlowTable {
                    size,
                    reuse: Some(pin),
                });
            }
        }
        Ok(crate::steering::FlowTable {
            size: self.flow_table_size,
            reuse: None,
        })
    }

    /// Loads the programs and maps from another eBPF object than the
    /// production one (the test object of the benchmark and the tests).
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub fn object(mut self, bytes: impl Into<std::borrow::Cow<'static, [u8]>>) -> Self {
        self.object = Object::new(bytes);
        self
    }

    /// Creates the group: binds every member, loads and attaches the program,
    /// fills the socket map, puts the policy in force and pins the maps.
    pub fn build(mut self) -> Result<Group> {
        let cpus = match &self.cpus {
            Some(c) if !c.is_empty() => c.clone(),
            _ => sys::usable_cpus()?,
        };
        let n = self.workers.unwrap_or_else(|| {
            // One worker per usable CPU, up to the socket map's size; the
            // `cpu` policy gives the CPUs beyond it a worker of their own
            // cache domain or node.
            if cpus.len() > MAX_WORKERS as usize {
                warn!(
                    "{} usable CPUs but at most {MAX_WORKERS} workers a group: starting {MAX_WORKERS}; under the cpu policy the other CPUs go to workers near them",
                    cpus.len()
                );
            }
            cpus.len().min(MAX_WORKERS as usize)
        });
        if n == 0 || n > MAX_WORKERS as usize {
            return Err(Error::WorkerCount {
                requested: n,
                max: MAX_WORKERS,
            });
        }
        if let Some(name) = &self.name {
            control::validate_name(name)?;
        }
        // A takeover serves the old group's address.
        let mut old = match &self.takeover {
            Some(name) => Some(control::Control::open(Some(name))?),
            None => None,
        };
        let old_info = match &old {
            Some(c) => Some(c.maps().group_info()?),
            None => None,
        };
        if let Some(info) = &old_info {
            let (addr, proto) = control::addr_of(info);
            (self.addr, self.proto) = (Some(addr), proto);
        }
        let wanted = self.addr.ok_or(Error::NoAddress)?;
        let with_program = self.policy.kind != PolicyKind::Kernel;
        // Members of other processes keep their slots (and weights) in the
        // new generation; ours take the first slots they leave free.
        // A UDP group with a flow table: the old owner's own sockets come
        // too, draining, so that its flows keep them (see `takeover`).
        let keeps_flows = match (&old, &old_info) {
            (Some(old), Some(info)) => {
                control::addr_of(info).1 == Proto::Udp && old.maps().config()?.keeps_flows()
            }
            _ => false,
        };
        let (carried, starting) = match (&old, &old_info) {
            (Some(old), Some(info)) if with_program => takeover::collect(old, info, keeps_flows)?,
            _ => (Vec::new(), Vec::new()),
        };
        let taken: Vec<u32> = carried.iter().map(|c| c.slot).chain(starting).collect();
        let placement: Vec<LiveSlot> = (0..MAX_WORKERS)
            .filter(|s| !taken.contains(s))
            .take(n)
            .enumerate()
            .map(|(i, slot)| LiveSlot {
                slot,
                cpu: cpus[i % cpus.len()] as u32,
            })
            .collect();
        if placement.len() < n {
            return Err(Error::NoFreeSlot { max: MAX_WORKERS });
        }
        let mut live = placement.clone();
        for c in carried.iter().filter(|c| !c.draining) {
            live.push(LiveSlot {
                slot: c.slot,
                cpu: c.record.cpu,
            });
            let at = c.slot as usize;
            if self.policy.weights.len() <= at {
                self.policy.weights.resize(at + 1, 0);
            }
            if self.policy.weights[at] == 0 {
                self.policy.weights[at] = c.weight.max(1);
            }
        }
        live.sort_by_key(|l| l.slot);
        policy::check_key(&self.policy, self.proto)?;
        // Plan first: a bad policy setting fails before anything is bound.
        let mut plan = policy::plan(&self.policy, &live)?;
        let flows = self.flow_table(with_program, old.as_ref(), keeps_flows)?;
        if self.proto == Proto::Udp && with_program {
            plan.config.flow_timeout_ms =
                u32::try_from(self.flow_timeout.as_millis().max(1)).unwrap_or(u32::MAX);
            plan.config.flow_table_size = flows.size;
        }
        if let Some(old) = &old {
            // The old generation's cookies stay valid: flows its sockets
            // serve (and their clients' cookies) carry on in ours.
            plan.config.cookie_secret = old.maps().config()?.cookie_secret;
        }
        if with_program {
            sys::check_bpf_privilege("loading the steering program")?;
            crate::features::KernelFeatures::probe().require("the steering program")?;
        }
        // The maps: with a program always; under the kernel policy only if
        // we may create them (they carry the counters `stats` reads).
        let may_bpf = with_program || sys::has_bpf_privilege();
        let pinned = self.pin && may_bpf;
        // Held until our sockets are visible (listening) and our pins are
        // claimed: a start on the same address in this namespace waits
        // for it, then sees our sockets and refuses, so of two starts at
        // once exactly one succeeds. (It needs no privilege: a group
        // without pins on a fixed port takes it too. On port 0 every start
        // gets a port of its own.)
        let mut start_lock = if pinned || wanted.port() != 0 {
            Some(crate::pins::lock_namespace()?)
        } else {
            None
        };
        signals::checkpoint("locked")?;

        let first = socket::bind_member(wanted, self.proto)?;
        signals::checkpoint("bound")?;
        // Our bind succeeded, so any other socket on this address is a
        // reuseport socket of this user: a group we would silently join,
        // replacing its program. Refuse, unless taking it over is the point.
        if wanted.port() != 0 && old.is_none() {
            let ours = usize::from(self.proto == Proto::Udp);
            let count = socket::existing_members(wanted, self.proto)?.saturating_sub(ours);
            if count > 0 {
                return Err(Error::GroupExists {
                    addr: wanted,
                    proto: self.proto,
                    count,
                });
            }
        }
        let addr = first
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| Error::io("getsockname", std::io::Error::other("no address")))?;

        let name = match (&self.takeover, &self.name) {
            // Pinned aside until the old owner has gone with its pins.
            (Some(old_name), _) => crate::pins::aside_name(old_name),
            (None, Some(name)) => name.clone(),
            (None, None) => control::default_group_name(self.proto, addr),
        };
        let pins = match (&start_lock, pinned, self.pin) {
            (Some(lock), true, _) => {
                if self.mount_bpffs {
                    crate::pins::ensure_bpffs()?;
                }
                let (dir, owner) = control::claim(lock, &name, addr, self.proto)?;
                Some(Pins {
                    dir,
                    maps: None,
                    _owner: Some(owner),
                })
            }
            (_, false, true) => {
                warn!("without CAP_BPF the group's counters are not pinned: `reuseport ctl` and `stats` will not see it");
                None
            }
            _ => None,
        };
        signals::checkpoint("pinned")?;
        let steering = if may_bpf {
            let program = with_program.then_some(self.program.as_str());
            Some(Steering::load_from(
                &self.object,
                program,
                pins.as_ref().map(|p| p.dir.as_path()),
                &flows,
            )?)
        } else {
            None
        };
        let mut pins = pins;
        if let Some(p) = pins.as_mut() {
            p.remember_maps();
        }
        let workers = match &steering {
            Some(s) => s.maps().workers().clone(),
            None => Arc::new(WorkerRegion::anonymous()?),
        };
        if let Some(old) = &old {
            // Each slot's socket generations go on from the old group's:
            // a cookie minted for an old socket must not pass for the new
            // socket in its slot (new maps would start every slot at the
            // same generation again). Carried members keep theirs.
            for (slot, r) in old.maps().workers().snapshot().iter().enumerate() {
                workers
                    .slot(slot as u32)
                    .generation
                    .store(r.generation, Ordering::Release);
            }
        }
        signals::checkpoint("loaded")?;

        // Attached before any member listens, so no TCP connection is ever
        // steered by the kernel's hash instead of the policy. A UDP socket
        // receives from its bind on: a datagram that arrives before the
        // slots and the policy are written below goes by the kernel's hash
        // (counted as a fallback). A takeover attaches later, once its
        // sockets are in its map.
        let attach_now = old.is_none();
        if let Some(s) = steering.as_ref().filter(|s| s.has_program() && attach_now) {
            s.attach(first.as_fd())?;
        }
        let mut members = Vec::with_capacity(n);
        let mut first = Some(first);
        for l in &placement {
            let socket = match first.take() {
                Some(s) => s,
                None => socket::bind_member(addr, self.proto)?,
            };
            members.push(Member {
                slot: l.slot,
                cpu: l.cpu as usize,
                socket,
            });
        }
        if self.proto == Proto::Tcp {
            for m in &members {
                socket::listen(&m.socket, self.backlog)?;
            }
        }
        signals::checkpoint("listening")?;
        if let (Some(old), Some(s), true) = (&old, &steering, flows.reuse.is_some()) {
            // The old table's count of flows goes on with the table.
            let done = old.maps().flow_inserts().load(Ordering::Relaxed);
            s.maps().flow_inserts().store(done, Ordering::Relaxed);
        }
        for m in &members {
            // A new group's own maps: nobody else has a slot in them.
            if !workers.slot(m.slot).reset(m.cpu as u32) {
                return Err(Error::NotServing {
                    slot: m.slot,
                    state: "taken in a group that was just made",
                });
            }
            if self.proto == Proto::Udp {
                // Where a successor finds the socket to carry it over.
                workers
                    .slot(m.slot)
                    .set_member(member_kind::OWNER, m.socket.as_raw_fd());
            }
        }
        let mut migrate_req_saved = old_info.map_or(0, |i| i.migrate_req_saved);
        // Puts the sysctl back if the start-up stops before the group
        // record (which `close` restores it from) is written.
        let mut migrate_guard = sys::MigrateReqGuard(0);
        let relies_on_migrate_req =
            self.tcp_migrate_req && !with_program && self.proto == Proto::Tcp;
        if relies_on_migrate_req && migrate_req_saved == 0 {
            migrate_req_saved = sys::enable_migrate_req();
            migrate_guard.0 = migrate_req_saved;
        }
        signals::checkpoint("configured")?;
        let steering = match steering {
            Some(mut s) => {
                let mut info = control::group_info(addr, self.proto, n as u32, s.has_program());
                info.migrate_req_saved = migrate_req_saved;
                if relies_on_migrate_req {
                    info.flags |= group_flag::MIGRATE_REQ;
                }
                s.maps_mut().set_group_info(&info)?;
                // Our sockets are visible and our record says what we do
                // with the sysctl: another start, or a group that goes, may
                // look now.
                start_lock = None;
                if s.has_program() {
                    for m in &members {
                        s.maps_mut().set_slot(m.slot, &m.socket)?;
                    }
                    if let Some(old) = old.as_mut() {
                        // The last moment a stop undoes the takeover: after
                        // the switch the group is ours, and a stop shuts it
                        // down in order once it serves.
                        signals::checkpoint("switching")?;
                        takeover::place(old, s.maps_mut(), &carried)?;
                    }
                    let switched = s.maps_mut().apply(&plan).and_then(|()| {
                        if attach_now {
                            return Ok(());
                        }
                        // The whole group switches to our program (and so
                        // to our sockets) with this one setsockopt.
                        s.attach(members[0].socket.as_fd())
                    });
                    if let (Err(e), Some(old)) = (&switched, old.as_mut()) {
                        // The old generation keeps its members.
                        warn!("the takeover failed ({e}): the other processes' members go back to the old generation");
                        takeover::unplace(old, s.maps_mut(), &carried);
                    }
                    switched?;
                }
                Some(Arc::new(Mutex::new(s)))
            }
            None => None,
        };
        drop(start_lock);
        if old.is_none() {
            // A takeover checked before it switched the group (see above):
            // once switched, the start-up is not undone.
            signals::checkpoint("steering")?;
        }
        drop(carried);
        let mut name = name;
        let role = match (old.as_mut(), old_info, &self.takeover) {
            (Some(old), Some(info), Some(old_name)) => {
                // The group's name now means the new generation.
                // We hold our owner's lock already, and it moves with our
                // directory: the name resolves to a live owner throughout.
                if let Some(p) = pins.as_mut() {
                    let final_dir = control::group_dir(old_name)?;
                    match takeover::exchange(&p.dir, &final_dir) {
                        Ok(()) => {
                            p.dir = final_dir;
                            name = old_name.clone();
                            if let Some(s) = &steering {
                                lock(s).maps_mut().set_pin_dir(&p.dir);
                            }
                        }
                        Err(e) => warn!(
                            "{e}: the group's name moves to the new generation once the previous owner has exited"
                        ),
                    }
                }
                if let Err(e) = retire(old, &info) {
                    // Give the name back to the old generation.
                    let final_dir = control::group_dir(old_name)?;
                    let aside = control::group_dir(&crate::pins::aside_name(old_name))?;
                    if let Some(p) = pins.as_mut().filter(|p| p.dir == final_dir) {
                        if takeover::exchange(&aside, &p.dir).is_ok() {
                            p.dir = aside;
                        }
                    }
                    return Err(e);
                }
                Role::Successor {
                    old_pid: info.owner_pid,
                    old_name: old_name.clone(),
                }
            }
            _ => Role::Owner,
        };
        // From here the group's `close` restores the sysctl.
        migrate_guard.0 = 0;
        Ok(Group {
            name: pins.as_ref().map(|_| name),
            dir: pins.as_ref().map(|p| p.dir.clone()),
            addr,
            proto: self.proto,
            backlog: self.backlog,
            cpus,
            role,
            members,
            steering,
            workers,
            pins,
        })
    }
}

/// Tells the old owner of a group taken over to drain and exit: flags the
/// group retired and marks each of its serving workers draining.
fn retire(old: &mut control::Control, info: &GroupInfo) -> Result<()> {
    let mut flagged = *info;
    flagged.flags |= group_flag::RETIRED;
    let region = old.maps().workers().clone();
    for (slot, r) in region.snapshot().iter().enumerate() {
        if r.pid == info.owner_pid {
            slots::drain(&region.slot(slot as u32).state);
        }
    }
    old.set_group_info(&flagged)?;
    info!(
        "took the group's traffic over; told the previous owner (pid {}) to drain and exit",
        info.owner_pid
    );
    Ok(())
}


/// Locks the steering state; a panic while it was held cannot leave the
/// maps half-written (every write is a single syscall), so poisoning is
/// ignored.
pub fn lock(steering: &Mutex<Steering>) -> MutexGuard<'_, Steering> {
    steering.lock().unwrap_or_else(|p| p.into_inner())
}
