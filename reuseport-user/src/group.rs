//! A reuseport group: the member sockets, one per worker slot, and the
//! steering program attached to them.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex, MutexGuard},
};

use log::info;
use reuseport_common::{program, MAX_WORKERS};
use socket2::Socket;

use crate::{
    error::{Error, Result},
    policy::{self, HashKey, LiveSlot, Plan, Policy, PolicyError, PolicyKind},
    socket::{self, Proto},
    steering::{BpfCounters, Steering},
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

/// A group of `SO_REUSEPORT` sockets on one address, steered by a policy.
#[derive(Debug)]
pub struct Group {
    addr: SocketAddr,
    proto: Proto,
    members: Vec<Member>,
    steering: Option<Arc<Mutex<Steering>>>,
    policy: Policy,
}

impl Group {
    /// Settings with defaults: `127.0.0.1:7878`, TCP, one worker per usable
    /// CPU, policy `cpu`.
    pub fn builder() -> GroupBuilder {
        GroupBuilder {
            addr: SocketAddr::from(([127, 0, 0, 1], 7878)),
            proto: Proto::Tcp,
            workers: None,
            cpus: None,
            policy: Policy::new(PolicyKind::Cpu),
            backlog: DEFAULT_BACKLOG,
            program: program::STEER.to_string(),
        }
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

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The loaded program, or `None` under the `kernel` policy.
    pub fn steering(&self) -> Option<Arc<Mutex<Steering>>> {
        self.steering.clone()
    }

    /// The program's counters (all zero under the `kernel` policy).
    pub fn bpf_counters(&self) -> Result<BpfCounters> {
        match &self.steering {
            Some(s) => lock(s).counters(),
            None => Ok(BpfCounters::zero(MAX_WORKERS as usize)),
        }
    }

    fn live(&self) -> Vec<LiveSlot> {
        live_slots(self.members.iter().map(|m| (m.slot, m.cpu)))
    }

    /// Puts another policy in force on the running group. Open connections
    /// are not touched; new ones follow the new policy from the switch on.
    pub fn set_policy(&mut self, policy: Policy) -> Result<()> {
        check_key(&policy, self.proto)?;
        let steering = self.steering.as_ref().ok_or(PolicyError::Kernel)?;
        let plan = policy::plan(&policy, &self.live())?;
        lock(steering).apply(&plan)?;
        self.policy = policy;
        Ok(())
    }

    /// Detaches the program and closes every member socket. Connections
    /// still waiting in the accept queues are reset by the kernel; accepted
    /// connections are not affected. Returns once the port is free (when no
    /// other handle of the sockets is open).
    pub fn close(self) -> Result<()> {
        if self.steering.is_some() {
            if let Some(first) = self.members.first() {
                Steering::detach(first.socket.as_fd())?;
                info!("detached the steering program from {}", self.addr);
            }
        }
        drop(self.members);
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

    /// Loads another program of the object instead of the steering program
    /// (benchmarks load the cost floor; tests load one the verifier rejects).
    #[doc(hidden)]
    pub fn program(mut self, name: &str) -> Self {
        self.program = name.to_string();
        self
    }

    /// Creates the group: binds every member, loads and attaches the program,
    /// fills the socket map and puts the policy in force.
    pub fn build(self) -> Result<Group> {
        let cpus = match self.cpus {
            Some(c) if !c.is_empty() => c,
            _ => sys::usable_cpus()?,
        };
        let n = self.workers.unwrap_or(cpus.len());
        if n == 0 || n > MAX_WORKERS as usize {
            return Err(Error::WorkerCount {
                requested: n,
                max: MAX_WORKERS,
            });
        }
        let placement: Vec<(u32, usize)> =
            (0..n).map(|i| (i as u32, cpus[i % cpus.len()])).collect();
        check_key(&self.policy, self.proto)?;
        // Plan first: a bad policy setting fails before anything is bound.
        let plan = match self.policy.kind {
            PolicyKind::Kernel => None,
            _ => Some(policy::plan(
                &self.policy,
                &live_slots(placement.iter().copied()),
            )?),
        };

        let steering = match plan {
            Some(_) => Some(Steering::load(&self.program)?),
            None => None,
        };

        let mut members: Vec<Member> = Vec::with_capacity(n);
        let mut addr = self.addr;
        for &(slot, cpu) in &placement {
            let socket = socket::bind_member(addr, self.proto)?;
            if slot == 0 {
                // Our bind succeeded, so any other socket on this address is
                // a reuseport socket of this user: a group we would silently
                // join, replacing its program. Refuse.
                if self.addr.port() != 0 {
                    let ours = usize::from(self.proto == Proto::Udp);
                    let count =
                        socket::existing_members(self.addr, self.proto)?.saturating_sub(ours);
                    if count > 0 {
                        return Err(Error::GroupExists {
                            addr: self.addr,
                            proto: self.proto,
                            count,
                        });
                    }
                }
                addr = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| Error::io("getsockname", std::io::Error::other("no address")))?;
                // Attached before any member listens, so no connection is
                // ever steered by the kernel's hash instead of the policy.
                if let Some(s) = &steering {
                    s.attach(socket.as_fd())?;
                }
            }
            members.push(Member { slot, cpu, socket });
        }
        if self.proto == Proto::Tcp {
            for m in &members {
                socket::listen(&m.socket, self.backlog)?;
            }
        }
        let steering = match (steering, plan) {
            (Some(mut s), Some(plan)) => {
                install(&mut s, &members, &plan)?;
                Some(Arc::new(Mutex::new(s)))
            }
            _ => None,
        };
        Ok(Group {
            addr,
            proto: self.proto,
            members,
            steering,
            policy: self.policy,
        })
    }
}

fn install(steering: &mut Steering, members: &[Member], plan: &Plan) -> Result<()> {
    for m in members {
        steering.set_slot(m.slot, &m.socket)?;
    }
    steering.apply(plan)
}

fn check_key(policy: &Policy, proto: Proto) -> Result<(), PolicyError> {
    match (policy.kind.hashes(), policy.key, proto) {
        (true, key @ HashKey::Payload { .. }, Proto::Tcp) => Err(PolicyError::PayloadKeyOnTcp(key)),
        _ => Ok(()),
    }
}

fn live_slots(members: impl Iterator<Item = (u32, usize)>) -> Vec<LiveSlot> {
    let mut live: Vec<LiveSlot> = members
        .map(|(slot, cpu)| LiveSlot {
            slot,
            cpu: cpu as u32,
        })
        .collect();
    live.sort_by_key(|l| l.slot);
    live
}

/// Locks the steering state; a panic while it was held cannot leave the
/// maps half-written (every write is a single syscall), so poisoning is
/// ignored.
pub fn lock(steering: &Mutex<Steering>) -> MutexGuard<'_, Steering> {
    steering.lock().unwrap_or_else(|p| p.into_inner())
}
