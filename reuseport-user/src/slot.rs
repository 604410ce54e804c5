//! The state of a worker slot, as the group's worker records carry it
//! (`reuseport_common::worker_state`), for callers of the library.

use std::{fmt, str::FromStr};

use reuseport_common::worker_state;

use crate::{control::SlotStatus, policy::ParseError};

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
            worker_state::SERVING => SlotState::Serving,
            worker_state::DRAINING => SlotState::Draining,
            worker_state::STARTING => SlotState::Starting,
            _ => SlotState::Empty,
        }
    }

    /// Its value in a worker record.
    pub fn raw(self) -> u32 {
        match self {
            SlotState::Empty => worker_state::EMPTY,
            SlotState::Starting => worker_state::STARTING,
            SlotState::Serving => worker_state::SERVING,
            SlotState::Draining => worker_state::DRAINING,
        }
    }

    /// Its name, as `reuseport ctl status` prints it.
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

impl SlotStatus {
    /// The slot's state.
    pub fn state(&self) -> SlotState {
        SlotState::from_raw(self.record.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_raw_and_names() {
        for st in SlotState::ALL {
            assert_eq!(SlotState::from_raw(st.raw()), st);
            assert_eq!(st.to_string().parse::<SlotState>().unwrap(), st);
            assert_eq!(st.name(), crate::control::state_name(st.raw()));
        }
        assert_eq!(SlotState::from_raw(99), SlotState::Empty);
    }
}
