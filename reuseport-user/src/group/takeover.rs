//! A takeover (`run --takeover`) of a group that has members of other
//! processes: sockets of processes that joined (`reuseport join`) and
//! sockets adopted from other programs (`reuseport adopt`).
//!
//! The new generation loads a program and maps of its own; the old ones
//! stay with the old owner until it exits. A member of another process
//! would be in no slot of the new program, so the successor carries each
//! one over before its program takes the group:
//!
//! 1. Before anything is bound, it duplicates each such member's socket
//!    from its process (`pidfd_getfd`, with the descriptor number the
//!    member's record keeps) and checks it serves the group. A member that
//!    cannot be carried stops the takeover there, with nothing changed.
//! 2. Once its own sockets are in its socket map, it moves each carried
//!    socket from the old socket map (a socket is in one map at most:
//!    `EBUSY`) to the same slot of the new one, with its record (CPU,
//!    process, counts) and its weight, and only then puts the plan, which
//!    includes those slots, in force and attaches its program.
//! 3. It swaps its pin directory with the old one (`renameat2` with
//!    `RENAME_EXCHANGE`, one step), so the group's name resolves to the
//!    new generation at once, and then flags the old group retired. Each
//!    owner's liveness lock (see [`crate::pins`]) is on a directory inside
//!    its pin directory, so it moves with it: the successor has held its
//!    own since it claimed `NAME-next-PID` ([`pins::aside_name`]), so the
//!    name resolves to a live owner before and after the swap, and the old
//!    owner's lock stays with its pins, now under `NAME-next-PID`, until it
//!    exits (or is killed, when the successor removes them).
//! 4. A joined process sees the flag and re-joins: it opens the group's
//!    pins again (the new generation), and maps the new `WORKERS` map over
//!    its old mapping, so its running workers go on counting, now in the
//!    new records. A member the successor did not carry (a slot left free
//!    for it) is placed by the joined process itself.
//!
//! An adopted socket's program knows nothing of all this: its socket is
//! simply in the new generation's map.
//!
//! A UDP group with a flow table (`reuseport_common::flow`) carries the
//! old owner's own sockets too, the same way, into the same slots with
//! the same socket generations, but **draining**: out of the new policy,
//! yet in the new socket map, so that the datagrams of the flows they
//! serve (the flow table, which the new generation reuses, or cookies)
//! still reach them, in the old owner, which keeps reading them until
//! they have been idle for the flow timeout or its drain timeout passes.
//! New flows go to the new generation's workers.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::atomic::Ordering,
};

use log::{info, warn};
use reuseport_common::{group_flag, member_kind, GroupInfo, WorkerRecord};

use super::{lock, Group, Role};
use crate::{
    control::{self, Control},
    error::{Error, Result},
    maps::Maps,
    pins::{self, Owner},
    slots,
    steering::Steering,
    sys,
};

/// A member of another process, on its way into the new generation.
#[derive(Debug)]
pub(super) struct Carried {
    /// Its slot, the same in both generations.
    pub slot: u32,
    /// Its record in the old generation.
    pub record: WorkerRecord,
    /// Its weight under `weighted` in the old generation.
    pub weight: u32,
    /// One of the old owner's own UDP sockets: carried draining, for the
    /// flows it serves, and out of the new policy.
    pub draining: bool,
    /// Our duplicate of its socket (dropped once it is in the new map, so
    /// that the member's process alone keeps the socket open).
    socket: OwnedFd,
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        member_kind::JOINED => "joined",
        member_kind::ADOPTED => "adopted",
        _ => "owner's",
    }
}

