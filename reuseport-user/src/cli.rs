//! The `reuseport` command line.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    group::{Group, DEFAULT_BACKLOG},
    policy::{HashKey, Policy, PolicyKind},
    server,
    worker::Limits,
};

/// Kernel-assisted connection balancing: a SO_REUSEPORT group steered by an
/// eBPF program, served by thread-per-core workers.
#[derive(Debug, Parser)]
#[command(name = "reuseport", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an echo group on one address until SIGINT/SIGTERM.
    Run(RunArgs),
}

/// Options of `reuseport run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address and port of the group (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,

    /// Number of workers [default: one per CPU this process may use]. More
    /// workers than CPUs wrap round the CPUs.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Steering policy.
    #[arg(long, value_enum, default_value_t = PolicyKind::Cpu)]
    pub policy: PolicyKind,

    /// What the hash policies hash: src-ip (client affinity), four-tuple.
    #[arg(long, default_value = "src-ip")]
    pub hash_key: HashKey,

    /// Seed of the key hash.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,

    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// Most open connections per worker; beyond it the worker stops accepting.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,

    /// Close a connection idle for this long (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Per-connection buffer in bytes: the most data held before it is echoed.
    #[arg(long, default_value_t = Limits::default().buffer_size)]
    pub buffer_size: usize,

    /// On shutdown, how long open connections may take to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Turn on the kernel's BPF run-time statistics while running (they
    /// cost two clock reads per program run) and report them on /metrics.
    #[arg(long)]
    pub bpf_stats: bool,

    /// Listen backlog of each worker's socket.
    #[arg(long, default_value_t = DEFAULT_BACKLOG)]
    pub backlog: i32,

    /// Program of the eBPF object to load (tests and benchmarks).
    #[arg(long, hide = true, default_value = reuseport_common::program::STEER)]
    pub bpf_program: String,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> crate::error::Result<()> {
    match cli.command {
        Command::Run(args) => run_group(args),
    }
}

fn run_group(a: RunArgs) -> crate::error::Result<()> {
    let policy = Policy {
        kind: a.policy,
        key: a.hash_key,
        seed: a.seed,
        weights: Vec::new(),
    };
    let mut builder = Group::builder()
        .addr(a.addr)
        .policy(policy)
        .backlog(a.backlog)
        .program(&a.bpf_program);
    if let Some(n) = a.workers {
        builder = builder.workers(n);
    }
    let limits = Limits {
        max_connections: a.max_connections.max(1),
        idle_timeout: a.idle_timeout,
        buffer_size: a.buffer_size.max(1),
        drain_timeout: a.drain_timeout,
    };
    server::run_echo(builder, limits, a.metrics_addr, a.bpf_stats)
}
