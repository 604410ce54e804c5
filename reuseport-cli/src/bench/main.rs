//! `reuseport-bench` (also run as `reuseport bench`): every steering policy
//! and the classic server models, measured side by side in one run on this
//! machine.
//!
//! The run isolates itself in a network namespace of its own (so the
//! kernel's drop counters are its own), starts every model on its own
//! port, and then runs each workload over all models in short interleaved
//! epochs (A B C … A B C …), so that a noisy neighbour hits every model
//! alike. Figures are ratios within the run wherever a target is set.

//!
//! It is a program of its own, apart from the `reuseport` server, because
//! its charts (plotters, with TrueType text) link fontconfig and freetype.

mod cost;
mod load;
mod models;
mod quic;
mod readme;
mod report;

use std::{
    collections::BTreeMap, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration,
};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use load::{Outcome, Shape};
use models::{Model, Running};
use reuseport::{
    balance::balance,
    error::{Error, Result},
    socket::Proto,
    sys,
};

/// Measure every steering policy and the classic server designs side by
/// side, on this machine, in one run.
#[derive(Debug, Parser)]
#[command(
    name = "reuseport-bench",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
    #[command(subcommand)]
    child: Option<Child>,
}

/// The benchmark's own child processes.
#[derive(Debug, Subcommand)]
enum Child {
    /// The client process for idle connections (internal).
    #[command(hide = true)]
    BenchHold {
        /// Where to connect.
        #[arg(long)]
        addr: SocketAddr,
        /// How many connections to hold.
        #[arg(long)]
        count: usize,
    },
    /// Write the README's figures (the block between its markers) from a
    /// committed run; with --check, only fail if they differ.
    Readme {
        /// The run's directory (its results.csv and report.md).
        #[arg(long, default_value = "docs/bench")]
        results: PathBuf,
        /// The README to write.
        #[arg(long, default_value = "README.md")]
        readme: PathBuf,
        /// Change nothing; exit non-zero if the README's figures are not
        /// the run's.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let done = match cli.child {
        Some(Child::BenchHold { addr, count }) => {
            load::hold_child(addr, count).map_err(|e| one_line(&e))
        }
        Some(Child::Readme {
            results,
            readme,
            check,
        }) => readme::update(&results, &readme, check),
        None => bench(cli.args),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Options of `reuseport-bench`.
#[derive(Debug, Args)]
struct BenchArgs {
    /// A short run (well under a minute), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the CSV, JSON and SVG files [default: target/bench/TIME].
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Exit non-zero unless the run was clean: every model measured, every
    /// echo verified, nothing dropped by the kernel.
    #[arg(long)]
    pub check: bool,
    /// Only these models (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these workloads (comma-separated: connection-rate, bpf-cost,
    /// bpf-cost-by-workers, distribution, persistent-echo, open-loop-latency, skewed-mix,
    /// idle-memory, udp-echo).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Instead: steady connection churn for MINUTES, reporting open
    /// descriptors, memory and every failure (they must stay flat).
    #[arg(long, value_name = "MINUTES", value_parser = soak_minutes)]
    pub soak: Option<f64>,
    /// Instead: N QUIC connections with streams in flight while the
    /// busiest of 3 workers drains, a worker is added and a new generation
    /// takes the group over (a restart), under the `quic` key and under the
    /// kernel's hash; reports the connections broken (with --check: none
    /// may break under the `quic` key).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub quic_churn: Option<u32>,
}

fn soak_minutes(s: &str) -> std::result::Result<f64, String> {
    bounded(s, 0.05..=10_080.0)
}

/// A number in `range`.
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

fn bench(args: BenchArgs) -> std::result::Result<(), String> {
    if let Some(minutes) = args.soak {
        let every = Duration::from_secs(if minutes < 1.0 { 5 } else { 30 });
        let soak = soak(minutes, every, args.out).map_err(|e| one_line(&e))?;
        println!("{}", report::soak_markdown(&soak));
        if !soak.flat {
            return Err(not_clean(
                "descriptors or memory grew, or connections failed",
            ));
        }
        return Ok(());
    }
    if let Some(n) = args.quic_churn {
        return quic_churn(n as usize, args.out, args.check);
    }
    let options = BenchOptions {
        quick: args.quick,
        out: args.out,
        only: args.only,
        workloads: args.workloads,
    };
    let report = run(&options).map_err(|e| one_line(&e))?;
    println!("{}", report::markdown(&report));
    if args.check && !report.clean {
        return Err(not_clean(&report.problems.join("; ")));
    }
    Ok(())
}

/// `--quic-churn N`: in a network namespace of its own, the QUIC churn of
/// [`quic::run`], printed as Markdown and written as `quic-churn.json`.
fn quic_churn(n: usize, out: Option<PathBuf>, check: bool) -> std::result::Result<(), String> {
    let rows = (|| {
        sys::check_bpf_privilege("the QUIC churn run")?;
        isolate()?;
        quic::run(n)
    })()
    .map_err(|e| one_line(&e))?;
    println!("{}", quic::markdown(&rows));
    let dir = out.unwrap_or_else(|| PathBuf::from("target/bench/quic-churn"));
    std::fs::create_dir_all(&dir)
        .and_then(|()| {
            let json = serde_json::to_string_pretty(&rows).map_err(std::io::Error::other)?;
            std::fs::write(dir.join("quic-churn.json"), json)
        })
        .map_err(|e| format!("writing {}: {e}", dir.display()))?;
    let ours = &rows[0];
    if check && (ours.broken > 0 || ours.failed_to_connect > 0 || ours.connections != n) {
        return Err(not_clean(&format!(
            "{}: {} of {n} connections broken, {} failed to connect ({})",
            ours.model,
            ours.broken,
            ours.failed_to_connect,
            ours.first_failure.as_deref().unwrap_or("-")
        )));
    }
    Ok(())
}

/// The benchmark's verdict on a run with failures, missing figures or
/// kernel drops.
fn not_clean(problems: &str) -> String {
    format!("the benchmark run was not clean: {problems}")
}

/// The error and its causes on one line.
fn one_line(e: &Error) -> String {
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
/// Options of a benchmark run.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// A short run (well under a minute) with fewer, shorter epochs.
    pub quick: bool,
    /// Where to write CSV, JSON and SVG (default `target/bench/<time>`).
    pub out: Option<PathBuf>,
    /// Only these models (by name); all when empty.
    pub only: Vec<String>,
    /// Only these workloads (by name); all when empty.
    pub workloads: Vec<String>,
}

/// How long and how hard.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Length of one epoch, in milliseconds.
    pub epoch_ms: u64,
    /// Epochs per model and workload.
    pub rounds: usize,
    /// Concurrent clients per client thread (one thread per CPU).
    pub clients_per_cpu: usize,
    /// Connections of the distribution pass, per model.
    pub distribution_connections: usize,
    /// Long connections of the skewed mix.
    pub skew_long: usize,
    /// Idle connections held to measure memory per connection.
    pub idle_connections: usize,
}

impl Settings {
    fn for_run(quick: bool) -> Self {
        if quick {
            Settings {
                epoch_ms: 200,
                rounds: 2,
                clients_per_cpu: 8,
                distribution_connections: 2_000,
                skew_long: 8,
                idle_connections: 2_000,
            }
        } else {
            Settings {
                epoch_ms: 1_000,
                rounds: 5,
                clients_per_cpu: 16,
                distribution_connections: 10_000,
                skew_long: 16,
                idle_connections: 10_000,
            }
        }
    }

