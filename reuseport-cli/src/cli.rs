//! The `reuseport` command line.

use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::{
    builder::{PossibleValuesParser, TypedValueParser as _},
    Args, Parser, Subcommand,
};
use reuseport::{
    server::{self, ServeOptions, Server},
    Control, EchoOptions, Error, Group, HashKey, Limits, Policy, PolicyKind, Proto, Result,
    DEFAULT_BACKLOG,
};

use crate::stats;

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
    /// Add this process's workers to a running group, until SIGINT/SIGTERM.
    Join(JoinArgs),
    /// Act on a running group from another process.
    Ctl(CtlArgs),
    /// Give a listening socket of another running program (any language),
    /// bound with SO_REUSEPORT to the group's port, a slot in the group:
    /// it then serves its share under the policy, unchanged.
    Adopt(AdoptArgs),
    /// Print per-worker counters and the balance of a running group.
    Stats(StatsArgs),
    /// Remove the pins of dead groups of this network namespace (their
    /// owner was killed or crashed); a running group is left alone.
    Cleanup(CleanupArgs),
    /// Measure every policy and the classic server designs side by side:
    /// runs `reuseport-bench` (installed beside this program) with the
    /// arguments that follow (`reuseport bench --help` for its own help).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments for `reuseport-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// The library's policy names as clap values, so that `--help` and a wrong
/// name list them.
fn policy_kind() -> impl clap::builder::TypedValueParser<Value = PolicyKind> {
    PossibleValuesParser::new(PolicyKind::ALL.map(PolicyKind::name))
        // Invariant: only the names listed above reach this.
        .map(|name| name.parse::<PolicyKind>().expect("a listed policy name"))
}

/// `tcp` or `udp`, likewise.
fn proto() -> impl clap::builder::TypedValueParser<Value = Proto> {
    PossibleValuesParser::new(["tcp", "udp"])
        // Invariant: only the names listed above reach this.
        .map(|name| name.parse::<Proto>().expect("a listed transport"))
}

/// A number in `range`, for the options that become durations.
fn bounded(s: &str, range: std::ops::RangeInclusive<f64>) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is out of range: {} to {}",
            range.start(),
            range.end()
        ))
    }
}

fn watch_seconds(s: &str) -> std::result::Result<f64, String> {
    bounded(s, 0.1..=86_400.0)
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

/// What a serving process (`run`, `join`) takes besides its group.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,

    /// Most open connections per worker (1 to 1048576); beyond it the
    /// worker stops accepting.
    #[arg(long, default_value_t = Limits::default().max_connections,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    pub max_connections: usize,

    /// Close a connection idle for this long (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Per-connection buffer in bytes (64 to 16777216): the most data held
    /// before it is echoed.
    #[arg(long, default_value_t = EchoOptions::default().buffer_size,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(64..=16 << 20))]
    pub buffer_size: usize,

    /// On shutdown or drain, how long open connections may take to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Listen backlog of each worker's socket.
    #[arg(long, default_value_t = DEFAULT_BACKLOG)]
    pub backlog: i32,
}

impl ServeArgs {
    fn options(&self) -> ServeOptions {
        let mut options = ServeOptions::default();
        options.limits.max_connections = self.max_connections;
        options.limits.drain_timeout = self.drain_timeout;
        options.echo.idle_timeout = self.idle_timeout;
        options.echo.buffer_size = self.buffer_size;
        options.metrics_addr = self.metrics_addr;
        // A server for many connections: the process is ours.
        options.raise_fd_limit = true;
        options
    }
}

