//! Several hosts behind one front-end, in network namespaces on one machine.
//!
//! ```text
//!  client ns                 router ns                       host ns (one per host)
//!  keys: local route         VIP 198.19.0.1:80 -> hosts      VIP on lo, a `reuseport run`
//!  198.18.0.0/17 on lo       (ECMP route, resilient          group on VIP:80, policy
//!  c0 192.0.2.2/30 ────────  nexthop group, or IPVS mh)      `consistent` (src-ip)
//!                            r0 192.0.2.1/30
//!                            h<i> 192.0.2.(4i+5)/30 ──────── r0 192.0.2.(4i+6)/30
//! ```
//!
//! The front-end (in the router) picks a host for each connection; the
//! host's group picks a worker. Every host has the service address (VIP) on
//! its loopback and answers the client directly through the router, as
//! anycast services behind ECMP routers do (and IPVS direct routing).
//!
//! Which host and worker served a connection is read from the hosts
//! themselves: each group's per-worker `accepted` counters (the `WORKERS`
//! map, memory-mapped) moved by exactly one, and over a whole pass the
//! program's own per-slot `selected` counters moved at least as much, with
//! no fallback, so it was the program that placed every connection, not
//! the kernel's hash.
//!
//! The router hashes the 5-tuple from the headers (see [`Hash`]): with
//! `fib_multipath_hash_policy=1` between namespaces every connection would
//! take a random path.
//!
//! Addresses come from test ranges only: 198.18.0.0/15 (RFC 2544) for the
//! clients and the service, 192.0.2.0/24 (RFC 5737) for the links. All
//! traffic stays in the namespaces made here, which are removed at the end
//! (on error and on SIGINT/SIGTERM too: see [`install_interrupt_handler`]).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use reuseport::control::Control;
use socket2::{Domain, Socket, Type};

use crate::Server;

/// The service address: what clients connect to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The service port.
pub const PORT: u16 = 80;
/// The source port of every key's connection. With an L4 hash the
/// front-end hashes the 5-tuple, so a
/// key is an address and a port; a fixed port makes the source address the
/// key at both levels (the hosts' `consistent` policy hashes `src-ip`).
pub const KEY_PORT: u16 = 40000;
/// Most keys: the addresses of 198.18.0.0/18 but its first and last.
pub const MAX_KEYS: usize = (1 << 14) - 2;
/// Nexthop group id of the resilient front-end (host `i` is nexthop `i + 1`).
const GROUP_ID: u32 = 100;
/// How long one probe may wait for its connection, and for its echo,
/// before it counts as failed (long enough for an emulated VM).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pass gives up after this many failures in a row (the front-end or the
/// hosts are not answering: waiting any longer would only take time).
const MAX_FAILURES_IN_A_ROW: usize = 20;

/// Key `i`'s client address: 198.18.0.1 + i, in 198.18.0.0/18.
pub fn key(i: usize) -> Ipv4Addr {
    assert!(i < MAX_KEYS, "at most {MAX_KEYS} keys");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32)
}

/// The `n`th source address of the steady load: 198.18.64.0/18, apart
/// from the keys.
fn load_source(n: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 1)) + (n % MAX_KEYS as u64) as u32)
}

/// Router side of host `i`'s link.
fn router_side(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 4 * i as u8 + 5)
}

/// Host side of host `i`'s link.
pub fn host_side(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 4 * i as u8 + 6)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set a flag that every loop here checks, so that
/// Ctrl-C ends a run through the normal error path, which stops the hosts
/// and removes the namespaces.
pub fn install_interrupt_handler() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `ip ARGS`; fails with its error message.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `ip -n NS ARGS`.
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend(args);
    ip(&full)
}

/// Runs `f` on a thread inside network namespace `ns` (made by `ip netns
/// add`). A network namespace belongs to a thread: sockets it opens,
/// processes it spawns and threads it starts live there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening network namespace {ns}"))?;
    thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace {ns} panicked"))?
    })
}

/// Writes a sysctl of namespace `ns`. `/proc/sys/net` shows the namespace
/// of the thread that opens it, so the write happens on a thread there.
fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(ns, || std::fs::write(&path, value))?
        .with_context(|| format!("setting {key}={value} in namespace {ns}"))
}