    fn epoch(&self) -> Duration {
        Duration::from_millis(self.epoch_ms)
    }
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    fn of(o: &Outcome) -> Self {
        let h = &o.latency;
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A spread over workers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    /// Count per worker.
    pub per_worker: Vec<u64>,
    /// Busiest over mean (1 is even).
    pub max_over_mean: f64,
    /// Jain's fairness index (1 is even).
    pub jain: f64,
}

impl Spread {
    fn of(counts: Vec<u64>) -> Self {
        let b = balance(&counts);
        Spread {
            max_over_mean: b.map_or(f64::NAN, |b| b.max_over_mean),
            jain: b.map_or(f64::NAN, |b| b.jain),
            per_worker: counts,
        }
    }
}

/// One model's figures in one workload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// The model.
    pub model: String,
    /// Operations per second (connections, requests or datagrams).
    pub rate: f64,
    /// Operations completed and verified.
    pub ops: u64,
    /// Operations that failed (client side) plus server-side errors.
    pub errors: u64,
    /// The first failures, if any.
    pub failures: Vec<String>,
    /// Latency.
    pub latency: Percentiles,
    /// How the work was spread over workers.
    pub spread: Spread,
    /// Share served on the CPU that received it (0 to 1).
    pub locality: Option<f64>,
    /// The program's run time per selection, in nanoseconds.
    pub bpf_ns: Option<f64>,
    /// `bpf_ns` over the floor program's, in the same run.
    pub bpf_ratio: Option<f64>,
    /// The group's worker count, where a workload varies it.
    pub workers: Option<usize>,
    /// Resident memory per idle connection, in bytes.
    pub bytes_per_connection: Option<f64>,
}

/// One workload's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Its name.
    pub name: String,
    /// What `rate` counts.
    pub unit: String,
    /// What was measured, in a sentence.
    pub about: String,
    /// One row per model.
    pub rows: Vec<Row>,
}