/// Step 1: duplicates the socket of every serving member of another
/// process than the old owner, and with `owners` (a UDP group that keeps
/// its flows) of the old owner's serving and draining ones. Fails, before
/// anything changes, if one of them cannot be carried. Also returns the
/// slots of members that were still starting: the new generation leaves
/// them free, for their process to place its socket there when it
/// re-joins.
pub(super) fn collect(
    old: &Control,
    info: &GroupInfo,
    owners: bool,
) -> Result<(Vec<Carried>, Vec<u32>)> {
    let (addr, proto) = control::addr_of(info);
    let config = old.maps().config()?;
    let records = old.maps().workers().snapshot();
    let others = records
        .iter()
        .any(|r| slots::held(r.state) && r.pid != info.owner_pid && r.pid != 0);
    if others && !pins::process_alive(info.owner_pid, info.owner_start) {
        // The records name those processes by pid, and the old owner's own
        // pid is not its pid here: another pid namespace, where the same
        // numbers mean other processes (or none).
        return Err(Error::Adopt {
            what: format!(
                "cannot carry the members of other processes from another pid namespace than the owner's (pid {} there): run the takeover in the owner's pid namespace; nothing was changed",
                info.owner_pid
            ),
        });
    }
    let mut carried = Vec::new();
    let mut starting = Vec::new();
    for (slot, r) in records.into_iter().enumerate() {
        let slot = slot as u32;
        let foreign = r.pid != info.owner_pid && r.pid != 0;
        if !foreign {
            if owners && r.pid != 0 && matches!(r.state, slots::SERVING | slots::DRAINING) {
                if let Some(c) = collect_owners(slot, r, addr, proto) {
                    carried.push(c);
                }
            }
            continue;
        }
        if !pins::process_alive(r.pid, r.pid_start) {
            // Gone with its process: the old owner reaps its slot; nothing
            // to carry.
            continue;
        }
        if r.state == slots::STARTING {
            info!(
                "worker {slot} of process {} is still starting: its slot is kept free for it",
                r.pid
            );
            starting.push(slot);
            continue;
        }
        if r.state != slots::SERVING {
            continue;
        }
        if !matches!(r.kind, member_kind::JOINED | member_kind::ADOPTED) || r.fd < 0 {
            return Err(Error::Adopt {
                what: format!(
                    "cannot carry worker {slot} of process {} into the new generation: its record names no socket",
                    r.pid
                ),
            });
        }
        let socket = sys::take_fd(r.pid, r.fd)
            .and_then(|s| control::check_adoptable(&s, r.pid, r.fd, addr, proto).map(|()| s))
            .map_err(|e| Error::Adopt {
                what: format!(
                    "cannot carry the {} worker {slot} of process {} into the new generation: {e}; nothing was changed",
                    kind_name(r.kind),
                    r.pid
                ),
            })?;
        carried.push(Carried {
            slot,
            record: r,
            weight: config.weights[slot as usize],
            draining: false,
            socket,
        });
    }
    Ok((carried, starting))
}

/// One of the old owner's own UDP sockets, to carry draining; `None` (and
/// its flows move to the new generation) if it cannot be duplicated. Not
/// a reason to stop the takeover: the old owner serves on either way.
fn collect_owners(
    slot: u32,
    r: WorkerRecord,
    addr: std::net::SocketAddr,
    proto: crate::socket::Proto,
) -> Option<Carried> {
    if r.fd < 0 {
        warn!("worker {slot} of the previous owner names no socket: its flows go to the new generation");
        return None;
    }
    match sys::take_fd(r.pid, r.fd)
        .and_then(|s| control::check_adoptable(&s, r.pid, r.fd, addr, proto).map(|()| s))
    {
        Ok(socket) => Some(Carried {
            slot,
            record: r,
            weight: 0,
            draining: true,
            socket,
        }),
        Err(e) => {
            warn!("cannot carry worker {slot} of the previous owner (pid {}): {e}; its flows go to the new generation", r.pid);
            None
        }
    }
}