/// Removes namespaces left by runs of this module that were killed (their
/// process is gone), so a crash does not leave them forever.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("rpcl-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// How the router's multipath routes hash a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// `fib_multipath_hash_policy=1`, the L4 hash. For a forwarded packet
    /// that already carries an L4 flow hash the kernel uses that hash
    /// as it is (`fib_multipath_hash()` in net/ipv4/route.c, "short-circuit
    /// if we already have L4 hash present"). From a NIC that is its RSS
    /// hash of the 5-tuple; across a veth it is the sending socket's
    /// `sk_txhash`, a random number per connection: so in namespaces every
    /// connection takes a random path, whatever its 5-tuple.
    L4,
    /// `fib_multipath_hash_policy=3` with the fields of the 5-tuple
    /// (Linux 5.12): the same L4 hash, always computed from the headers,
    /// as a router receiving the packet from a wire does.
    Headers,
}

/// The balancer in front of the hosts (in the router namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontEnd {
    /// A multipath route (`ip route ... nexthop ... nexthop`): the kernel's
    /// hash-threshold selection (RFC 2992), L4 hash.
    Multipath,
    /// A resilient nexthop group (`ip nexthop ... type resilient`, Linux
    /// 5.13): a table of buckets, of which only those of a nexthop that
    /// leaves are given to others.
    Resilient {
        /// Buckets in the group's table.
        buckets: u16,
    },
    /// IPVS with the Maglev scheduler (`ipvsadm -s mh`, Linux 4.18), direct
    /// routing (`-g`): the router has the VIP and forwards each new
    /// connection to the host Maglev picks by the client's address; a host
    /// leaves with weight 0, so its open connections finish there.
    Ipvs,
}

impl FrontEnd {
    /// A short name for tables.
    pub fn name(&self) -> String {
        match self {
            FrontEnd::Multipath => "ECMP multipath route".into(),
            FrontEnd::Resilient { buckets } => {
                format!("ECMP resilient nexthop group ({buckets} buckets)")
            }
            FrontEnd::Ipvs => "IPVS mh (Maglev), direct routing".into(),
        }
    }
}

/// Options of a topology.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of hosts (1 to 50).
    pub hosts: usize,
    /// Workers of each host's group.
    pub workers: usize,
    /// Seed of the router's multipath hash (`fib_multipath_hash_seed`,
    /// Linux 6.11; ignored where missing), so runs are reproducible.
    pub ecmp_seed: u32,
    /// The `reuseport` binary the hosts run.
    pub binary: std::path::PathBuf,
}

/// One host: a namespace and the group it serves.
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its group's name (distinct per host: the pins of every group live in
    /// one bpffs).
    pub group: String,
    server: Option<Server>,
    control: Option<Control>,
}

impl Host {
    /// Its group's per-slot `accepted` counters.
    fn accepted(&self) -> Vec<u64> {
        // Read once per key in a probe: from the shared mapping, no syscall.
        match &self.control {
            Some(c) => c.workers().iter().map(|r| r.accepted).collect(),
            None => Vec::new(),
        }
    }

    /// Its program's per-slot selections and fallbacks.
    fn selected(&self) -> Result<(Vec<u64>, u64)> {
        let c = self.control.as_ref().context("host not serving")?;
        let counters = c
            .status()
            .context("reading the program's counters")?
            .counters;
        Ok((counters.selected, counters.fallback))
    }
}

/// Where one key was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Placement {
    /// The host (index).
    pub host: usize,
    /// The worker (slot) on that host.
    pub worker: usize,
}

/// One connection per key, each placed.
#[derive(Clone, Debug, Default)]
pub struct Pass {
    /// Key `i`'s placement, `None` if its connection failed.
    pub placed: Vec<Option<Placement>>,
    /// What went wrong, per failed key (first few).
    pub failures: Vec<String>,
    /// Keys whose connection failed.
    pub failed: usize,
    /// Whether the program placed every accepted connection: on every host
    /// and slot its selections moved at least as much as the worker's
    /// accepts, and it never fell back to the kernel's hash.
    pub placed_by_program: bool,
    /// Where they differed, per host: (slot, selections, accepts) and the
    /// fallbacks.
    pub program_mismatch: Vec<String>,
    /// Selections beyond the accepts, summed over slots (SYNs selected
    /// that did not become an accepted connection, or selected twice).
    pub extra_selections: u64,
    /// SYNs the probes sent again (`TCP_INFO`), each one more chance of a
    /// selection without an accept.
    pub syn_retransmits: u64,
    /// How long the pass took.
    pub elapsed: Duration,
}