/// A target of the project and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is measured.
    pub what: String,
    /// The goal.
    pub goal: String,
    /// The figure of this run.
    pub value: String,
    /// Whether it was met.
    pub met: bool,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When it started (RFC 3339).
    pub started: String,
    /// The kernel release.
    pub kernel: String,
    /// The machine's load average (1 minute) when the run started and when
    /// it ended: how quiet the machine was (the run's own threads count).
    pub load: (f64, f64),
    /// CPUs used (servers and clients share them).
    pub cpus: Vec<usize>,
    /// The settings.
    pub settings: Settings,
    /// The workloads.
    pub workloads: Vec<Workload>,
    /// The project's targets.
    pub targets: Vec<Target>,
    /// Kernel drop counters that moved during the run (must be none).
    pub drops: BTreeMap<String, u64>,
    /// Whether every model produced figures, every echo was verified and
    /// nothing was dropped.
    pub clean: bool,
    /// Why not, if not.
    pub problems: Vec<String>,
}

struct Bench {
    settings: Settings,
    cpus: Vec<usize>,
    progress: ProgressBar,
    /// `--only`: the models to run (all when empty).
    only: Vec<String>,
}

impl Bench {
    fn shape(&self) -> Shape {
        Shape {
            cpus: self.cpus.clone(),
            per_thread: self.settings.clients_per_cpu,
        }
    }

    fn step(&self, what: &str) {
        self.progress.set_message(what.to_string());
        self.progress.inc(1);
    }

    /// Runs `epoch` for every model, `rounds` times, interleaved.
    fn interleaved(
        &self,
        workload: &str,
        models: &[Running],
        mut epoch: impl FnMut(&Running) -> Outcome,
    ) -> Vec<Outcome> {
        let mut total: Vec<Outcome> = models.iter().map(|_| Outcome::empty()).collect();
        for _ in 0..self.settings.rounds {
            for (i, m) in models.iter().enumerate() {
                self.step(&format!("{workload}: {}", m.model.name));
                let o = epoch(m);
                total[i].merge(&o);
            }
        }
        total
    }
}

/// One sample of a soak run.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    /// Seconds since the start.
    pub seconds: u64,
    /// Connections echoed so far.
    pub connections: u64,
    /// Failures so far.
    pub errors: u64,
    /// Open file descriptors of the process.
    pub fds: usize,
    /// Resident memory, in bytes.
    pub rss: u64,
}

