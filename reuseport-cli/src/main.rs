//! `reuseport`: the command-line front of the library.

mod cli;
mod stats;

use std::process::ExitCode;

use clap::Parser;
use cli::Cli;
use reuseport::{Error, PolicyError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Stopped as asked, and cleaned up: not a failure.
        Err(e @ Error::Interrupted { .. }) => {
            log::info!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if let Error::Verifier { log, .. } = &e {
                for line in log.lines() {
                    eprintln!("  {line}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// The library's errors about a setting, in the words of the flag that
/// sets it (the library's own messages name no flags).
fn in_flags(e: &Error) -> Option<String> {
    Some(match e {
        Error::WorkerCount { requested, max } => {
            format!("--workers must be between 1 and {max}, not {requested}")
        }
        Error::NoSuchCpu { cpu, usable } => {
            format!("--cpu {cpu}: the group's owner may only run on CPUs {usable}")
        }
        Error::GroupRunning { name, pid } => {
            format!("group {name} is already running (pid {pid}); stop it or pick another --group")
        }
        Error::NoLiveGroup { dead } => format!(
            "no reuseport group is running in this network namespace; dead: {dead} (`reuseport cleanup` removes them)"
        ),
        Error::OwnerGone {
            name,
            pid,
            proto,
            addr,
        } => format!(
            "group {name} is dead: its owner (pid {pid}) is gone; remove it with `reuseport cleanup --group {name}`, or start `reuseport run` on {proto} {addr} to replace it"
        ),
        Error::OtherPidNamespace { name, pid } => format!(
            "group {name}'s owner (pid {pid} in its own pid namespace) is not visible from this pid namespace: join, adopt and add-worker must run in the owner's pid namespace"
        ),
        Error::WhichGroup { names } => {
            format!("several groups are running ({names}): name one with --group")
        }
        Error::Policy(PolicyError::WeightCount { given, workers }) => {
            format!("--weights has {given} weights for {workers} workers: give one per worker")
        }
        Error::Policy(PolicyError::NoWeight { slot }) => {
            format!("worker {slot} has no weight yet: give --weights, one per worker")
        }
        Error::Policy(PolicyError::PayloadKeyOnTcp(key)) => {
            format!("--hash-key {key} needs --proto udp: a TCP SYN carries no payload")
        }
        _ => return None,
    })
}

/// The error and its causes on one line.
fn one_line(e: &Error) -> String {
    if let Some(s) = in_flags(e) {
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s.replace('\n', " ")
}
