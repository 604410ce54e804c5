//! The `reuseport` command line.

use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};

use crate::{
    control::Control,
    error::Result,
    group::{Group, DEFAULT_BACKLOG},
    policy::{HashKey, Policy, PolicyKind},
    server,
    socket::Proto,
    stats,
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
    /// Act on a running group from another process.
    Ctl(CtlArgs),
    /// Print per-worker counters and the balance of a running group.
    Stats(StatsArgs),
}

/// Per-worker weights, in slot order: `3,1,1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weights(pub Vec<u32>);

impl std::str::FromStr for Weights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("bad weight list `{s}`: give one whole number per worker, separated by commas, e.g. 3,1")
        };
        let w: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>().map_err(|_| bad()))
            .collect::<std::result::Result<_, _>>()?;
        if w.is_empty() || w.iter().all(|&x| x == 0) {
            return Err(bad());
        }
        Ok(Weights(w))
    }
}

/// Options of `reuseport ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The group [default: the only one running].
    #[arg(long, global = true)]
    pub group: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub action: CtlAction,
}

/// `reuseport ctl` actions.
#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// Switch the running group to another policy; open connections stay.
    Policy {
        /// The new policy.
        #[arg(value_enum)]
        policy: PolicyKind,
        /// `weighted`: one weight per worker, in slot order [default: the current ones].
        #[arg(long)]
        weights: Option<Weights>,
        /// Hash policies: src-ip or four-tuple [default: the current key].
        #[arg(long)]
        hash_key: Option<HashKey>,
        /// Seed of the key hash [default: the current seed].
        #[arg(long)]
        seed: Option<u32>,
    },
    /// Print the group's policy and per-worker counters.
    Status,
}

/// Options of `reuseport stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The group [default: the only one running].
    #[arg(long)]
    pub group: Option<String>,
    /// Print again every SECONDS, with the balance of each interval, until Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<f64>,
}

/// Options of `reuseport run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address and port of the group (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,

    /// Transport: tcp (an echo of each connection) or udp (an echo of each
    /// datagram).
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,

    /// Number of workers [default: one per CPU this process may use]. More
    /// workers than CPUs wrap round the CPUs.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Steering policy.
    #[arg(long, value_enum, default_value_t = PolicyKind::Cpu)]
    pub policy: PolicyKind,

    /// What the hash policies (hash, consistent) hash: src-ip (client
    /// affinity), four-tuple, or payload:OFFSET:LEN (UDP: LEN bytes, 1 to
    /// 16, at OFFSET of the payload, e.g. a QUIC connection ID).
    #[arg(long, default_value = "src-ip")]
    pub hash_key: HashKey,

    /// Seed of the key hash.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,

    /// `weighted`: one weight per worker, in slot order, e.g. 3,1.
    #[arg(long)]
    pub weights: Option<Weights>,

    /// Name of the group, for `reuseport ctl` and `stats` (its maps are
    /// pinned in /sys/fs/bpf/reuseport/NAME) [default: PROTO-ADDRESS-PORT].
    #[arg(long)]
    pub group: Option<String>,

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
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run_group(args),
        Command::Ctl(args) => ctl(args),
        Command::Stats(args) => watch_stats(args),
    }
}

fn ctl(args: CtlArgs) -> Result<()> {
    let mut control = Control::open(args.group.as_deref())?;
    match args.action {
        CtlAction::Status => {
            print!("{}", stats::render(&control.status()?, None));
            Ok(())
        }
        CtlAction::Policy {
            policy,
            weights,
            hash_key,
            seed,
        } => {
            let current = control.status()?.policy;
            let next = Policy {
                kind: policy,
                key: hash_key.unwrap_or(current.key),
                seed: seed.unwrap_or(current.seed),
                weights: weights.map(|w| w.0).unwrap_or(current.weights),
            };
            control.set_policy(&next)?;
            println!("group {}: policy {next}", control.name());
            Ok(())
        }
    }
}

fn watch_stats(args: StatsArgs) -> Result<()> {
    let control = Control::open(args.group.as_deref())?;
    let mut previous = (control.status()?, Instant::now());
    let Some(every) = args.watch else {
        print!("{}", stats::render(&previous.0, None));
        return Ok(());
    };
    let every = Duration::from_secs_f64(every.max(0.1));
    loop {
        std::thread::sleep(every);
        let now = (control.status()?, Instant::now());
        let secs = now.1.duration_since(previous.1).as_secs_f64();
        println!("{}", stats::render(&now.0, Some((&previous.0, secs))));
        let _ = std::io::stdout().flush();
        previous = now;
    }
}

fn run_group(a: RunArgs) -> Result<()> {
    let policy = Policy {
        kind: a.policy,
        key: a.hash_key,
        seed: a.seed,
        weights: a.weights.map(|w| w.0).unwrap_or_default(),
    };
    let mut builder = Group::builder()
        .addr(a.addr)
        .proto(a.proto)
        .policy(policy)
        .backlog(a.backlog)
        .program(&a.bpf_program);
    if let Some(n) = a.workers {
        builder = builder.workers(n);
    }
    if let Some(name) = a.group {
        builder = builder.name(name);
    }
    let limits = Limits {
        max_connections: a.max_connections.max(1),
        idle_timeout: a.idle_timeout,
        buffer_size: a.buffer_size.max(1),
        drain_timeout: a.drain_timeout,
    };
    server::run_echo(builder, limits, a.metrics_addr, a.bpf_stats)
}