/// A soak run: steady churn, and whether descriptors and memory stayed flat.
#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    /// Samples, one per interval.
    pub samples: Vec<SoakSample>,
    /// Every distinct failure seen.
    pub failures: Vec<String>,
    /// Whether descriptors and memory ended where they started (within a
    /// small margin) and nothing failed.
    pub flat: bool,
}

/// Runs the echo server of `reuseport run` (round robin over a worker per
/// CPU) under steady connection churn for `minutes`, sampling descriptors
/// and memory every `every`.
pub fn soak(minutes: f64, every: Duration, out: Option<PathBuf>) -> Result<Soak> {
    sys::check_bpf_privilege("the soak run")?;
    isolate()?;
    sys::raise_fd_limit();
    let cpus = sys::usable_cpus()?;
    let group = reuseport::Group::builder()
        .addr(SocketAddr::from(([127, 0, 0, 1], 24_000)))
        .workers(cpus.len())
        .cpus(cpus.clone())
        .policy(reuseport::Policy::new(reuseport::PolicyKind::RoundRobin))
        .pin(false)
        .build()?;
    let server =
        reuseport::server::Server::start_echo(group, reuseport::server::ServeOptions::default())?;
    let addr = server.local_addr();
    let shape = Shape {
        cpus,
        per_thread: 8,
    };
    let total = Duration::from_secs_f64(minutes * 60.0);
    let started = std::time::Instant::now();
    let sample = |o: &Outcome| SoakSample {
        seconds: started.elapsed().as_secs(),
        connections: o.ops,
        errors: o.errors,
        fds: sys::open_fds(),
        rss: sys::resident_bytes(),
    };
    // A short warm-up, so allocator and runtime pools are at their size.
    let _ = load::connection_rate(addr, &shape, Duration::from_secs(2));
    let mut all = Outcome::empty();
    let mut samples = vec![sample(&all)];
    let mut failures: Vec<String> = Vec::new();
    while started.elapsed() < total {
        let o = load::connection_rate(
            addr,
            &shape,
            every
                .min(total.saturating_sub(started.elapsed()))
                .max(Duration::from_millis(100)),
        );
        for f in &o.failures {
            if !failures.contains(f) {
                failures.push(f.clone());
            }
        }
        all.merge(&o);
        samples.push(sample(&all));
        eprintln!(
            "soak: {:>5} s, {} connections, {} failed, {} fds, {} MiB",
            samples.last().map_or(0, |s| s.seconds),
            all.ops,
            all.errors,
            sys::open_fds(),
            sys::resident_bytes() >> 20
        );
    }
    server.shutdown()?;
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let flat = all.errors == 0
        && last.fds <= first.fds + 8
        && last.rss <= first.rss + first.rss / 10 + (4 << 20);
    let soak = Soak {
        samples,
        failures,
        flat,
    };
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let json =
            serde_json::to_vec_pretty(&soak).map_err(|e| Error::io("encoding JSON", e.into()))?;
        std::fs::write(dir.join("soak.json"), json)
            .map_err(|e| Error::io("writing soak.json", e))?;
    }
    Ok(soak)
}

