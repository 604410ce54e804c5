//! `cluster`: several hosts, each serving a `reuseport` group, behind a
//! front-end, in network namespaces on this machine; measures affinity at
//! both levels, a host leaving and a worker draining, and writes the
//! tables to `--out` (`cargo xtask cluster` runs it; needs root).

use std::{fmt::Write as _, path::PathBuf, process::ExitCode, thread, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use reuseport_tests::cluster::{
    compare, install_interrupt_handler, kernel_release, Cluster, FrontEnd, Hash, LoadReport,
    Options, Pass, MAX_KEYS, PORT, VIP,
};

/// Several hosts behind a front-end (ECMP or IPVS), each running a steered
/// group; measures affinity, a host leaving and a worker draining.
#[derive(Debug, Parser)]
#[command(name = "cluster")]
struct Args {
    /// Client keys (source addresses of 198.18.0.0/18), at most 16382.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Hosts (1 to 50).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Workers of each host's group.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Front-ends to measure (multipath, resilient, ipvs); those this
    /// machine cannot run are reported as such [default: all].
    #[arg(long, value_delimiter = ',')]
    front: Vec<String>,
    /// Which hosts leave, one at a time: `all` or a comma-separated list.
    #[arg(long, default_value = "all")]
    leave: String,
    /// Buckets of the resilient nexthop group.
    #[arg(long, default_value_t = 256)]
    buckets: u16,
    /// Clients of the steady load run through each change.
    #[arg(long, default_value_t = 32)]
    load_threads: usize,
    /// How long each load connection stays open between its two exchanges.
    #[arg(long, default_value = "100ms", value_parser = humantime_ms)]
    hold: Duration,
    /// Seed of the router's multipath hash.
    #[arg(long, default_value_t = 1)]
    ecmp_seed: u32,
    /// Where to write report.md [default: print only].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `reuseport` binary [default: $REUSEPORT_BIN, else next to this one].
    #[arg(long)]
    bin: Option<PathBuf>,
}

/// `100ms`, `2s`: a whole number of milliseconds or seconds.
fn humantime_ms(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}`: give a duration such as 100ms or 2s");
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse().map(Duration::from_millis).map_err(|_| bad())
    } else if let Some(secs) = s.strip_suffix('s') {
        secs.parse().map(Duration::from_secs).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn binary(args: &Args) -> Result<PathBuf> {
    if let Some(b) = &args.bin {
        return Ok(b.clone());
    }
    if let Some(b) = std::env::var_os("REUSEPORT_BIN") {
        return Ok(b.into());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let bin = exe.with_file_name("reuseport");
    if !bin.exists() {
        bail!(
            "{} is missing: build it, or give --bin (cargo xtask cluster does both)",
            bin.display()
        );
    }
    Ok(bin)
}

/// One front-end's rows.
struct FrontRows {
    affinity: String,
    leaves: Vec<String>,
}

fn run(args: &Args) -> Result<()> {
    if args.keys == 0 || args.keys > MAX_KEYS {
        bail!("--keys: 1 to {MAX_KEYS}, not {}", args.keys);
    }
    if args.workers == 0 || args.workers > 64 {
        bail!("--workers: 1 to 64, not {}", args.workers);
    }
    let leave: Vec<usize> = if args.leave == "all" {
        (0..args.hosts).collect()
    } else {
        args.leave
            .split(',')
            .map(|s| match s.trim().parse::<usize>() {
                Ok(i) if i < args.hosts => Ok(i),
                _ => bail!("--leave: `all` or host numbers below {}", args.hosts),
            })
            .collect::<Result<_>>()?
    };
    if args.hosts < 2 && !leave.is_empty() {
        bail!("a host can leave only if another remains: use --hosts 2 or more, or --leave ''");
    }
    let wanted: Vec<String> = if args.front.is_empty() {
        vec!["multipath".into(), "resilient".into(), "ipvs".into()]
    } else {
        args.front.clone()
    };
    for f in &wanted {
        if !["multipath", "resilient", "ipvs"].contains(&f.as_str()) {
            bail!("--front: multipath, resilient or ipvs, not `{f}`");
        }
    }
    install_interrupt_handler()?;

    let opts = Options {
        hosts: args.hosts,
        workers: args.workers,
        ecmp_seed: args.ecmp_seed,
        binary: binary(args)?,
    };
    println!(
        "cluster: {} hosts x {} workers (consistent, src-ip), {} keys, kernel {}",
        args.hosts,
        args.workers,
        args.keys,
        kernel_release()
    );
    let mut cluster = Cluster::build(opts).context("building the topology")?;
    println!(
        "cluster: namespaces {}, {}, {}; service {VIP}:{PORT}",
        cluster.client,
        cluster.router,
        cluster
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut fronts = Vec::new();
    let mut unavailable = Vec::new();
    for f in &wanted {
        match f.as_str() {
            "multipath" => fronts.push(FrontEnd::Multipath),
            "resilient" => match cluster.resilient_available() {
                Ok(()) => fronts.push(FrontEnd::Resilient {
                    buckets: args.buckets,
                }),
                Err(e) => unavailable.push(format!("resilient nexthop groups: {e}")),
            },
            _ => match cluster.ipvs_available() {
                Ok(()) => fronts.push(FrontEnd::Ipvs),
                Err(e) => unavailable.push(format!("IPVS mh: {e}")),
            },
        }
    }
    for u in &unavailable {
        println!("cluster: not measured here: {u}");
    }
    if fronts.is_empty() {
        bail!("no front-end to measure");
    }

    let all: Vec<usize> = (0..args.hosts).collect();
    let mut rows = Vec::new();
    // First the L4 hash policy as it is (1), to show what it does between
    // namespaces; then the same 5-tuple hashed from the headers (3).
    println!("\n== ECMP multipath route, fib_multipath_hash_policy=1");
    cluster.set_hash(Hash::L4)?;
    cluster.set_front(FrontEnd::Multipath, &all, true)?;
    let a = pass(&cluster, args.keys, "first pass")?;
    let b = pass(&cluster, args.keys, "second pass")?;
    let policy1 = affinity_row(
        "ECMP multipath route, hash policy 1 (the socket's random hash, see below)",
        args,
        &a,
        &b,
    );
    cluster.set_hash(Hash::Headers)?;
    for &front in &fronts {
        println!("\n== {}", front.name());
        cluster.set_front(front, &all, true)?;
        let a = pass(&cluster, args.keys, "first pass")?;
        let b = pass(&cluster, args.keys, "second pass")?;
        let affinity = affinity_row(&front.name(), args, &a, &b);
        let mut leaves = Vec::new();
        for &x in &leave {
            cluster.set_front(front, &all, true)?;
            let base = pass(&cluster, args.keys, &format!("before host {x} leaves"))?;
            let rebuilt = compare(&a, &base);
            let members: Vec<usize> = all.iter().copied().filter(|&h| h != x).collect();
            let load =
                change_under_load(&cluster, args, || cluster.set_front(front, &members, false))?;
            let after = pass(&cluster, args.keys, &format!("after host {x} left"))?;
            leaves.push(leave_row(
                front,
                x,
                &base,
                &after,
                &load,
                rebuilt.same == rebuilt.compared,
            ));
        }
        rows.push(FrontRows { affinity, leaves });
    }

    // A worker drains, behind the ECMP front-end that moves the fewest keys.
    let front = *fronts
        .iter()
        .find(|f| matches!(f, FrontEnd::Resilient { .. }))
        .unwrap_or(&fronts[0]);
    println!("\n== a worker drains ({})", front.name());
    cluster.set_front(front, &all, true)?;
    let before = pass(&cluster, args.keys, "before the drain")?;
    let per_worker = before.per_worker(0);
    let (&worker, _) = per_worker
        .iter()
        .max_by_key(|(_, n)| **n)
        .context("host 0 served no key")?;
    let load = change_under_load(&cluster, args, || cluster.drain(0, worker))?;
    let after = pass(&cluster, args.keys, "after the drain")?;
    let drain = drain_row(front, 0, worker, &before, &after, &load);

    let report = render(args, &policy1, &rows, &drain, &unavailable);
    println!("\n{report}");
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("report.md");
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
        println!("cluster: wrote {}", path.display());
    }
    cluster.teardown();
    Ok(())
}

/// Runs `change` while a steady load runs: half a second of load before,
/// the change, a second and a half after.
fn change_under_load(
    cluster: &Cluster,
    args: &Args,
    change: impl FnOnce() -> Result<()>,
) -> Result<LoadReport> {
    let load = cluster.load(args.load_threads, args.hold)?;
    thread::sleep(Duration::from_millis(500));
    let changed = change();
    thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    changed?;
    println!(
        "   load through the change: {} completed, {} reset, {} failed{}",
        report.completed,
        report.reset,
        report.failed,
        if report.errors.is_empty() {
            String::new()
        } else {
            format!(" (e.g. {})", report.errors[0])
        }
    );
    Ok(report)
}

fn pass(cluster: &Cluster, keys: usize, what: &str) -> Result<Pass> {
    let p = cluster
        .probe(keys)
        .with_context(|| format!("probing ({what})"))?;
    println!(
        "   {what}: {} keys in {:.1} s, per host {:?}, {} failed, {} extra selections, {} SYNs sent again{}",
        keys,
        p.elapsed.as_secs_f64(),
        p.per_host(cluster.hosts.len()),
        p.failed,
        p.extra_selections,
        p.syn_retransmits,
        p.failures
            .first()
            .map(|f| format!(" (e.g. {f})"))
            .unwrap_or_default()
    );
    Ok(p)
}

fn affinity_row(name: &str, args: &Args, a: &Pass, b: &Pass) -> String {
    let m = compare(a, b);
    let per_host = a.per_host(args.hosts);
    let balance: Vec<String> = (0..args.hosts)
        .map(|h| format!("{:.2}", max_over_mean(&a.per_worker(h), args.workers)))
        .collect();
    format!(
        "| {name} | {} | {} | {} of {} ({}) | {} | {} | {} |",
        args.keys,
        per_host
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
        m.same,
        m.compared,
        pct(m.same, m.compared),
        balance.join(" / "),
        a.failed + b.failed,
        yes_no(a.placed_by_program && b.placed_by_program),
    )
}

fn leave_row(
    front: FrontEnd,
    host: usize,
    base: &Pass,
    after: &Pass,
    load: &LoadReport,
    rebuilt_same: bool,
) -> String {
    let mut its = 0;
    let mut moved = 0;
    let mut others_moved = 0;
    let mut stayed = 0;
    let mut kept_worker = 0;
    let mut compared = 0;
    for (x, y) in base.placed.iter().zip(&after.placed) {
        let (Some(x), Some(y)) = (x, y) else { continue };
        compared += 1;
        if x.host == host {
            its += 1;
        }
        if x.host != y.host {
            moved += 1;
            if x.host != host {
                others_moved += 1;
            }
        } else {
            stayed += 1;
            if x.worker == y.worker {
                kept_worker += 1;
            }
        }
    }
    format!(
        "| {} | {host} | {its} | {moved} ({}) | {} | {others_moved} ({}) | {kept_worker} of {stayed} | {} / {} / {} | {} |",
        front.name(),
        pct(moved, compared),
        pct(its, compared),
        pct(others_moved, compared),
        load.completed,
        load.reset,
        load.failed,
        yes_no(rebuilt_same),
    )
}

fn drain_row(
    front: FrontEnd,
    host: usize,
    worker: usize,
    before: &Pass,
    after: &Pass,
    load: &LoadReport,
) -> String {
    let (mut its, mut its_moved, mut its_same_host, mut others_moved) = (0, 0, 0, 0);
    for (x, y) in before.placed.iter().zip(&after.placed) {
        let (Some(x), Some(y)) = (x, y) else { continue };
        if x.host == host && x.worker == worker {
            its += 1;
            if y != x {
                its_moved += 1;
                if y.host == host {
                    its_same_host += 1;
                }
            }
        } else if x != y {
            others_moved += 1;
        }
    }
    format!(
        "| {} | host {host}, worker {worker} | {its} | {its_moved} ({its_same_host} to its host's other workers) | {others_moved} | {} / {} / {} |",
        front.name(),
        load.completed,
        load.reset,
        load.failed,
    )
}

fn render(
    args: &Args,
    policy1: &str,
    rows: &[FrontRows],
    drain: &str,
    unavailable: &[String],
) -> String {
    let mut r = String::new();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(r, "# Beyond one host: groups behind a front-end\n");
    let _ = writeln!(
        r,
        "Run {date} on kernel {}: {} hosts in network namespaces, each a `reuseport run` group of {} workers (`consistent`, `--hash-key src-ip`) on {VIP}:{PORT}; {} client keys (source addresses 198.18.0.1 and up, one connection each, source port fixed so the L4 hash sees one flow per key); the router's multipath hash is the L4 5-tuple (`fib_multipath_hash_policy=3`, fields 0x0037, seed {}; policy 1 in the first row, see below). Which host and worker served each connection is read from the hosts: the worker's `accepted` counter moved, and over each pass the program's per-slot `selected` counters moved by exactly as much (\"placed by the program\").\n",
        kernel_release(),
        args.hosts,
        args.workers,
        args.keys,
        args.ecmp_seed,
    );
    let _ = writeln!(
        r,
        "Command: `cargo xtask cluster -- --keys {} --hosts {} --workers {} --leave {}`\n",
        args.keys, args.hosts, args.workers, args.leave
    );
    let _ = writeln!(r, "## Affinity at both levels\n");
    let _ = writeln!(
        r,
        "| front-end | keys | keys per host | same host and worker, second pass | workers' max/mean per host | failed | placed by the program |"
    );
    let _ = writeln!(r, "|---|---:|---|---|---|---:|---|");
    let _ = writeln!(r, "{policy1}");
    for f in rows {
        let _ = writeln!(r, "{}", f.affinity);
    }
    let _ = writeln!(
        r,
        "\nWith `fib_multipath_hash_policy=1` a forwarded packet that already carries an L4 flow hash is routed by that hash (`fib_multipath_hash()`, net/ipv4/route.c: \"short-circuit if we already have L4 hash present\"). From a NIC that is its RSS hash of the 5-tuple, the same for every packet of a flow and for the same 5-tuple again. Across a veth it is the client socket's `sk_txhash`, a random number per connection: so between namespaces each connection takes a random path even with the same 5-tuple, and only about 1/hosts of the keys come back to the same host. Every other row uses `fib_multipath_hash_policy=3` with `fib_multipath_hash_fields=0x0037` (source and destination address and port, protocol): the same 5-tuple hash, computed from the headers as a router receiving the packet from a wire does."
    );
    let _ = writeln!(r, "\n## A host leaves\n");
    let _ = writeln!(
        r,
        "The front-end is changed in place (`ip route replace` without the host, `ip nexthop replace` of the resilient group, `ipvsadm -e ... -w 0`) while {} clients keep opening connections held {} ms each. *Keys moved* compares every key's host before and after; the ideal is the leaving host's own keys (its share, about 1/{}).\n",
        args.load_threads,
        args.hold.as_millis(),
        args.hosts
    );
    let _ = writeln!(
        r,
        "| front-end | host leaving | its keys | keys moved | ideal | keys of other hosts moved | kept their worker (keys that kept their host) | load: completed / reset / failed | same placement after rebuilding |"
    );
    let _ = writeln!(r, "|---|---:|---:|---|---|---|---|---|---|");
    for f in rows {
        for l in &f.leaves {
            let _ = writeln!(r, "{l}");
        }
    }
    let _ = writeln!(r, "\n## A worker drains\n");
    let _ = writeln!(
        r,
        "`reuseport ctl --group G drain N` on one host while the load runs.\n"
    );
    let _ = writeln!(
        r,
        "| front-end | worker | its keys | its keys moved | other keys moved | load: completed / reset / failed |"
    );
    let _ = writeln!(r, "|---|---|---:|---|---:|---|");
    let _ = writeln!(r, "{drain}");
    if !unavailable.is_empty() {
        let _ = writeln!(r, "\n## Not measured on this machine\n");
        for u in unavailable {
            let _ = writeln!(r, "- {u}");
        }
        if unavailable.iter().any(|u| u.starts_with("IPVS")) {
            let _ = writeln!(
                r,
                "\nThe IPVS form runs in the VM cells, whose Debian kernels have IPVS as modules: `cargo xtask vm-test --kernel 6.1,6.12 --tests cluster` (its measurements are printed to target/vm/cells/*/console.log); or run this on a machine with `ipvsadm` and the `ip_vs`, `ip_vs_mh` modules: `cargo xtask cluster -- --front ipvs`."
            );
        }
    }
    r
}

fn max_over_mean(per_worker: &std::collections::BTreeMap<usize, usize>, workers: usize) -> f64 {
    let total: usize = per_worker.values().sum();
    let max = per_worker.values().copied().max().unwrap_or(0);
    if total == 0 {
        return 0.0;
    }
    max as f64 / (total as f64 / workers as f64)
}

fn pct(n: usize, of: usize) -> String {
    if of == 0 {
        "-".into()
    } else {
        format!("{:.1} %", 100.0 * n as f64 / of as f64)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