/// Options of `reuseport run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address and port of the group (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,

    /// Transport: tcp (an echo of each connection) or udp (an echo of each
    /// datagram).
    #[arg(long, value_parser = proto(), default_value_t = Proto::Tcp)]
    pub proto: Proto,

    /// Number of workers, 1 to 1024 [default: one per CPU this process may
    /// use, at most 1024]. More workers than CPUs wrap round the CPUs.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Steering policy [default: cpu; with --takeover, the old group's].
    #[arg(long, value_parser = policy_kind())]
    pub policy: Option<PolicyKind>,

    /// What the hash policies (hash, consistent) hash: src-ip (client
    /// affinity), four-tuple (predictable), flow (the kernel's 4-tuple
    /// hash: cheapest, not predictable), or payload:OFFSET:LEN (UDP: LEN
    /// bytes, 1 to 16, at OFFSET of the payload). UDP keys that steer
    /// before any policy: cookie:OFFSET (a datagram carrying a cookie its
    /// server minted at OFFSET goes to that server's socket) and quic (the
    /// cookie in a QUIC connection ID; Initial packets by the policy, on a
    /// hash of their connection ID).
    #[arg(long, default_value = "src-ip")]
    pub hash_key: HashKey,

    /// Seed of the key hash.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,

    /// `weighted`: one weight per worker, in slot order, e.g. 3,1.
    #[arg(long)]
    pub weights: Option<Weights>,

    /// Name of the group, for `reuseport ctl` and `stats` (its maps are
    /// pinned in /sys/fs/bpf/reuseport/netns-INODE/NAME, INODE being the
    /// network namespace's) [default: PROTO-ADDRESS-PORT].
    #[arg(long)]
    pub group: Option<String>,

    /// Take over the running group of this name: serve its address with a
    /// new program and these workers, then let the old process drain and
    /// exit. No connection is refused or reset on the way.
    #[arg(long, value_name = "GROUP", conflicts_with = "group")]
    pub takeover: Option<String>,

    /// UDP: flows the flow table remembers at once (each keeps the worker
    /// that served it through drains and takeovers); past it, each new flow
    /// evicts the least recently used one; 0: no flow table (datagrams are
    /// placed one by one). A takeover keeps the old table.
    #[arg(long, default_value_t = reuseport_common::flow::DEFAULT_TABLE_SIZE)]
    pub flow_table_size: u32,

    /// UDP: how long a flow may stay silent and keep its worker (e.g. 30s);
    /// a draining UDP worker closes once it has received nothing for this
    /// long, or at --drain-timeout.
    #[arg(long, default_value = "30s", value_parser = flow_timeout)]
    pub flow_timeout: Duration,

    /// Options of the serving process.
    #[command(flatten)]
    pub serve: ServeArgs,

    /// Turn on the kernel's BPF run-time statistics while running (they
    /// cost two clock reads per program run) and report them on /metrics.
    #[arg(long)]
    pub bpf_stats: bool,

    /// Program of the eBPF object to load (tests and benchmarks).
    #[arg(long, hide = true, default_value = reuseport_common::program::STEER)]
    pub bpf_program: String,

    /// eBPF object to load the program and maps from instead of the one
    /// built in (tests: the test object, which has programs the built-in
    /// one has not).
    #[arg(long, hide = true, value_name = "PATH")]
    pub bpf_object: Option<std::path::PathBuf>,
}

/// Options of `reuseport join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The running group to join.
    #[arg(long)]
    pub group: String,

    /// Number of workers this process adds.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Options of the serving process.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Options of `reuseport adopt`.
#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// The group [default: the only one running].
    #[arg(long)]
    pub group: Option<String>,
    /// The process that holds the socket.
    #[arg(long)]
    pub pid: u32,
    /// The socket's descriptor number in that process.
    #[arg(long)]
    pub fd: i32,
    /// The slot to give it [default: a free one].
    #[arg(long)]
    pub slot: Option<u32>,
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
        #[arg(value_parser = policy_kind())]
        policy: PolicyKind,
        /// `weighted`: one weight per worker, in slot order [default: the current ones].
        #[arg(long)]
        weights: Option<Weights>,
        /// Hash policies: src-ip, four-tuple, flow or payload:OFFSET:LEN;
        /// UDP, any policy: cookie:OFFSET or quic [default: the current key].
        #[arg(long)]
        hash_key: Option<HashKey>,
        /// Seed of the key hash [default: the current seed].
        #[arg(long)]
        seed: Option<u32>,
    },
    /// Print the group's policy and per-worker counters.
    Status,
    /// Ask the group's owner for one more worker; it takes a free slot and
    /// its share of new connections at once.
    AddWorker {
        /// CPU to pin it to [default: the usable CPU with the fewest workers].
        #[arg(long)]
        cpu: Option<usize>,
        /// `weighted`: its weight [default: 1].
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Stop giving a worker new connections; it closes once its open ones
    /// are done (its queued ones move to the others).
    Drain {
        /// The worker (slot) to drain.
        worker: u32,
    },
}