/// Runs the benchmark and writes its files; returns the report.
pub fn run(options: &BenchOptions) -> Result<Report> {
    sys::check_bpf_privilege("benchmarking the steering policies")?;
    isolate()?;
    sys::raise_fd_limit();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let load_before = load_average();
    let settings = Settings::for_run(options.quick);
    let cpus = sys::usable_cpus()?;
    let keep = |m: &Model| options.only.is_empty() || options.only.contains(&m.name);
    let tcp_models: Vec<Model> = models::tcp_models(cpus.len())
        .into_iter()
        .filter(keep)
        .collect();
    let udp_models: Vec<Model> = models::udp_models(cpus.len())
        .into_iter()
        .filter(keep)
        .collect();
    let wanted = |w: &str| options.workloads.is_empty() || options.workloads.iter().any(|o| o == w);
    let r = settings.rounds as u64;
    let epochs = r * (4 * tcp_models.len() as u64 + udp_models.len() as u64)
        + tcp_models.len() as u64 * 2
        + cost::epochs(settings.rounds, wanted("bpf-cost-by-workers"));
    let progress = ProgressBar::new(epochs);
    progress.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let bench = Bench {
        settings: settings.clone(),
        cpus: cpus.clone(),
        progress,
        only: options.only.clone(),
    };
    let before = drop_counters();

    let mut workloads = Vec::new();
    let tcp = start_all(&tcp_models, Proto::Tcp, 21_000, &cpus)?;
    if wanted("connection-rate") {
        workloads.push(connection_rate(&bench, &tcp));
    }
    if wanted("bpf-cost") {
        workloads.push(cost::bpf_cost(&bench, 25_000)?);
    }
    if wanted("bpf-cost-by-workers") {
        workloads.push(cost::by_workers(&bench, 26_000)?);
    }
    if wanted("distribution") {
        workloads.push(distribution(&bench, &tcp));
    }
    if wanted("persistent-echo") || wanted("open-loop-latency") {
        let closed = persistent(&bench, &tcp);
        // Open loop at half the rate the slowest model sustained closed
        // loop: a load every model can carry, heavy enough to matter.
        let slowest = closed
            .rows
            .iter()
            .map(|r| r.rate)
            .fold(f64::INFINITY, f64::min);
        let rate = if slowest.is_finite() && slowest > 0.0 {
            slowest / 2.0
        } else {
            1_000.0
        };
        workloads.push(closed);
        workloads.push(open_loop(&bench, &tcp, rate));
    }
    if wanted("skewed-mix") {
        workloads.push(skewed(&bench, &tcp));
    }
    for m in tcp {
        m.stop();
    }
    if wanted("idle-memory") {
        workloads.push(idle_memory(&bench)?);
    }
    if wanted("udp-echo") {
        let udp = start_all(&udp_models, Proto::Udp, 22_000, &cpus)?;
        workloads.push(udp_echo(&bench, &udp));
        for m in udp {
            m.stop();
        }
    }
    bench.progress.finish_and_clear();

    let after = drop_counters();
    let drops: BTreeMap<String, u64> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect();
    let mut problems = Vec::new();
    for w in &workloads {
        for row in &w.rows {
            if row.ops == 0 {
                problems.push(format!("{}: {} produced no figures", w.name, row.model));
            }
            if row.errors > 0 {
                problems.push(format!(
                    "{}: {} had {} failures ({})",
                    w.name,
                    row.model,
                    row.errors,
                    row.failures.join("; ")
                ));
            }
        }
    }
    for (k, v) in &drops {
        problems.push(format!("the kernel counted {v} {k}"));
    }
    let targets = report::targets(&workloads, options.quick);
    let report = Report {
        started,
        kernel: sys::kernel_release().unwrap_or_default(),
        load: (load_before, load_average()),
        cpus,
        settings,
        workloads,
        targets,
        drops,
        clean: problems.is_empty(),
        problems,
    };
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench").join(&report.started));
    report::write(&report, &out)?;
    Ok(report)
}