impl Pass {
    /// Keys served per host.
    pub fn per_host(&self, hosts: usize) -> Vec<usize> {
        let mut n = vec![0; hosts];
        for p in self.placed.iter().flatten() {
            n[p.host] += 1;
        }
        n
    }

    /// Keys served per worker of `host`.
    pub fn per_worker(&self, host: usize) -> BTreeMap<usize, usize> {
        let mut n = BTreeMap::new();
        for p in self.placed.iter().flatten().filter(|p| p.host == host) {
            *n.entry(p.worker).or_default() += 1;
        }
        n
    }
}

/// How the keys' placements differ between two passes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// Keys placed in both passes.
    pub compared: usize,
    /// ... on the same host and worker both times.
    pub same: usize,
    /// ... on another host the second time.
    pub host_moved: usize,
    /// ... on the same host, another worker.
    pub worker_moved: usize,
}

/// Compares two passes key by key.
pub fn compare(a: &Pass, b: &Pass) -> Moves {
    let mut m = Moves::default();
    for (x, y) in a.placed.iter().zip(&b.placed) {
        let (Some(x), Some(y)) = (x, y) else { continue };
        m.compared += 1;
        if x == y {
            m.same += 1;
        } else if x.host != y.host {
            m.host_moved += 1;
        } else {
            m.worker_moved += 1;
        }
    }
    m
}

/// The namespaces, the front-end and the hosts' groups.
pub struct Cluster {
    prefix: String,
    /// The client namespace.
    pub client: String,
    /// The router namespace.
    pub router: String,
    /// The hosts.
    pub hosts: Vec<Host>,
    namespaces: Vec<String>,
    opts: Options,
    /// The front-end in place (a lock, so a change can run beside a load).
    front: std::sync::Mutex<Option<FrontEnd>>,
}

