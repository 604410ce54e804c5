//! SIGINT and SIGTERM while a group starts.
//!
//! By default either signal ends the process at once (exit status 128 +
//! the signal, 143 for SIGTERM), which would leave behind whatever the
//! start-up had made so far: pins under bpffs, a changed
//! `net.ipv4.tcp_migrate_req`. `reuseport run` and `join` catch both from
//! their first step on ([`catch_stop_signals`]): the handler only notes the
//! signal, and the start-up stops at its next [`checkpoint`] with
//! [`Error::Interrupted`], whose unwinding removes what was made (every
//! resource of a start-up is owned by a guard that undoes it when
//! dropped). Once the group serves, the same note makes the server shut
//! down in order.
//!
//! A test hook: with `REUSEPORT_TEST_PAUSE_AT=STEP` in the environment,
//! the start-up stops at checkpoint STEP, says so on stderr
//! (`paused at STEP`) and waits (at most 10 s) for a signal there, so a
//! test can signal at every step in turn.

use std::{
    sync::{
        atomic::{AtomicI32, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

/// The signal caught (0: none).
static CAUGHT: AtomicI32 = AtomicI32::new(0);

/// The environment variable of the test hook.
pub const PAUSE_ENV: &str = "REUSEPORT_TEST_PAUSE_AT";

/// From now on, SIGINT and SIGTERM are noted instead of ending the
/// process: see the module's documentation. Idempotent.
pub fn catch_stop_signals() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: the action only stores to an atomic, which is
                // async-signal-safe. signal-hook-registry keeps other
                // actions registered for the signal (tokio's, once the
                // server waits for signals) running too.
                unsafe {
                    signal_hook_registry::register(sig, move || CAUGHT.store(sig, Ordering::SeqCst))
                }
                .map_err(|e| format!("installing a handler of signal {sig}: {e}"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(|e| Error::io("catching SIGINT and SIGTERM", std::io::Error::other(e)))
}

/// The stop signal caught so far, if any.
pub fn stop_signal() -> Option<&'static str> {
    match CAUGHT.load(Ordering::SeqCst) {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}

/// A step of the start-up: fails with [`Error::Interrupted`] if a stop
/// signal was caught (and, under the test hook, pauses first).
pub fn checkpoint(step: &'static str) -> Result<()> {
    pause_for_tests(step);
    match stop_signal() {
        Some(signal) => Err(Error::Interrupted { signal, step }),
        None => Ok(()),
    }
}

fn pause_for_tests(step: &str) {
    static PAUSE_AT: OnceLock<Option<String>> = OnceLock::new();
    let at = PAUSE_AT.get_or_init(|| std::env::var(PAUSE_ENV).ok());
    if at.as_deref() != Some(step) {
        return;
    }
    eprintln!("paused at {step} ({PAUSE_ENV})");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stop_signal().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}