/// The echo server of `reuseport run` (thread-per-core, round robin over
/// the CPUs' workers) holding many idle connections: its resident memory
/// per connection, and whether every connection still echoes.
fn idle_memory(bench: &Bench) -> Result<Workload> {
    let n = bench.settings.idle_connections;
    bench.step(&format!("idle memory: {n} connections"));
    let group = reuseport::Group::builder()
        .addr(SocketAddr::from(([127, 0, 0, 1], 23_000)))
        .workers(bench.cpus.len())
        .cpus(bench.cpus.clone())
        .policy(reuseport::Policy::new(reuseport::PolicyKind::RoundRobin))
        .pin(false)
        .build()?;
    let mut options = reuseport::server::ServeOptions::default();
    options.limits.max_connections = n;
    let server = reuseport::server::Server::start_echo(group, options)?;
    let addr = server.local_addr();
    std::thread::sleep(Duration::from_millis(300));
    let before = sys::resident_bytes();
    // The clients run in a child process: their descriptors and memory are
    // not the server's (and the two together would not fit one process's
    // open-file limit).
    let started = std::time::Instant::now();
    let mut child = load::HoldChild::spawn(addr, n)?;
    let mut outcome = child.held()?;
    outcome.elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = sys::resident_bytes();
    let again = child.echo_all()?;
    outcome.merge(&again);
    server.shutdown()?;
    let per = after.saturating_sub(before) as f64 / n.max(1) as f64;
    let mut row = Row {
        model: "echo server (round-robin)".into(),
        rate: outcome.rate(),
        ops: outcome.ops,
        errors: outcome.errors,
        failures: outcome.failures.clone(),
        latency: Percentiles::of(&outcome),
        ..Default::default()
    };
    row.bytes_per_connection = Some(per);
    Ok(Workload {
        name: "idle-memory".into(),
        unit: "conn/s".into(),
        about: format!(
            "{n} connections opened and held idle (each echoed once, then once more at the end); resident memory of the server per idle connection"
        ),
        rows: vec![row],
    })
}

fn start_all(
    models: &[Model],
    proto: Proto,
    base_port: u16,
    cpus: &[usize],
) -> Result<Vec<Running>> {
    models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let addr = SocketAddr::from(([127, 0, 0, 1], base_port + i as u16));
            models::start(m, addr, proto, cpus)
        })
        .collect()
}

fn row(model: &Running, o: &Outcome) -> Row {
    Row {
        model: model.model.name.clone(),
        rate: o.rate(),
        ops: o.ops,
        errors: o.errors,
        failures: o.failures.clone(),
        latency: Percentiles::of(o),
        ..Default::default()
    }
}

