//! A reuseport group: the member sockets, one per worker slot, the steering
//! program attached to them, and the pinned maps that let other processes
//! see and steer it.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use log::{info, warn};
use reuseport_common::{program, worker_state, MAX_WORKERS};
use socket2::Socket;

use crate::{
    control,
    error::{Error, Result},
    maps::{BpfCounters, WorkerRegion, WorkerStats},
    policy::{self, HashKey, LiveSlot, Policy, PolicyError, PolicyKind},
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
    addr: SocketAddr,
    proto: Proto,
    workers: Option<usize>,
    cpus: Option<Vec<usize>>,
    policy: Policy,
    backlog: i32,
    program: String,
    name: Option<String>,
    pin: bool,
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
}

/// Removes a group's pins when dropped: on a clean close, and also when
/// building fails half-way or the group is dropped without `close`.
#[derive(Debug)]
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = control::release(&self.0) {
            warn!("{e}");
        }
    }
}

/// A group of `SO_REUSEPORT` sockets on one address, steered by a policy.
#[derive(Debug)]
pub struct Group {
    name: Option<String>,
    addr: SocketAddr,
    proto: Proto,
    members: Vec<Member>,
    steering: Option<Arc<Mutex<Steering>>>,
    workers: Arc<WorkerRegion>,
    // Declared last: dropped after the sockets and maps it describes.
    pins: Option<Pins>,
}

impl Group {
    /// Settings with defaults: `127.0.0.1:7878`, TCP, one worker per usable
    /// CPU, policy `cpu`, maps pinned under the default group name.
    pub fn builder() -> GroupBuilder {
        GroupBuilder {
            addr: SocketAddr::from(([127, 0, 0, 1], 7878)),
            proto: Proto::Tcp,
            workers: None,
            cpus: None,
            policy: Policy::new(PolicyKind::Cpu),
            backlog: DEFAULT_BACKLOG,
            program: program::STEER.to_string(),
            name: None,
            pin: true,
        }
    }

    /// The group's name (that of its pin directory), if it is pinned.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Where the group's maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.0.as_path())
    }

    /// The address the group is bound to (with the real port if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The group's protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The members, in slot order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The policy in force (read from the maps: another process may have
    /// switched it).
    pub fn policy(&self) -> Result<Policy> {
        match &self.steering {
            Some(s) if lock(s).has_program() => Ok(control::policy_of(&lock(s).maps().config()?)),
            _ => Ok(Policy::new(PolicyKind::Kernel)),
        }
    }

    /// The loaded object, or `None` when the group runs without BPF.
    pub fn steering(&self) -> Option<Arc<Mutex<Steering>>> {
        self.steering.clone()
    }

    /// The shared record of the worker of `slot`.
    pub fn worker_stats(&self, slot: u32) -> WorkerStats {
        WorkerStats::new(self.workers.clone(), slot)
    }

    /// The program's counters (all zero when no program is attached).
    pub fn bpf_counters(&self) -> Result<BpfCounters> {
        match &self.steering {
            Some(s) => lock(s).maps().counters(),
            None => Ok(BpfCounters::zero()),
        }
    }

    /// Puts another policy in force on the running group. Open connections
    /// are not touched; new ones follow the new policy from the switch on.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        check_key(policy, self.proto)?;
        let steering = self.steering.as_ref().ok_or(PolicyError::Kernel)?;
        let mut steering = lock(steering);
        if !steering.has_program() {
            return Err(PolicyError::Kernel.into());
        }
        let live = control::live_slots(&self.workers.snapshot());
        steering
            .maps_mut()
            .update(|current| Ok(policy::replan(policy, &live, current)?))
    }

    /// Detaches the program, closes every member socket and removes the
    /// pins. Connections still waiting in the accept queues are reset by
    /// the kernel; accepted connections are not affected. The port is free
    /// once no other handle of the sockets is open.
    pub fn close(mut self) -> Result<()> {
        if let Some(s) = &self.steering {
            if lock(s).has_program() {
                if let Some(first) = self.members.first() {
                    Steering::detach(first.socket.as_fd())?;
                    info!("detached the steering program from {}", self.addr);
                }
            }
        }
        for m in &self.members {
            self.workers
                .slot(m.slot)
                .state
                .store(worker_state::EMPTY, std::sync::atomic::Ordering::Release);
        }
        self.members.clear();
        if let Some(pins) = self.pins.take() {
            let dir = pins.0.clone();
            drop(pins);
            info!("removed the pins in {}", dir.display());
        }
        Ok(())
    }
}

