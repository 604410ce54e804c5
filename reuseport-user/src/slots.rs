//! The slot state machine: what each slot of the group holds, and the only
//! code that changes it.
//!
//! ```text
//!            claim               serve                drain
//!   EMPTY ──────────▶ STARTING ─────────▶ SERVING ──────────▶ DRAINING
//!     ▲ ▲   abandon     │                   │                    │
//!     │ └───────────────┘                   │                    │
//!     └────────────── release (the worker is gone) ──────────────┘
//! ```
//!
//! A new group's own members, and the members a takeover carries into its
//! new maps, go from EMPTY to SERVING directly ([`serve_new`]: nobody else
//! can see those maps yet). In maps others see, only a claimed slot serves.
//! Every slot's state is a word of its record in the `WORKERS` map, which
//! every process of the group maps and the program reads; each transition
//! but `release` is a compare-and-swap from the one state it leaves, so of
//! two processes racing for one slot (two `join`s,
//! `ctl add-worker` giving up while the owner starts the worker) one wins
//! and the other is told it lost. `release` is unconditional: it is done by
//! whoever saw the slot's worker end (its own process, or the owner for a
//! process that died).
//!
//! Callers of the library see a slot's state as [`SlotState`], the one
//! public name of these states; the transitions stay inside the library.

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicU32, Ordering},
};

pub use reuseport_common::worker_state::{DRAINING, EMPTY, SERVING, STARTING};
use reuseport_common::WorkerRecord;

use crate::policy::{LiveSlot, ParseError};

/// Where a slot's worker is in its life: a slot is empty, then starting,
/// serving, draining, and empty again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SlotState {
    /// No worker: the slot is free (or its worker is gone).
    Empty,
    /// Claimed by a worker that is not serving yet.
    Starting,
    /// Serving: the policy gives it new connections.
    Serving,
    /// Draining: no new connections; it closes after its open ones.
    Draining,
}

impl SlotState {
    /// Every state.
    pub const ALL: [SlotState; 4] = [
        SlotState::Empty,
        SlotState::Starting,
        SlotState::Serving,
        SlotState::Draining,
    ];

    /// The state of a worker record's `state` field; an unknown value (a
    /// newer writer) reads as empty, which is what the program makes of it.
    pub fn from_raw(state: u32) -> SlotState {
        match state {
            SERVING => SlotState::Serving,
            DRAINING => SlotState::Draining,
            STARTING => SlotState::Starting,
            _ => SlotState::Empty,
        }
    }

    /// Its value in a worker record.
    pub fn raw(self) -> u32 {
        match self {
            SlotState::Empty => EMPTY,
            SlotState::Starting => STARTING,
            SlotState::Serving => SERVING,
            SlotState::Draining => DRAINING,
        }
    }

    /// Its name, as `reuseport ctl status` and `stats` print it.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Empty => "gone",
            SlotState::Starting => "starting",
            SlotState::Serving => "serving",
            SlotState::Draining => "draining",
        }
    }
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad: honours a width, as in the stats table.
        f.pad(self.name())
    }
}

impl FromStr for SlotState {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| ParseError::new(format!("unknown slot state `{s}`")))
    }
}

fn cas(state: &AtomicU32, from: u32, to: u32) -> bool {
    state
        .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// EMPTY → STARTING: takes a free slot for a worker about to start.
pub fn claim(state: &AtomicU32) -> bool {
    cas(state, EMPTY, STARTING)
}

/// STARTING → SERVING: the claimed slot's worker has its socket in the
/// group and in the socket map. Fails if the claim was given up meanwhile
/// (see [`abandon`]), so a worker never serves a slot its claimer was told
/// is free.
pub fn serve(state: &AtomicU32) -> bool {
    cas(state, STARTING, SERVING)
}

/// EMPTY → SERVING, only in maps no other process sees yet: a new group's
/// own members, or the members a takeover carries into its new maps.
pub fn serve_new(state: &AtomicU32) -> bool {
    cas(state, EMPTY, SERVING)
}

/// SERVING → DRAINING: no new work; the worker's process closes its socket
/// and finishes what is open.
pub fn drain(state: &AtomicU32) -> bool {
    cas(state, SERVING, DRAINING)
}

/// STARTING → EMPTY: a claim given up before its worker served.
pub fn abandon(state: &AtomicU32) -> bool {
    cas(state, STARTING, EMPTY)
}

/// Any state → EMPTY: the slot's worker is gone.
pub fn release(state: &AtomicU32) {
    state.store(EMPTY, Ordering::Release);
}

/// Whether a slot in `state` is held by some worker (or one on its way).
pub fn held(state: u32) -> bool {
    matches!(state, SERVING | DRAINING | STARTING)
}

/// A record's state's name (see [`SlotState::name`]).
pub fn name(state: u32) -> &'static str {
    SlotState::from_raw(state).name()
}

/// Slots whose record says serving, in slot order: what a policy is built
/// over.
pub fn live_slots(records: &[WorkerRecord]) -> Vec<LiveSlot> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == SERVING)
        .map(|(slot, r)| LiveSlot {
            slot: slot as u32,
            cpu: r.cpu,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_leave_only_the_state_they_name() {
        let s = AtomicU32::new(EMPTY);
        assert!(!drain(&s) && !abandon(&s));
        assert!(claim(&s));
        assert!(!claim(&s), "a slot is claimed once");
        assert!(abandon(&s));
        assert!(claim(&s) && serve(&s));
        assert!(!serve(&s) && !claim(&s) && !abandon(&s));
        assert!(drain(&s));
        assert!(!drain(&s) && !serve(&s));
        release(&s);
        assert_eq!(s.load(Ordering::Relaxed), EMPTY);
        // A new group's member serves from EMPTY, in maps only it sees.
        assert!(serve_new(&s));
        assert!(!serve_new(&s), "a serving slot is not new");
        // A claim given up cannot be served any more.
        release(&s);
        assert!(claim(&s) && abandon(&s));
        assert!(!serve(&s), "a claim given up is not served");
        assert_eq!(s.load(Ordering::Relaxed), EMPTY);
        let other = AtomicU32::new(DRAINING);
        assert!(!serve(&other) && !serve_new(&other));
    }

    #[test]
    fn states_round_trip_through_raw_and_names() {
        for st in SlotState::ALL {
            assert_eq!(SlotState::from_raw(st.raw()), st);
            assert_eq!(st.to_string().parse::<SlotState>().unwrap(), st);
            assert_eq!(st.name(), name(st.raw()));
        }
        assert_eq!(SlotState::from_raw(99), SlotState::Empty);
    }

    #[test]
    fn live_slots_are_the_serving_records() {
        let mut records = vec![WorkerRecord::default(); 4];
        records[0].state = SERVING;
        records[2].state = SERVING;
        records[2].cpu = 1;
        records[3].state = DRAINING;
        assert_eq!(
            live_slots(&records),
            vec![LiveSlot { slot: 0, cpu: 0 }, LiveSlot { slot: 2, cpu: 1 }]
        );
    }
}