/// Options of `reuseport stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The group [default: the only one running].
    #[arg(long)]
    pub group: Option<String>,
    /// Print again every SECONDS (0.1 to 86400), with the balance of each
    /// interval, until Ctrl-C.
    #[arg(long, value_name = "SECONDS", value_parser = watch_seconds)]
    pub watch: Option<f64>,
}

/// Options of `reuseport cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Only this group (it must be dead) [default: every dead group].
    #[arg(long)]
    pub group: Option<String>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            reuseport::server::catch_stop_signals()?;
            run_group(args)
        }
        Command::Join(args) => {
            reuseport::server::catch_stop_signals()?;
            let group = Group::join(&args.group, args.workers, None, args.serve.backlog)?;
            serve(group, args.serve.options())
        }
        Command::Cleanup(args) => {
            let removed = Control::cleanup(args.group.as_deref())?;
            if removed.is_empty() {
                println!("no dead group in this network namespace");
            }
            for r in removed {
                match r.owner_pid {
                    Some(pid) => println!(
                        "removed dead group {} (its owner, pid {pid}, is gone)",
                        r.name
                    ),
                    None => println!("removed dead group {} (its record was unreadable)", r.name),
                }
                if let Some(before) = r.restored_migrate_req {
                    println!("restored net.ipv4.tcp_migrate_req to {before}");
                }
                if let Some(other) = &r.migrate_req_left_for {
                    println!(
                        "left net.ipv4.tcp_migrate_req at 1 for group {other}, which relies on it"
                    );
                }
            }
            Ok(())
        }
        Command::Ctl(args) => ctl(args),
        Command::Adopt(args) => {
            let mut control = Control::open(args.group.as_deref())?;
            let slot = control.adopt(args.pid, args.fd, args.slot)?;
            println!(
                "group {}: descriptor {} of process {} serves slot {slot}",
                control.name(),
                args.fd,
                args.pid
            );
            Ok(())
        }
        Command::Stats(args) => watch_stats(args),
        Command::Bench { args } => bench(args),
    }
}

/// Becomes `reuseport-bench ARGS`, the benchmark's own program (its
/// charts need font libraries the server does without).
fn bench(args: Vec<std::ffi::OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe()
        .map_err(|e| reuseport::Error::io("finding this program", e))?
        .with_file_name("reuseport-bench");
    let err = std::process::Command::new(&exe).args(args).exec();
    Err(reuseport::Error::io(
        format!(
            "running {} (build it with `cargo build -p reuseport-cli`)",
            exe.display()
        ),
        err,
    ))
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
            let next = control.switch_policy(policy, hash_key, seed, weights.map(|w| w.0))?;
            println!("group {}: policy {next}", control.name());
            Ok(())
        }
        CtlAction::AddWorker { cpu, weight } => {
            let (slot, cpu) =
                control.add_worker(cpu, weight.unwrap_or(1), Duration::from_secs(10))?;
            println!("group {}: worker {slot} added on CPU {cpu}", control.name());
            Ok(())
        }
        CtlAction::Drain { worker } => {
            control.drain(worker)?;
            println!(
                "group {}: worker {worker} draining (no new connections; it closes after its open ones)",
                control.name()
            );
            Ok(())
        }
    }
}