impl GroupBuilder {
    /// Address and port to serve (port 0: any free port, shared by all members).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
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
    /// `/sys/fs/bpf/reuseport/<name>/`. Default: `<proto>-<address>-<port>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Whether to pin the maps for `reuseport ctl` and `stats` (default yes).
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Loads another program of the object instead of the steering program
    /// (benchmarks load the cost floor; tests load one the verifier rejects).
    #[doc(hidden)]
    pub fn program(mut self, name: &str) -> Self {
        self.program = name.to_string();
        self
    }

    /// Creates the group: binds every member, loads and attaches the program,
    /// fills the socket map, puts the policy in force and pins the maps.
    pub fn build(self) -> Result<Group> {
        let cpus = match &self.cpus {
            Some(c) if !c.is_empty() => c.clone(),
            _ => sys::usable_cpus()?,
        };
        let n = self.workers.unwrap_or(cpus.len());
        if n == 0 || n > MAX_WORKERS as usize {
            return Err(Error::WorkerCount {
                requested: n,
                max: MAX_WORKERS,
            });
        }
        let placement: Vec<LiveSlot> = (0..n)
            .map(|i| LiveSlot {
                slot: i as u32,
                cpu: cpus[i % cpus.len()] as u32,
            })
            .collect();
        check_key(&self.policy, self.proto)?;
        if let Some(name) = &self.name {
            control::validate_name(name)?;
        }
        // Plan first: a bad policy setting fails before anything is bound.
        let plan = policy::plan(&self.policy, &placement)?;
        let with_program = self.policy.kind != PolicyKind::Kernel;
        if with_program {
            sys::check_kernel("the steering program")?;
            sys::check_bpf_privilege("loading the steering program")?;
        }

        let first = socket::bind_member(self.addr, self.proto)?;
        // Our bind succeeded, so any other socket on this address is a
        // reuseport socket of this user: a group we would silently join,
        // replacing its program. Refuse.
        if self.addr.port() != 0 {
            let ours = usize::from(self.proto == Proto::Udp);
            let count = socket::existing_members(self.addr, self.proto)?.saturating_sub(ours);
            if count > 0 {
                return Err(Error::GroupExists {
                    addr: self.addr,
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

        // The maps: with a program always; under the kernel policy only if
        // we may create them (they carry the counters `stats` reads).
        let may_bpf = with_program || sys::has_bpf_privilege();
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| control::default_group_name(self.proto, addr));
        let pins = match (self.pin && may_bpf, self.pin) {
            (true, _) => Some(Pins(control::claim(&name)?)),
            (false, true) => {
                warn!("without CAP_BPF the group's counters are not pinned: `reuseport ctl` and `stats` will not see it");
                None
            }
            (false, false) => None,
        };
        let steering = if may_bpf {
            let program = with_program.then_some(self.program.as_str());
            Some(Steering::load(
                program,
                pins.as_ref().map(|p| p.0.as_path()),
            )?)
        } else {
            None
        };
        let workers = match &steering {
            Some(s) => s.maps().workers().clone(),
            None => Arc::new(WorkerRegion::anonymous()?),
        };

        // Attached before any member listens, so no connection is ever
        // steered by the kernel's hash instead of the policy.
        if let Some(s) = steering.as_ref().filter(|s| s.has_program()) {
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
        for m in &members {
            workers.slot(m.slot).reset(m.cpu as u32);
        }
        let steering = match steering {
            Some(mut s) => {
                let info = control::group_info(addr, self.proto, n as u32, s.has_program());
                s.maps_mut().set_group_info(&info)?;
                if s.has_program() {
                    for m in &members {
                        s.maps_mut().set_slot(m.slot, &m.socket)?;
                    }
                    s.maps_mut().apply(&plan)?;
                }
                Some(Arc::new(Mutex::new(s)))
            }
            None => None,
        };
        Ok(Group {
            name: pins.as_ref().map(|_| name),
            addr,
            proto: self.proto,
            members,
            steering,
            workers,
            pins,
        })
    }
}

/// Refuses a payload key on a TCP group.
pub(crate) fn check_key(policy: &Policy, proto: Proto) -> Result<(), PolicyError> {
    match (policy.kind.hashes(), policy.key, proto) {
        (true, key @ HashKey::Payload { .. }, Proto::Tcp) => Err(PolicyError::PayloadKeyOnTcp(key)),
        _ => Ok(()),
    }
}

/// Locks the steering state; a panic while it was held cannot leave the
/// maps half-written (every write is a single syscall), so poisoning is
/// ignored.
pub fn lock(steering: &Mutex<Steering>) -> MutexGuard<'_, Steering> {
    steering.lock().unwrap_or_else(|p| p.into_inner())
}