fn server_errors(models: &[Running]) -> Vec<u64> {
    models
        .iter()
        .map(|m| m.tally.errors.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

fn connection_rate(bench: &Bench, models: &[Running]) -> Workload {
    let shape = bench.shape();
    let served_before: Vec<(Vec<u64>, u64)> = models
        .iter()
        .map(|m| (m.tally.served(), local(m)))
        .collect();
    let outcomes = bench.interleaved("connection rate", models, |m| {
        load::connection_rate(m.addr, &shape, bench.settings.epoch())
    });
    let rows = models
        .iter()
        .zip(&outcomes)
        .zip(served_before)
        .map(|((m, o), (served, loc))| {
            let now = m.tally.served();
            let total: u64 = now.iter().zip(&served).map(|(a, b)| a - b).sum();
            let mut r = row(m, o);
            r.locality = (total > 0).then(|| (local(m) - loc) as f64 / total as f64);
            r
        })
        .collect();
    Workload {
        name: "connection-rate".into(),
        unit: "conn/s".into(),
        about: "connect, echo 64 bytes, close, as fast as the clients go (closed loop); latency of the whole connection".into(),
        rows,
    }
}

fn local(m: &Running) -> u64 {
    m.tally.local.load(std::sync::atomic::Ordering::Relaxed)
}

fn distribution(bench: &Bench, models: &[Running]) -> Workload {
    let shape = bench.shape();
    let n = bench.settings.distribution_connections;
    let rows = models
        .iter()
        .map(|m| {
            bench.step(&format!("distribution: {}", m.model.name));
            let before = m.tally.served();
            let o = load::connections(m.addr, &shape, n);
            let counts: Vec<u64> = m
                .tally
                .served()
                .iter()
                .zip(&before)
                .map(|(a, b)| a - b)
                .collect();
            let mut r = row(m, &o);
            r.spread = Spread::of(counts);
            r
        })
        .collect();
    Workload {
        name: "distribution".into(),
        unit: "conn/s".into(),
        about: format!(
            "{n} connections from many source addresses; how they spread over the workers"
        ),
        rows,
    }
}

fn persistent(bench: &Bench, models: &[Running]) -> Workload {
    let shape = bench.shape();
    let outcomes = bench.interleaved("persistent echo", models, |m| {
        load::persistent(m.addr, &shape, bench.settings.epoch())
    });
    Workload {
        name: "persistent-echo".into(),
        unit: "req/s".into(),
        about: "one connection per client, 64-byte requests back to back (closed loop)".into(),
        rows: models
            .iter()
            .zip(&outcomes)
            .map(|(m, o)| row(m, o))
            .collect(),
    }
}

fn open_loop(bench: &Bench, models: &[Running], rate: f64) -> Workload {
    let threads = 2 * bench.cpus.len();
    let outcomes = bench.interleaved("open-loop latency", models, |m| {
        load::open_loop(m.addr, &bench.cpus, threads, rate, bench.settings.epoch())
    });
    Workload {
        name: "open-loop-latency".into(),
        unit: "req/s".into(),
        about: format!(
            "persistent connections sending {rate:.0} requests/s in all at fixed times, latency from when each was due (no coordinated omission)"
        ),
        rows: models.iter().zip(&outcomes).map(|(m, o)| row(m, o)).collect(),
    }
}

fn skewed(bench: &Bench, models: &[Running]) -> Workload {
    let shape = bench.shape();
    let long = bench.settings.skew_long;
    let rows = models
        .iter()
        .map(|m| {
            let mut total = Outcome::empty();
            let mut worst = Spread::default();
            for _ in 0..bench.settings.rounds {
                bench.step(&format!("skewed mix: {}", m.model.name));
                let (o, open) = load::skewed(m.addr, &shape, long, bench.settings.epoch(), || {
                    m.tally.open()
                });
                total.merge(&o);
                let spread = Spread::of(open);
                if worst.per_worker.is_empty() || spread.max_over_mean > worst.max_over_mean {
                    worst = spread;
                }
            }
            let mut r = row(m, &total);
            r.spread = worst;
            r
        })
        .collect();
    Workload {
        name: "skewed-mix".into(),
        unit: "conn/s".into(),
        about: format!(
            "{long} long connections opened between short ones, then short ones churned; the spread is of the connections open at the end of the worst epoch (the long ones)"
        ),
        rows,
    }
}

fn udp_echo(bench: &Bench, models: &[Running]) -> Workload {
    let shape = Shape {
        cpus: bench.cpus.clone(),
        per_thread: 4,
    };
    let before: Vec<(Vec<u64>, u64)> = models
        .iter()
        .map(|m| (m.tally.served(), local(m)))
        .collect();
    let errors_before = server_errors(models);
    let outcomes = bench.interleaved("UDP echo", models, |m| {
        load::udp(m.addr, &shape, bench.settings.epoch())
    });
    let errors_after = server_errors(models);
    let rows = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (served, loc) = &before[i];
            let counts: Vec<u64> = m
                .tally
                .served()
                .iter()
                .zip(served)
                .map(|(a, b)| a - b)
                .collect();
            let total: u64 = counts.iter().sum();
            let mut r = row(m, &outcomes[i]);
            r.errors += errors_after[i] - errors_before[i];
            r.locality = (total > 0).then(|| (local(m) - loc) as f64 / total as f64);
            r.spread = Spread::of(counts);
            r
        })
        .collect();
    Workload {
        name: "udp-echo".into(),
        unit: "dgram/s".into(),
        about: "64-byte datagrams echoed, each client waiting for its echo (closed loop)".into(),
        rows,
    }
}

/// Moves this process into a network namespace of its own, with `lo` up,
/// so that nothing else competes for its ports and the kernel's drop
/// counters count only its traffic.
fn isolate() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::io("unshare(CLONE_NEWNET) for the benchmark", e.into()))?;
    sys::set_loopback_up()
}

/// The 1-minute load average (`/proc/loadavg`), NaN if unreadable.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The kernel's drop counters of this namespace (see [`sys::drop_counters`]).
pub fn drop_counters() -> BTreeMap<String, u64> {
    sys::drop_counters()
}