fn watch_stats(args: StatsArgs) -> Result<()> {
    // A reader that goes away (`reuseport stats --watch 1 | head`) ends
    // the command as it ends other Unix filters, by SIGPIPE, instead of a
    // panic in `print!`. Rust starts programs with SIGPIPE ignored.
    // SAFETY: restores the default disposition; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let control = Control::open(args.group.as_deref())?;
    let mut previous = (control.status()?, Instant::now());
    let Some(every) = args.watch else {
        print!("{}", stats::render(&previous.0, None));
        return Ok(());
    };
    let every = Duration::from_secs_f64(every.max(0.1));
    loop {
        std::thread::sleep(every);
        // The pins outlive a killed owner: stop rather than print its last
        // counters for ever.
        control.check_owner()?;
        let now = (control.status()?, Instant::now());
        let secs = now.1.duration_since(previous.1).as_secs_f64();
        println!("{}", stats::render(&now.0, Some((&previous.0, secs))));
        let _ = std::io::stdout().flush();
        previous = now;
    }
}

/// A flow timeout: a duration from 1 ms to 49 days (the program keeps it
/// in milliseconds, in 32 bits).
fn flow_timeout(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) || d.as_millis() > u128::from(u32::MAX) {
        return Err("a flow timeout is from 1ms to 49 days".into());
    }
    Ok(d)
}

fn run_group(a: RunArgs) -> Result<()> {
    let policy = match (a.policy, &a.takeover) {
        // Taking over without a policy: keep the old group's.
        (None, Some(name)) => Control::open(Some(name))?.status()?.policy,
        (kind, _) => Policy {
            kind: kind.unwrap_or(PolicyKind::Cpu),
            key: a.hash_key,
            seed: a.seed,
            weights: a.weights.clone().map(|w| w.0).unwrap_or_default(),
        },
    };
    run_with(policy, a)
}

fn run_with(policy: Policy, a: RunArgs) -> Result<()> {
    let mut builder = Group::builder()
        .addr(a.addr)
        .proto(a.proto)
        .policy(policy)
        .backlog(a.serve.backlog)
        .program(&a.bpf_program)
        // The program owns its machine's setup, as a server does: bpffs
        // for the pins, and queued connections handed on at close under
        // the kernel policy.
        .mount_bpffs(true)
        .tcp_migrate_req(true)
        .flow_table_size(a.flow_table_size)
        .flow_timeout(a.flow_timeout);
    if let Some(n) = a.workers {
        builder = builder.workers(n);
    }
    if let Some(path) = &a.bpf_object {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading the eBPF object {}", path.display()), e))?;
        builder = builder.object(bytes);
    }
    if let Some(name) = a.group {
        builder = builder.name(name);
    }
    if let Some(name) = a.takeover {
        builder = builder.takeover(name);
    }
    let mut options = a.serve.options();
    options.bpf_stats = a.bpf_stats;
    serve(builder.build()?, options)
}

/// Serves `group` with the echo service until a signal, printing what a
/// user (and the tests) look for: the policy, the workers, the group's
/// name, the metrics address, then "ready".
fn serve(group: Group, options: ServeOptions) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "policy {}", group.policy()?);
    if let (Some(name), Some(dir)) = (group.name(), group.pin_dir_shown()) {
        let _ = writeln!(out, "group {name} (maps pinned in {})", dir.display());
    }
    for m in group.members() {
        let _ = writeln!(out, "worker {}: slot {}, cpu {}", m.slot, m.slot, m.cpu);
    }
    let workers = group.members().len();
    let server = Server::start_echo(group, options)?;
    if let Some(addr) = server.metrics_addr() {
        let _ = writeln!(out, "metrics on http://{addr}/metrics");
    }
    let ready = format!(
        "ready: serving {} {} with {workers} workers",
        server.proto(),
        server.local_addr()
    );
    server::serve_until_signalled(server, move || {
        let _ = writeln!(out, "{ready}");
        let _ = out.flush();
    })
}