impl Cluster {
    /// Makes the namespaces and links, and starts a group on every host.
    /// Namespaces are named `rpcl-PID-N-ROLE`.
    pub fn build(opts: Options) -> Result<Cluster> {
        ensure!(
            (1..=50).contains(&opts.hosts),
            "hosts: 1 to 50, not {}",
            opts.hosts
        );
        ensure!(
            nix::unistd::geteuid().is_root(),
            "building network namespaces needs root"
        );
        remove_stale_namespaces();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "rpcl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = Cluster {
            client: format!("{prefix}-client"),
            router: format!("{prefix}-router"),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            prefix,
            opts,
            front: std::sync::Mutex::new(None),
        };
        c.links().context("building the topology")?;
        for i in 0..c.opts.hosts {
            c.start_host(i)
                .with_context(|| format!("starting the group of host {i}"))?;
        }
        Ok(c)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip_in(name, &["link", "set", "lo", "up"])?;
        // No reverse-path filter: replies leave the hosts from the VIP,
        // which the router does not route back to them.
        for conf in ["all", "default"] {
            sysctl_in(name, &format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        Ok(())
    }

    fn links(&mut self) -> Result<()> {
        let (client, router) = (self.client.clone(), self.router.clone());
        self.add_ns(&client)?;
        self.add_ns(&router)?;
        // client <-> router
        ip_in(
            &router,
            &[
                "link", "add", "r0", "type", "veth", "peer", "name", "c0", "netns", &client,
            ],
        )?;
        ip_in(&router, &["addr", "add", "192.0.2.1/30", "dev", "r0"])?;
        ip_in(&router, &["link", "set", "r0", "up"])?;
        ip_in(&client, &["addr", "add", "192.0.2.2/30", "dev", "c0"])?;
        ip_in(&client, &["link", "set", "c0", "up"])?;
        ip_in(&client, &["route", "add", "default", "via", "192.0.2.1"])?;
        // Every address of 198.18.0.0/17 is the client's: a local route
        // (the kernel's "AnyIP") lets it bind any of them without adding
        // 32,768 addresses one by one.
        ip_in(
            &client,
            &["route", "add", "local", "198.18.0.0/17", "dev", "lo"],
        )?;
        ip_in(
            &router,
            &["route", "add", "198.18.0.0/17", "via", "192.0.2.2"],
        )?;
        sysctl_in(&router, "net.ipv4.ip_forward", "1")?;
        self.set_hash(Hash::Headers)?;
        // Reproducible placements (Linux 6.11+; a random seed per
        // namespace otherwise).
        let _ = sysctl_in(
            &router,
            "net.ipv4.fib_multipath_hash_seed",
            &self.opts.ecmp_seed.to_string(),
        );
        for i in 0..self.opts.hosts {
            let ns = format!("{}-host{i}", self.prefix);
            self.add_ns(&ns)?;
            let r = format!("h{i}");
            ip_in(
                &router,
                &[
                    "link", "add", &r, "type", "veth", "peer", "name", "r0", "netns", &ns,
                ],
            )?;
            ip_in(
                &router,
                &["addr", "add", &format!("{}/30", router_side(i)), "dev", &r],
            )?;
            ip_in(&router, &["link", "set", &r, "up"])?;
            ip_in(
                &ns,
                &["addr", "add", &format!("{}/30", host_side(i)), "dev", "r0"],
            )?;
            ip_in(&ns, &["link", "set", "r0", "up"])?;
            ip_in(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &router_side(i).to_string(),
                ],
            )?;
            ip_in(&ns, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            // Each host is a nexthop object too, for the resilient group.
            ip_in(
                &router,
                &[
                    "nexthop",
                    "add",
                    "id",
                    &(i + 1).to_string(),
                    "via",
                    &host_side(i).to_string(),
                    "dev",
                    &r,
                ],
            )?;
            self.hosts.push(Host {
                ns,
                group: format!("{}-h{i}", self.prefix),
                server: None,
                control: None,
            });
        }
        Ok(())
    }

    fn start_host(&mut self, i: usize) -> Result<()> {
        let host = &self.hosts[i];
        let workers = self.opts.workers.to_string();
        let addr = format!("{VIP}:{PORT}");
        let binary = self.opts.binary.clone();
        let group = host.group.clone();
        let server = in_netns(&host.ns, || {
            Server::spawn(Command::new(&binary).args([
                "run",
                "--addr",
                &addr,
                "--policy",
                "consistent",
                "--hash-key",
                "src-ip",
                "--workers",
                &workers,
                "--group",
                &group,
                // Short, so a drain or a stop does not wait long for the
                // connections a removed route left half-open.
                "--drain-timeout",
                "2s",
                "--metrics-addr",
                "127.0.0.1:9100",
            ]))
        })?
        .map_err(|f| {
            anyhow::anyhow!(
                "reuseport run exited ({}): {}{}",
                f.status,
                f.stdout,
                f.stderr
            )
        })?;
        // Opened from the host's namespace, where its pins are named.
        let control = in_netns(&host.ns, || Control::open(Some(&group)))?
            .with_context(|| format!("opening group {group}"))?;
        let host = &mut self.hosts[i];
        host.server = Some(server);
        host.control = Some(control);
        Ok(())
    }

    /// Sets how the router hashes a flow to pick a path (see [`Hash`]).
    pub fn set_hash(&self, hash: Hash) -> Result<()> {
        match hash {
            Hash::L4 => sysctl_in(&self.router, "net.ipv4.fib_multipath_hash_policy", "1"),
            Hash::Headers => {
                sysctl_in(&self.router, "net.ipv4.fib_multipath_hash_policy", "3")?;
                // Source and destination address, protocol, source and
                // destination port (include/net/ip_fib.h
                // FIB_MULTIPATH_HASH_FIELD_*): the L4 5-tuple.
                sysctl_in(&self.router, "net.ipv4.fib_multipath_hash_fields", "0x0037")
            }
        }
    }

    /// Whether this kernel and iproute2 make resilient nexthop groups.
    pub fn resilient_available(&self) -> Result<(), String> {
        let probe = [
            "nexthop",
            "add",
            "id",
            "999",
            "group",
            "1",
            "type",
            "resilient",
            "buckets",
            "8",
        ];
        match ip_in(&self.router, &probe) {
            Ok(()) => {
                let _ = ip_in(&self.router, &["nexthop", "del", "id", "999"]);
                Ok(())
            }
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Whether IPVS with the `mh` scheduler can run here: `ipvsadm`
    /// present, the `ip_vs` and `ip_vs_mh` modules loaded or loadable.
    pub fn ipvs_available(&self) -> Result<(), String> {
        if which("ipvsadm").is_none() {
            return Err("ipvsadm is not installed (apt-get install ipvsadm)".into());
        }
        // Modules are the machine's, not a namespace's.
        if which("modprobe").is_some() {
            let _ = Command::new("modprobe").arg("ip_vs").status();
            let _ = Command::new("modprobe").arg("ip_vs_mh").status();
        }
        let ns = self.router.clone();
        let listed = in_netns(&ns, || {
            // Per thread: /proc/thread-self/net is this thread's namespace.
            std::fs::read_to_string("/proc/thread-self/net/ip_vs").is_ok()
        })
        .map_err(|e| format!("{e:#}"))?;
        if !listed {
            return Err(format!(
                "this kernel ({}) has no IPVS (module ip_vs not loaded and not loadable)",
                kernel_release()
            ));
        }
        let mh = std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("ip_vs_mh ")))
            .unwrap_or(false);
        let builtin =
            std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", kernel_release()))
                .map(|b| b.contains("ip_vs_mh.ko"))
                .unwrap_or(false);
        if !mh && !builtin {
            return Err("the ip_vs_mh module (scheduler mh) is not loaded".into());
        }
        Ok(())
    }

    /// Points the service at hosts `members` through `front`. With `fresh`
    /// the front-end is built anew (a resilient group gets a new table);
    /// otherwise it is changed in place, as an operator removing a host
    /// would (`ip route replace`, `ip nexthop replace`, `ipvsadm -d`).
    pub fn set_front(&self, front: FrontEnd, members: &[usize], fresh: bool) -> Result<()> {
        ensure!(!members.is_empty(), "a front-end needs at least one host");
        let r = self.router.clone();
        let mut current = self.front.lock().unwrap_or_else(|p| p.into_inner());
        if fresh || *current != Some(front) {
            Self::clear_front(&r, &mut current)?;
        }
        let vip = format!("{VIP}/32");
        match front {
            FrontEnd::Multipath => {
                let mut args = vec!["route".to_string(), "replace".into(), vip];
                for &i in members {
                    args.extend([
                        "nexthop".into(),
                        "via".into(),
                        host_side(i).to_string(),
                        "dev".into(),
                        format!("h{i}"),
                    ]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ip_in(&r, &args)?;
            }
            FrontEnd::Resilient { buckets } => {
                let group = members
                    .iter()
                    .map(|i| (i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                let verb = if *current == Some(front) {
                    "replace"
                } else {
                    "add"
                };
                let (id, b) = (GROUP_ID.to_string(), buckets.to_string());
                // idle_timer: a bucket may move to rebalance the group only
                // after it carried no packet for this long; buckets of a
                // nexthop that leaves move at once, whatever it says.
                ip_in(
                    &r,
                    &[
                        "nexthop",
                        verb,
                        "id",
                        &id,
                        "group",
                        &group,
                        "type",
                        "resilient",
                        "buckets",
                        &b,
                        "idle_timer",
                        "120",
                    ],
                )?;
                if *current != Some(front) {
                    ip_in(&r, &["route", "replace", &vip, "nhid", &id])?;
                }
            }
            FrontEnd::Ipvs => {
                let service = format!("{VIP}:{PORT}");
                if *current != Some(front) {
                    if let Err(why) = self.ipvs_available() {
                        bail!("the IPVS front-end cannot run here: {why}");
                    }
                    ip_in(&r, &["addr", "add", &vip, "dev", "lo"])?;
                    // Replies leave the hosts from the VIP, which is local
                    // here too: without accept_local the router drops them
                    // as martians (fib_validate_source(), net/ipv4/fib_frontend.c).
                    sysctl_in(&r, "net.ipv4.conf.all.accept_local", "1")?;
                    // A new SYN on the 5-tuple of a closed connection is
                    // scheduled again (the probes reuse their tuples).
                    sysctl_in(&r, "net.ipv4.vs.conn_reuse_mode", "1")?;
                    // A new SYN on the 5-tuple of an old connection to a
                    // host of weight 0 is scheduled again, not sent there.
                    sysctl_in(&r, "net.ipv4.vs.expire_nodest_conn", "1")?;
                    // mh-fallback: `mh` keeps a host of weight 0 in its
                    // table (so that a host coming back finds its keys
                    // again); without this flag the keys of such a host
                    // find no destination and their SYNs are refused.
                    // With it, only those keys are hashed again, onto
                    // hosts that serve.
                    ipvsadm(&r, &["-A", "-t", &service, "-s", "mh", "-b", "mh-fallback"])?;
                    for &i in members {
                        let real = format!("{}:{PORT}", host_side(i));
                        ipvsadm(&r, &["-a", "-t", &service, "-r", &real, "-g", "-w", "1"])?;
                    }
                } else {
                    // A host leaves as an operator takes one out: weight 0
                    // ("quiescent"). `mh` leaves it out of its table, so no
                    // new connection goes there, while the connection table
                    // keeps sending the open ones to it until they end.
                    for i in 0..self.hosts.len() {
                        let real = format!("{}:{PORT}", host_side(i));
                        let weight = if members.contains(&i) { "1" } else { "0" };
                        ipvsadm(&r, &["-e", "-t", &service, "-r", &real, "-g", "-w", weight])?;
                    }
                }
            }
        }
        *current = Some(front);
        Ok(())
    }

    /// Removes whatever front-end is in place.
    fn clear_front(r: &str, current: &mut Option<FrontEnd>) -> Result<()> {
        let vip = format!("{VIP}/32");
        match current.take() {
            None => {}
            Some(FrontEnd::Multipath) => ip_in(r, &["route", "del", &vip])?,
            Some(FrontEnd::Resilient { .. }) => {
                ip_in(r, &["route", "del", &vip])?;
                ip_in(r, &["nexthop", "del", "id", &GROUP_ID.to_string()])?;
            }
            Some(FrontEnd::Ipvs) => {
                ipvsadm(r, &["-C"])?;
                ip_in(r, &["addr", "del", &vip, "dev", "lo"])?;
            }
        }
        Ok(())
    }

    /// Connects once from every key (`keys` of them, in order) and reads
    /// from the hosts which host and worker accepted each connection.
    pub fn probe(&self, keys: usize) -> Result<Pass> {
        ensure!(keys <= MAX_KEYS, "at most {MAX_KEYS} keys");
        let start = Instant::now();
        let before: Vec<(Vec<u64>, u64)> = self
            .hosts
            .iter()
            .map(Host::selected)
            .collect::<Result<_>>()?;
        let start_accepted: Vec<Vec<u64>> = self.hosts.iter().map(Host::accepted).collect();
        let hosts = &self.hosts;
        let mut pass = in_netns(&self.client, move || -> Result<Pass> {
            let mut pass = Pass::default();
            let mut prev = start_accepted;
            let mut in_a_row = 0;
            for i in 0..keys {
                check_interrupted()?;
                let outcome = connect_once(key(i));
                let now: Vec<Vec<u64>> = hosts.iter().map(Host::accepted).collect();
                let mut served = Vec::new();
                for (h, (n, p)) in now.iter().zip(&prev).enumerate() {
                    for (w, (a, b)) in n.iter().zip(p).enumerate() {
                        for _ in 0..a.saturating_sub(*b) {
                            served.push(Placement { host: h, worker: w });
                        }
                    }
                }
                prev = now;
                let placed = match (outcome, served.as_slice()) {
                    (Ok(again), [one]) => {
                        pass.syn_retransmits += u64::from(again);
                        Ok(*one)
                    }
                    (Ok(_), other) => Err(format!(
                        "key {}: {} accepts seen for one connection",
                        key(i),
                        other.len()
                    )),
                    (Err(e), _) => Err(format!("key {}: {e}", key(i))),
                };
                match placed {
                    Ok(p) => {
                        pass.placed.push(Some(p));
                        in_a_row = 0;
                    }
                    Err(e) => {
                        pass.placed.push(None);
                        pass.failed += 1;
                        in_a_row += 1;
                        if pass.failures.len() < 10 {
                            pass.failures.push(e);
                        }
                        if in_a_row >= MAX_FAILURES_IN_A_ROW {
                            bail!(
                                "{in_a_row} connections in a row failed; the last: {}",
                                pass.failures.last().map(String::as_str).unwrap_or("")
                            );
                        }
                    }
                }
            }
            Ok(pass)
        })??;
        // Every accepted connection was placed by the program: no fallback
        // to the kernel's hash, and each slot's selections moved at least
        // as much as its worker's accepts. They may move more: a SYN
        // selected and then dropped on the way into the accept queue, or
        // sent again, runs the program once more (seen in emulated VMs).
        let mut by_program = true;
        for (h, host) in self.hosts.iter().enumerate() {
            let (selected, fallback) = host.selected()?;
            let placed = pass.per_worker(h);
            for (w, (now, was)) in selected.iter().zip(&before[h].0).enumerate() {
                let accepted = *placed.get(&w).unwrap_or(&0) as u64;
                let selections = now - was;
                pass.extra_selections += selections.saturating_sub(accepted);
                if selections < accepted {
                    by_program = false;
                    pass.program_mismatch.push(format!(
                        "host {h} slot {w}: {} selected, {accepted} accepted",
                        now - was
                    ));
                }
            }
            if fallback != before[h].1 {
                by_program = false;
                pass.program_mismatch.push(format!(
                    "host {h}: {} fallbacks to the kernel's hash",
                    fallback - before[h].1
                ));
            }
        }
        pass.placed_by_program = by_program;
        pass.elapsed = start.elapsed();
        Ok(pass)
    }

    /// `reuseport ctl --group G drain WORKER` on host `host`, run in its
    /// namespace.
    pub fn drain(&self, host: usize, worker: usize) -> Result<()> {
        let h = &self.hosts[host];
        let binary = self.opts.binary.clone();
        let group = h.group.clone();
        let out = in_netns(&h.ns, || {
            Command::new(&binary)
                .args(["ctl", "--group", &group, "drain", &worker.to_string()])
                .output()
        })?
        .context("running reuseport ctl drain")?;
        ensure!(
            out.status.success(),
            "reuseport ctl drain {worker}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Starts a steady load from the client: `threads` clients, each
    /// opening one connection after the other, each connection held for
    /// `hold` between two exchanges (so a change finds connections open).
    pub fn load(&self, threads: usize, hold: Duration) -> Result<Load> {
        in_netns(&self.client, || Load::start(threads, hold))
    }

    /// Stops the hosts (SIGTERM: they unpin and exit) and removes the
    /// namespaces. Also what dropping the cluster does.
    pub fn teardown(&mut self) {
        let mut current = self.front.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = Self::clear_front(&self.router, &mut current);
        for h in &mut self.hosts {
            h.control = None;
            if let Some(s) = h.server.take() {
                s.signal(nix::sys::signal::Signal::SIGTERM);
                // Bounded: the hosts drain for at most --drain-timeout.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    s.wait(Duration::from_secs(15))
                }));
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// One probe: connect from `(src, KEY_PORT)`, exchange one byte, and close
/// with a reset, so the same 4-tuple can connect again at once (no
/// TIME_WAIT on either side).
fn connect_once(src: Ipv4Addr) -> Result<u32, String> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| format!("socket: {e}"))?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(src, KEY_PORT)).into())
        .map_err(|e| format!("bind: {e}"))?;
    let vip = SocketAddr::from(SocketAddrV4::new(VIP, PORT));
    s.connect_timeout(&vip.into(), PROBE_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    let syn_retransmits = retransmits(&s);
    s.set_linger(Some(Duration::ZERO))
        .map_err(|e| e.to_string())?;
    let mut stream: TcpStream = s.into();
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream.write_all(b"k").map_err(|e| format!("send: {e}"))?;
    let mut b = [0u8; 1];
    stream
        .read_exact(&mut b)
        .map_err(|e| format!("receive: {e}"))?;
    if &b != b"k" {
        return Err("echo differs".into());
    }
    Ok(syn_retransmits)
}

/// Segments this connection sent again so far (`TCP_INFO`'s
/// `tcpi_total_retrans`); read right after the handshake, these are SYNs.
/// Each SYN sent again may run the program again (on a slow machine the
/// first can still be on its way when the second leaves), so a slot's
/// selections may exceed its accepts by that many. Hand-written: neither
/// nix nor socket2 reads `TCP_INFO`.
fn retransmits(s: &Socket) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length are valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        info.tcpi_total_retrans
    } else {
        0
    }
}

/// What the steady load saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Connections that echoed every byte.
    pub completed: u64,
    /// Connections reset by the other side (`ECONNRESET`, `EPIPE`).
    pub reset: u64,
    /// Connections that failed otherwise (refused, timed out, short).
    pub failed: u64,
    /// The first few failures and resets, as text.
    pub errors: Vec<String>,
}

/// A steady client load (see [`Cluster::load`]).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<LoadReport>>,
}

impl Load {
    fn start(threads: usize, hold: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        // Bounded even if never stopped.
        let deadline = Instant::now() + Duration::from_secs(300);
        let threads = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut n = t as u64 * 1000;
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && !INTERRUPTED.load(Ordering::Relaxed)
                    {
                        n += 1;
                        match held_echo(load_source(n), hold, n) {
                            Ok(()) => report.completed += 1,
                            Err((reset, e)) => {
                                if reset {
                                    report.reset += 1;
                                } else {
                                    report.failed += 1;
                                }
                                if report.errors.len() < 5 {
                                    report.errors.push(e);
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients and sums what they saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().unwrap_or_else(|_| LoadReport {
                failed: 1,
                errors: vec!["a load thread panicked".into()],
                ..Default::default()
            });
            all.completed += r.completed;
            all.reset += r.reset;
            all.failed += r.failed;
            all.errors
                .extend(r.errors.into_iter().take(5 - all.errors.len().min(5)));
        }
        all
    }
}

/// One load connection from `src` (any port): 32 bytes, a pause of
/// `hold`, 32 more, then a half-close and the whole echo back. The error
/// says whether the connection was reset.
fn held_echo(src: Ipv4Addr, hold: Duration, n: u64) -> Result<(), (bool, String)> {
    let fail = |what: &str, e: std::io::Error| {
        let reset = matches!(
            e.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::BrokenPipe
                | ErrorKind::ConnectionAborted
                // A reset that came while the client was not reading: the
                // next call finds the connection gone.
                | ErrorKind::NotConnected
        );
        (reset, format!("{what} from {src}: {e}"))
    };
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| fail("socket", e))?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(src, 0)).into())
        .map_err(|e| fail("bind", e))?;
    let vip = SocketAddr::from(SocketAddrV4::new(VIP, PORT));
    s.connect_timeout(&vip.into(), Duration::from_secs(3))
        .map_err(|e| fail("connect", e))?;
    let mut stream: TcpStream = s.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| fail("timeout", e))?;
    let payload = crate::pattern(64, n);
    stream
        .write_all(&payload[..32])
        .map_err(|e| fail("send", e))?;
    thread::sleep(hold);
    stream
        .write_all(&payload[32..])
        .map_err(|e| fail("send", e))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| fail("half-close", e))?;
    let mut got = Vec::with_capacity(64);
    stream
        .read_to_end(&mut got)
        .map_err(|e| fail("receive", e))?;
    if got != payload {
        return Err((false, format!("echo from {src}: {} of 64 bytes", got.len())));
    }
    Ok(())
}

/// Runs `ipvsadm ARGS` in namespace `ns`.
fn ipvsadm(ns: &str, args: &[&str]) -> Result<()> {
    let out =
        in_netns(ns, || Command::new("ipvsadm").args(args).output())?.context("running ipvsadm")?;
    ensure!(
        out.status.success(),
        "ipvsadm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The path of `program` in `$PATH`.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}