/// Step 2: moves the carried sockets from the old socket map to the same
/// slots of the new one, with their records. On a failure, what was
/// moved is put back.
pub(super) fn place(old: &mut Control, new: &mut Maps, carried: &[Carried]) -> Result<()> {
    for (i, c) in carried.iter().enumerate() {
        // Out of the old map first: a socket is in one socket map at most.
        // Until the new program is attached, the old one skips the empty
        // slot (counted as such) and picks a live one.
        old.maps_mut().clear_slot(c.slot)?;
        if let Err(e) = new.set_slot(c.slot, &c.socket) {
            for back in &carried[..=i] {
                let _ = new.clear_slot(back.slot);
                let _ = old.maps_mut().set_slot(back.slot, &back.socket);
            }
            return Err(e);
        }
        // The new maps are ours alone until we attach: the slot is free.
        let rec = new.workers().slot(c.slot);
        if !rec.carry(&c.record) || (c.draining && !slots::drain(&rec.state)) {
            for back in &carried[..=i] {
                let _ = new.clear_slot(back.slot);
                let _ = old.maps_mut().set_slot(back.slot, &back.socket);
            }
            return Err(Error::NotServing {
                slot: c.slot,
                state: "taken in the new generation's maps",
            });
        }
        info!(
            "carried the {} worker {} of process {} into the new generation{}",
            kind_name(c.record.kind),
            c.slot,
            c.record.pid,
            if c.draining {
                ", draining: it serves its flows until they are idle"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Undoes [`place`] after a takeover that failed before it switched the
/// group: each carried socket goes back to its slot of the old map.
pub(super) fn unplace(old: &mut Control, new: &mut Maps, carried: &[Carried]) {
    for c in carried {
        let _ = new.clear_slot(c.slot);
        if let Err(e) = old.maps_mut().set_slot(c.slot, &c.socket) {
            log::warn!(
                "worker {} of process {} could not go back to the old generation's socket map: {e}",
                c.slot,
                c.record.pid
            );
        }
    }
}

/// Step 3: swaps the directories `aside` (the new generation's pins) and
/// `name` (the old one's), in one step: `ctl`, `join` and `stats` that
/// open the group by name find one generation or the other, never none.
/// bpffs supports the exchange (`simple_rename()` in `fs/libfs.c`).
pub(super) fn exchange(aside: &Path, name: &Path) -> Result<()> {
    // Both paths are absolute, so the directory descriptors are unused;
    // the parent of `name` serves for both.
    let parent = name.parent().unwrap_or(Path::new("/"));
    let dir = std::fs::File::open(parent)
        .map_err(|e| Error::io(format!("opening {}", parent.display()), e))?;
    nix::fcntl::renameat2(
        &dir,
        aside,
        &dir,
        name,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(|e| {
        Error::io(
            format!("exchanging {} and {}", aside.display(), name.display()),
            e.into(),
        )
    })
}

impl Group {
    /// Step 4, in a joined process whose group was taken over: moves this
    /// process's members into the new generation (see the module's
    /// documentation). Returns whether it did; `false` when the group's
    /// pins do not hold a new generation yet (try again later).
    pub fn rejoin(&mut self) -> Result<bool> {
        if self.role != Role::Joined {
            return Ok(false);
        }
        let (Some(dir), Some(old)) = (self.dir.clone(), self.steering.clone()) else {
            return Ok(false);
        };
        let old_info = lock(&old).maps().group_info()?;
        let mut next = match Steering::from_pins(&dir) {
            Ok(s) => s,
            Err(Error::IncompatibleLayout { .. }) => {
                return Err(Error::OwnerDidNot {
                    what: "the group was taken over by a build of another layout".into(),
                })
            }
            Err(e) => return Err(e),
        };
        let info = next.maps().group_info()?;
        let same = info.owner_pid == old_info.owner_pid && info.owner_start == old_info.owner_start;
        if same || info.flags & group_flag::RETIRED != 0 {
            return Ok(false);
        }
        if pins::owner(&dir, Some((info.owner_pid, info.owner_start))) == Owner::Gone {
            // The successor died: nothing to join (the old owner drains).
            return Ok(false);
        }
        let me = std::process::id();
        let mut placed = Vec::new();
        for m in &self.members {
            let r = next.maps().workers().slot(m.slot).snapshot();
            if r.state == slots::SERVING && r.pid == me {
                continue; // carried by the successor
            }
            // Not carried (the successor could not reach this process's
            // descriptors): take the slot, kept free for it, ourselves.
            next.maps_mut()
                .claim_this_slot(m.slot, m.cpu as u32, me, Some(1))?;
            lock(&old).maps_mut().clear_slot(m.slot)?;
            next.maps_mut().set_slot(m.slot, &m.socket)?;
            placed.push(m.slot);
        }
        // The workers count through `self.workers`, a mapping of the old
        // WORKERS map: from now on it shows the new one.
        let before: Vec<(u32, WorkerRecord, i32)> = self
            .members
            .iter()
            .map(|m| {
                (
                    m.slot,
                    self.workers.slot(m.slot).snapshot(),
                    m.socket.as_raw_fd(),
                )
            })
            .collect();
        self.workers.remap(next.maps().workers_fd())?;
        for (slot, r, fd) in before {
            let rec = self.workers.slot(slot);
            rec.add_counts(&r);
            rec.active.store(r.active, Ordering::Relaxed);
            rec.set_member(member_kind::JOINED, fd);
            // Claimed above (its CPU and process written then): it serves.
            if placed.contains(&slot) && !slots::serve(&rec.state) {
                warn!(
                    "worker {slot}: its slot of the new generation was given up while it re-joined"
                );
            }
        }
        *lock(&old) = next;
        if !placed.is_empty() {
            self.rebalance()?;
        }
        let slots: Vec<String> = self.members.iter().map(|m| m.slot.to_string()).collect();
        info!(
            "the group was taken over by pid {}: re-joined its new generation with worker(s) {}",
            info.owner_pid,
            slots.join(", ")
        );
        Ok(true)
    }
}
