//! `cargo xtask vm-test`: the integration tests on the kernels users run.
//!
//! Each cell of the matrix boots one Debian kernel in QEMU with N vCPUs and
//! runs a named subset of the integration tests inside, against the binaries
//! built here on the host. The guest is an initramfs: busybox-static as
//! `/init`'s userland, the host's `ip`, `setpriv` and a trimmed `python3`
//! with their shared libraries (found with `ldd`), the stripped `reuseport`
//! binary and the stripped test executables. Each test reports on the serial
//! console between `@@VM begin` and `@@VM end ... rc=N` lines, which the host
//! parses into a pass/fail table (printed, and written to
//! `target/vm/results.md`). The `host` cell runs the same subset here,
//! outside any VM, on the running kernel.
//!
//! Kernels are Debian's cloud images (everything the tests need is built
//! in): bookworm's 6.1 and 6.12 LTS, and bullseye's 5.10, which lacks BPF
//! atomics and listener migration and so proves the loader's "kernel too
//! old" error on a real kernel. `apt-get download` fetches each once into
//! `target/vm/debs`; `dpkg-deb -x` unpacks it under `target/vm/kernels`.
//! The arm64 cell boots bookworm's 6.1 arm64 image under
//! `qemu-system-aarch64 -M virt` with binaries cross-built for aarch64 and
//! Debian's arm64 busybox-static.
//!
//! KVM is used when `/dev/kvm` boots a guest (a short probe, remembered in
//! `target/vm/accel`); otherwise QEMU emulates (TCG, `-cpu max`). Each boot
//! is time-boxed and, if it stalls before `/init` runs (it happens under
//! TCG on this machine kind), retried once.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::cpio::Archive;

/// A kernel of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Debian bullseye's 5.10: too old (no BPF atomics, no migration); only
    /// the "kernel too old" test runs on it, and expects the error.
    V5_10,
    /// Debian bookworm's 6.1 (Debian 12's own kernel).
    V6_1,
    /// Bookworm's 6.1 on 8 vCPUs in two NUMA nodes (two sockets of four):
    /// the cell of [`NUMA`], where a CPU without a worker must go to the
    /// worker of its node.
    NumaV6_1,
    /// The 6.12 LTS line, as bookworm ships it.
    V6_12,
    /// Bookworm's 6.1 for arm64, emulated, with binaries cross-built for
    /// aarch64 (the arm64 JIT's BPF atomics are the known risk).
    Arm64V6_1,
    /// The kernel this machine runs, without a VM.
    Host,
}

impl Kernel {
    /// Parses `--kernel`: one name, a comma-separated list, or `all`.
    pub fn parse_list(s: &str) -> Result<Vec<Kernel>> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "5.10" => out.push(Kernel::V5_10),
                "6.1" => out.push(Kernel::V6_1),
                "6.1-numa" => out.push(Kernel::NumaV6_1),
                "6.12" => out.push(Kernel::V6_12),
                "arm64" => out.push(Kernel::Arm64V6_1),
                "host" => out.push(Kernel::Host),
                "all" => out.extend([
                    Kernel::V5_10,
                    Kernel::V6_1,
                    Kernel::NumaV6_1,
                    Kernel::V6_12,
                    Kernel::Arm64V6_1,
                    Kernel::Host,
                ]),
                other => {
                    bail!("unknown kernel `{other}`: expected 5.10, 6.1, 6.1-numa, 6.12, arm64, host or all")
                }
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            bail!("--kernel names no kernel");
        }
        Ok(out)
    }

    /// The architecture of the kernel and of the binaries its guest runs.
    fn arch(self) -> Arch {
        match self {
            Kernel::Arm64V6_1 => Arch::Aarch64,
            _ => Arch::X86_64,
        }
    }

    /// The apt package name pattern (`apt-cache search --names-only`) of
    /// its unsigned cloud image, and the apt sources it lives in.
    fn package(self) -> (&'static str, Option<&'static str>) {
        match self {
            Kernel::Arm64V6_1 => (
                r"^linux-image-6\.1\.0-[0-9]+-cloud-arm64-unsigned$",
                Some(BOOKWORM),
            ),
            Kernel::V5_10 => (
                r"^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$",
                Some("deb http://deb.debian.org/debian bullseye main"),
            ),
            Kernel::V6_1 | Kernel::NumaV6_1 => {
                (r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$", None)
            }
            Kernel::V6_12 => (
                r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
                None,
            ),
            Kernel::Host => ("", None),
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::NumaV6_1 => "6.1-numa",
            Kernel::V6_12 => "6.12",
            Kernel::Arm64V6_1 => "arm64-6.1",
            Kernel::Host => "host",
        })
    }
}

/// Bookworm's main archive, for a private apt source list of arm64.
const BOOKWORM: &str = "deb http://deb.debian.org/debian bookworm main";

/// A guest architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// The Rust target to cross-build for (`None`: the host's).
    fn rust_target(self) -> Option<&'static str> {
        match self {
            Arch::X86_64 => None,
            Arch::Aarch64 => Some("aarch64-unknown-linux-gnu"),
        }
    }

    /// Debian's name of the architecture.
    fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
}

/// The tests of the arm64 cell: those that need neither Python, `setpriv`
/// nor iproute2's `ip` (the guest has busybox's, which cannot attach the
/// XDP program of the migration test), on 2 emulated vCPUs. The
/// kernel-too-old test there checks that every feature is found, BPF
/// atomics in the arm64 JIT included, and that the program steers.
const ARM64: &[&str] = &[
    "policy_kernel::serves_without_a_program_and_the_counters_stay_at_zero",
    "udp::round_robin_rotates_datagrams",
    "policies::least_loaded_evens_out_open_connections_where_others_do_not",
    "udp::weighted_datagram_shares_follow_the_weights",
    "living::consistent_moves_exactly_the_keys_of_a_drained_or_added_worker",
    "policy_hash::four_tuple_maps_each_tuple_to_its_predicted_slot",
    "policy_cpu::every_connection_reaches_the_worker_of_its_cpu",
    "agreement::the_program_picks_the_worker_user_space_predicts",
    "udp::datagrams_of_every_size_come_back_unchanged",
    "living::workers_added_and_drained_under_load_lose_nothing",
    "errors::verifier_rejection_shows_the_log",
    TOO_OLD,
];

/// One test of the subset: the test executable (a file of `tests/tests`)
/// and the test's name in it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TestName {
    file: String,
    name: String,
}

impl fmt::Display for TestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}::{}", self.file, self.name)
    }
}

/// The test that proves the loader names what an old kernel lacks; on
/// 5.10 it runs alone and is told what to expect.
const TOO_OLD: &str = "errors::missing_kernel_features_are_named";

/// What a 5.10 kernel lacks of what the program requires, as the loader
/// names it: the test checks that the error ends with exactly this (5.10
/// has the program type, the socket map, mmapable arrays and ring buffers).
const MISSING_ON_5_10: &str = "BPF atomic fetch-and-add (Linux 5.12)";

/// The subset run in every cell, covering: load and steer under every
/// policy; `cpu` steering with workers fewer than, equal to and more than
/// the CPUs;
/// hash agreement with the user-space prediction; UDP, IPv6, drain, join,
/// takeover and adopt; listener migration; the kernel-too-old and
/// missing-capability errors.
pub const FULL: &[&str] = &[
    "policy_kernel::serves_without_a_program_and_the_counters_stay_at_zero",
    "policies::round_robin_rotates_over_the_workers",
    "policies::least_loaded_evens_out_open_connections_where_others_do_not",
    "udp::weighted_datagram_shares_follow_the_weights",
    "living::consistent_moves_exactly_the_keys_of_a_drained_or_added_worker",
    "policies::every_policy_skips_an_empty_slot_and_counts_it",
    "policy_hash::four_tuple_maps_each_tuple_to_its_predicted_slot",
    "policy_hash::src_ip_keeps_one_client_on_one_worker_and_spreads_clients",
    "policy_cpu::every_connection_reaches_the_worker_of_its_cpu",
    "policy_cpu::more_workers_than_cpus_stay_on_their_cpu",
    "policy_cpu::every_cpu_has_a_worker_whatever_the_worker_count",
    "shapes::cpu_under_every_shape",
    "shapes::hash_under_every_shape",
    "agreement::the_program_picks_the_worker_user_space_predicts",
    "udp::datagrams_of_every_size_come_back_unchanged",
    "udp::round_robin_rotates_datagrams",
    "udp::cpu_policy_answers_from_the_worker_of_the_senders_cpu",
    "udp::hash_src_ip_puts_each_client_on_its_predicted_worker",
    "ipv6::cpu_steering_over_ipv6",
    "ipv6::hash_over_ipv6_puts_each_client_on_its_predicted_worker",
    "living::workers_added_and_drained_under_load_lose_nothing",
    "living::queued_and_half_open_connections_move_when_a_listener_closes",
    "living::a_second_process_joins_serves_and_leaves",
    "living::rolling_restarts_under_load_lose_no_connection",
    "adopt::a_python_server_serves_its_share_under_round_robin",
    "adopt::adopting_what_cannot_serve_the_group_fails_clearly",
    "errors::no_privilege_names_the_capabilities",
    "errors::verifier_rejection_shows_the_log",
    "errors::without_listener_migration_the_program_selects_only",
    "errors::rust_log_of_the_environment_does_not_change_results",
    "cluster::keys_keep_host_and_worker_and_a_drained_worker_moves_only_its_keys",
    IPVS,
    TOO_OLD,
];

/// The cell `cargo xtask test` runs (6.1 with 4 vCPUs, and 5.10 for the
/// too-old check): the ground of [`FULL`] in shorter tests (datagrams where
/// a connection test takes minutes under emulation), so that it stays
/// within about 10 minutes here. Left out: `policies::round_robin_…` and
/// `policies::weighted_…` (they count program runs against connections,
/// and on 6.1 under emulation the program runs a few more times than there
/// are connections), and the takeover test (it expects a connection rate
/// emulation does not reach); both run in the full matrix.
pub const CI: &[&str] = &[
    "policy_kernel::serves_without_a_program_and_the_counters_stay_at_zero",
    "udp::round_robin_rotates_datagrams",
    "policies::least_loaded_evens_out_open_connections_where_others_do_not",
    "udp::weighted_datagram_shares_follow_the_weights",
    "living::consistent_moves_exactly_the_keys_of_a_drained_or_added_worker",
    "policy_hash::four_tuple_maps_each_tuple_to_its_predicted_slot",
    "agreement::the_program_picks_the_worker_user_space_predicts",
    "policy_cpu::every_connection_reaches_the_worker_of_its_cpu",
    "policy_cpu::more_workers_than_cpus_stay_on_their_cpu",
    "policy_cpu::every_cpu_has_a_worker_whatever_the_worker_count",
    "udp::datagrams_of_every_size_come_back_unchanged",
    "udp::cpu_policy_answers_from_the_worker_of_the_senders_cpu",
    "ipv6::hash_over_ipv6_puts_each_client_on_its_predicted_worker",
    "living::workers_added_and_drained_under_load_lose_nothing",
    "living::queued_and_half_open_connections_move_when_a_listener_closes",
    "living::a_second_process_joins_serves_and_leaves",
    "adopt::a_python_server_serves_its_share_under_round_robin",
    "errors::no_privilege_names_the_capabilities",
    "errors::without_listener_migration_the_program_selects_only",
    IPVS,
    TOO_OLD,
];

/// Tests that need at least two CPUs to prove anything (each CPU's
/// connections must reach a different worker, or a worker's queue must
/// fill while another serves): they fail with a message saying so on one
/// CPU, so a 1-vCPU cell does not run them and the table says why.
const NEEDS_TWO_CPUS: &[&str] = &[
    "policy_cpu::every_connection_reaches_the_worker_of_its_cpu",
    "policy_cpu::more_workers_than_cpus_stay_on_their_cpu",
    "udp::cpu_policy_answers_from_the_worker_of_the_senders_cpu",
    "ipv6::cpu_steering_over_ipv6",
    "living::queued_and_half_open_connections_move_when_a_listener_closes",
];

/// The tests of the NUMA cell ([`Kernel::NumaV6_1`]): the node test needs
/// two NUMA nodes and fails anywhere else, so it runs only there.
pub const NUMA: &[&str] = &[
    "policy_cpu::cpus_without_a_worker_go_to_a_worker_of_their_numa_node",
    "policy_cpu::every_cpu_has_a_worker_whatever_the_worker_count",
];

/// vCPUs of the NUMA cell: two sockets of four cores, one node each.
const NUMA_CPUS: u32 = 8;

/// The IPVS form of the cluster test: it must run where the modules
/// load (the x86-64 VM cells, which carry them and `ipvsadm`).
const IPVS: &str = "cluster::ipvs_maglev_keeps_affinity_and_a_host_leaving_moves_its_keys";

/// What a test is told in the x86-64 VM cells.
fn env_of(t: &TestName) -> String {
    if t.to_string() != IPVS {
        return String::new();
    }
    // Its measurements go to the console (target/vm/cells/*/console.log).
    let mut env = "REUSEPORT_EXPECT_IPVS=1 RUST_TEST_NOCAPTURE=1".to_string();
    // A full measurement (`REUSEPORT_CLUSTER_KEYS=10000 cargo xtask vm-test
    // --tests cluster::ipvs...`): the keys, and time for them (about 25 s
    // per 400 keys under emulation here), past the usual limit.
    if let Some(keys) = cluster_keys() {
        let limit = longest_test().as_secs();
        env.push_str(&format!(" REUSEPORT_CLUSTER_KEYS={keys} VM_LIMIT={limit}"));
    }
    env
}

/// `REUSEPORT_CLUSTER_KEYS` of the environment, if set.
fn cluster_keys() -> Option<u64> {
    std::env::var("REUSEPORT_CLUSTER_KEYS")
        .ok()
        .and_then(|k| k.parse().ok())
}

/// The longest a test of this run may take: [`TEST_TIMEOUT`], or for a
/// full IPVS measurement time for its keys (about 25 s per 400 keys under
/// emulation here, with room to spare).
fn longest_test() -> Duration {
    TEST_TIMEOUT.max(Duration::from_secs(
        cluster_keys().map_or(0, |keys| keys * 3 / 20),
    ))
}

/// What `vm-test` runs.
pub struct Options {
    /// The kernels.
    pub kernels: Vec<Kernel>,
    /// vCPU counts of each VM cell.
    pub cpus: Vec<u32>,
    /// The tests (`file::name`, or `file` for all of a file's tests);
    /// [`FULL`] when empty.
    pub tests: Vec<String>,
    /// Where to write the table (relative to the workspace).
    pub results: PathBuf,
}

/// Parses `--cpus 1,4,8`.
pub fn parse_cpus(s: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match n.parse::<u32>() {
            Ok(v @ 1..=64) => out.push(v),
            _ => bail!("--cpus takes vCPU counts between 1 and 64, not `{n}`"),
        }
    }
    if out.is_empty() {
        bail!("--cpus names no vCPU count");
    }
    Ok(out)
}

/// A test's outcome in one cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    /// The executable has no test of that name.
    Missing,
    /// It ran past its time and was killed (or the VM stopped answering).
    Timeout,
    /// The VM ended (or never booted) before reaching it.
    NotRun,
    /// Not run: the test cannot prove its point with this few CPUs (it
    /// fails loudly there, never passes vacuously), see [`NEEDS_TWO_CPUS`].
    TooFewCpus,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Missing => "MISSING",
            Outcome::Timeout => "TIMEOUT",
            Outcome::NotRun => "NOT RUN",
            Outcome::TooFewCpus => "n/a (1 CPU)",
        })
    }
}

/// The results of one cell.
struct Cell {
    title: String,
    outcomes: BTreeMap<String, Outcome>,
    note: String,
}

/// Longest a single test may run in a VM cell (TCG is 5 to 20 times slower
/// than the host).
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

fn say(msg: &str) {
    println!("xtask vm: {msg}");
}

/// Runs the matrix and prints (and writes) its table; fails if any test
/// did not pass.
pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir).context("creating target/vm")?;
    let started = Instant::now();

    let wanted: Vec<String> = if opts.tests.is_empty() {
        FULL.iter().map(|s| s.to_string()).collect()
    } else {
        opts.tests.clone()
    };

    let exes = build(root, Arch::X86_64)?;
    let tests = resolve_tests(&wanted, &exes)?;
    let numa_wanted: Vec<String> = NUMA.iter().map(|s| s.to_string()).collect();
    let numa_tests = resolve_tests(&numa_wanted, &exes)?;
    // Every test of some cell, for the x86-64 guest image and the table.
    let mut all_tests = tests.clone();
    if opts.kernels.contains(&Kernel::NumaV6_1) {
        for t in &numa_tests {
            if !all_tests.contains(t) {
                all_tests.push(t.clone());
            }
        }
    }
    let needs_vm = opts.kernels.iter().any(|k| *k != Kernel::Host);

    let mut cells = Vec::new();
    if needs_vm {
        ensure_tools(&opts.kernels)?;
        let mut bases: BTreeMap<Arch, PathBuf> = BTreeMap::new();
        let accel = accel(&vm_dir)?;
        for &kernel in opts.kernels.iter().filter(|k| **k != Kernel::Host) {
            let arch = kernel.arch();
            let tests: Vec<TestName> = match arch {
                Arch::X86_64 if kernel == Kernel::NumaV6_1 => numa_tests.clone(),
                Arch::X86_64 => tests.clone(),
                Arch::Aarch64 => tests
                    .iter()
                    .filter(|t| ARM64.contains(&t.to_string().as_str()))
                    .cloned()
                    .collect(),
            };
            if tests.is_empty() {
                continue;
            }
            let base = match bases.get(&arch) {
                Some(b) => b.clone(),
                None => {
                    let base = vm_dir.join(format!("initramfs-{}", arch.debian()));
                    if arch == Arch::X86_64 {
                        stage(root, &vm_dir, arch, &exes, &all_tests, &base)?;
                    } else {
                        let cross = build(root, arch)?;
                        stage(root, &vm_dir, arch, &cross, &tests, &base)?;
                    }
                    bases.insert(arch, base.clone());
                    base
                }
            };
            let accel = if arch == Arch::X86_64 {
                accel
            } else {
                Accel::Tcg
            };
            let image = fetch_kernel(&vm_dir, kernel)?;
            // 5.10 runs only the too-old test, on one vCPU: the rest is
            // expected to fail there, by design.
            let (plan, cpus): (Vec<(TestName, String)>, Vec<u32>) = if kernel == Kernel::V5_10 {
                let Some(t) = tests.iter().find(|t| t.to_string() == TOO_OLD) else {
                    continue;
                };
                (
                    vec![(
                        t.clone(),
                        format!("REUSEPORT_TEST_KERNEL_LACKS={MISSING_ON_5_10:?}"),
                    )],
                    vec![1],
                )
            } else if kernel == Kernel::NumaV6_1 {
                // Its output (the per-node counts) goes to the console.
                (
                    tests
                        .iter()
                        .map(|t| {
                            let env = "REUSEPORT_EXPECT_NUMA=1 RUST_TEST_NOCAPTURE=1";
                            (t.clone(), env.to_string())
                        })
                        .collect(),
                    vec![NUMA_CPUS],
                )
            } else if arch == Arch::Aarch64 {
                // Emulating another instruction set is slower: 2 vCPUs.
                (
                    tests.iter().map(|t| (t.clone(), String::new())).collect(),
                    vec![2],
                )
            } else {
                (
                    tests.iter().map(|t| (t.clone(), env_of(t))).collect(),
                    opts.cpus.clone(),
                )
            };
            for cpus in cpus {
                let (plan, skipped): (Vec<_>, Vec<_>) = plan
                    .iter()
                    .cloned()
                    .partition(|(t, _)| cpus >= 2 || !NEEDS_TWO_CPUS.contains(&&*t.to_string()));
                let mut cell = vm_cell(&vm_dir, &base, &image, kernel, cpus, &plan, accel)?;
                for (t, _) in skipped {
                    cell.outcomes.insert(t.to_string(), Outcome::TooFewCpus);
                }
                cells.push(cell);
            }
        }
    }
    if opts.kernels.contains(&Kernel::Host) {
        cells.push(host_cell(root, &exes, &tests, &vm_dir)?);
    }

    let table = render(&cells, &all_tests, started.elapsed());
    println!("{table}");
    let out = root.join(&opts.results);
    fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    say(&format!("table written to {}", out.display()));
    let bad: Vec<String> = cells
        .iter()
        .flat_map(|c| {
            c.outcomes
                .iter()
                .filter(|(_, o)| !matches!(**o, Outcome::Pass | Outcome::TooFewCpus))
                .map(move |(t, o)| format!("{} {t}: {o}", c.title))
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "{} test run(s) did not pass (logs in target/vm/logs):\n  {}",
            bad.len(),
            bad.join("\n  ")
        );
    }
    Ok(())
}

/// The test executables of the `tests` crate, by file name, and the
/// `reuseport` binary: built with `cargo test --no-run`, found in cargo's
/// JSON messages.
struct Executables {
    tests: BTreeMap<String, PathBuf>,
    reuseport: PathBuf,
}

fn build(root: &Path, arch: Arch) -> Result<Executables> {
    let target: Vec<&str> = match arch.rust_target() {
        Some(t) => vec!["--target", t],
        None => Vec::new(),
    };
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new(crate::cargo_bin());
        cmd.current_dir(root).args(args).args(&target);
        if arch == Arch::Aarch64 {
            // Debian's cross gcc links and compiles the C parts (freetype);
            // fontconfig is opened at run time, so the build needs no
            // arm64 fontconfig to link against.
            cmd.env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            )
            .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
            .env("CXX_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-g++")
            .env("RUST_FONTCONFIG_DLOPEN", "on");
        }
        cmd
    };
    say(&format!(
        "cargo build -p reuseport-cli --bin reuseport {}",
        target.join(" ")
    ));
    crate::status(&mut cargo(&[
        "build",
        "-p",
        "reuseport-cli",
        "--bin",
        "reuseport",
    ]))?;
    say(&format!(
        "cargo test -p reuseport-tests --no-run --message-format=json {}",
        target.join(" ")
    ));
    let out = cargo(&[
        "test",
        "-p",
        "reuseport-tests",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit())
    .output()
    .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut tests = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let is_test_target = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|v| v == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test_target,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            tests.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    if tests.is_empty() {
        bail!("cargo reported no test executable of the tests crate");
    }
    let dir = match arch.rust_target() {
        Some(t) => root.join("target").join(t).join("debug"),
        None => root.join("target/debug"),
    };
    Ok(Executables {
        tests,
        reuseport: dir.join("reuseport"),
    })
}

/// Expands `file` to every test of that file (`--list`) and checks that
/// each `file::name` names an executable.
fn resolve_tests(wanted: &[String], exes: &Executables) -> Result<Vec<TestName>> {
    let mut out = Vec::new();
    for w in wanted {
        let (file, name) = match w.split_once("::") {
            Some((f, n)) => (f, Some(n)),
            None => (w.as_str(), None),
        };
        let Some(exe) = exes.tests.get(file) else {
            bail!(
                "no test file `{file}` (there are: {})",
                exes.tests.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        match name {
            Some(n) => out.push(TestName {
                file: file.into(),
                name: n.into(),
            }),
            None => {
                let list = Command::new(exe)
                    .args(["--list", "--format", "terse"])
                    .output()
                    .with_context(|| format!("listing the tests of {file}"))?;
                for l in String::from_utf8_lossy(&list.stdout).lines() {
                    if let Some(n) = l.strip_suffix(": test") {
                        out.push(TestName {
                            file: file.into(),
                            name: n.into(),
                        });
                    }
                }
            }
        }
    }
    out.dedup();
    Ok(out)
}

/// Installs QEMU and busybox-static when missing (Debian, as root), and
/// for arm64 the cross toolchain.
fn ensure_tools(kernels: &[Kernel]) -> Result<()> {
    let arm = kernels.iter().any(|k| k.arch() == Arch::Aarch64);
    if arm {
        say("rustup target add aarch64-unknown-linux-gnu (if missing)");
        crate::status(Command::new("rustup").args(["target", "add", "aarch64-unknown-linux-gnu"]))?;
    }
    let mut wanted = vec![
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/bin/strip", "binutils"),
        // The cluster tests: IPVS's tool, and xz for 6.12's modules.
        ("/usr/sbin/ipvsadm", "ipvsadm"),
        ("/usr/bin/xz", "xz-utils"),
    ];
    if arm {
        wanted.extend([
            ("/usr/bin/qemu-system-aarch64", "qemu-system-arm"),
            ("/usr/bin/aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            // freetype-sys's build asks for the C++ compiler too.
            ("/usr/bin/aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
            (
                "/usr/aarch64-linux-gnu/include/stdio.h",
                "libc6-dev-arm64-cross",
            ),
        ]);
    }
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .map(|(_, pkg)| pkg)
        .collect();
    // Debian's dynamic busybox would need its libraries in the guest too.
    let static_busybox = Command::new("file")
        .arg("-L")
        .arg("/bin/busybox")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
        .unwrap_or(true);
    let mut packages = missing;
    if !static_busybox && !packages.contains(&"busybox-static") {
        packages.push("busybox-static");
    }
    if packages.is_empty() {
        say("qemu-system-x86_64, static busybox, strip: present");
        return Ok(());
    }
    say(&format!("installing {}", packages.join(" ")));
    crate::setup::apt_install(&packages)
}

/// Which accelerator boots: KVM if `/dev/kvm` boots a guest within a few
/// seconds, else TCG. Probed once, remembered in `target/vm/accel`
/// (delete it to probe again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

fn accel(vm_dir: &Path) -> Result<Accel> {
    let memo = vm_dir.join("accel");
    if let Ok(s) = fs::read_to_string(&memo) {
        match s.split_whitespace().next() {
            Some("kvm") => return Ok(Accel::Kvm),
            Some("tcg") => {
                say("using TCG (emulation): KVM did not boot here before (delete target/vm/accel to probe again)");
                return Ok(Accel::Tcg);
            }
            _ => {}
        }
    }
    let found = if !Path::new("/dev/kvm").exists() {
        say("no /dev/kvm: using TCG (emulation)");
        Accel::Tcg
    } else {
        say("probing KVM with a 30 s boot of 6.1");
        let image = fetch_kernel(vm_dir, Kernel::V6_1)?;
        let probe = vm_dir.join("kvm-probe.cpio");
        let mut a = Archive::create(&probe)?;
        add_busybox(&mut a, Path::new("/bin/busybox"))?;
        a.file(
            "init",
            0o755,
            b"#!/bin/sh\necho '@@VM init'\necho '@@VM done'\npoweroff -f\n",
        )?;
        a.finish()?;
        let log = vm_dir.join("kvm-probe.log");
        let booted = boot(
            &image,
            &probe,
            &log,
            1,
            Accel::Kvm,
            Duration::from_secs(30),
            Arch::X86_64,
            false,
        )
        .map(|b| b.init_seen)
        .unwrap_or(false);
        if booted {
            say("KVM boots: using it");
            Accel::Kvm
        } else {
            say("KVM did not boot a guest within 30 s (see target/vm/kvm-probe.log): using TCG (emulation)");
            Accel::Tcg
        }
    };
    let word = if found == Accel::Kvm { "kvm" } else { "tcg" };
    fs::write(&memo, format!("{word}\n")).context("writing target/vm/accel")?;
    Ok(found)
}

/// A kernel image ready to boot.
struct Image {
    vmlinuz: PathBuf,
    package: String,
}

/// Finds the newest cloud image package of `kernel`, downloads it once and
/// unpacks it once; returns its vmlinuz.
fn fetch_kernel(vm_dir: &Path, kernel: Kernel) -> Result<Image> {
    let (pattern, extra_source) = kernel.package();
    let apt_opts = match extra_source {
        Some(line) => private_apt(vm_dir, &kernel.to_string(), line, kernel.arch())?,
        None => Vec::new(),
    };
    let found = Command::new("apt-cache")
        .args(&apt_opts)
        .args(["search", "--names-only", pattern])
        .output()
        .context("running apt-cache search")?;
    let newest = String::from_utf8_lossy(&found.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .max_by_key(|name| version_key(name));
    let dir = vm_dir.join("kernels");
    let package = match newest {
        Some(p) => p,
        None => {
            // Offline, or the lists are gone: use what was unpacked before.
            let old = fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    // The NUMA cell boots 6.1's image.
                    let same = if kernel == Kernel::NumaV6_1 {
                        Kernel::V6_1
                    } else {
                        kernel
                    };
                    n.starts_with(&format!("linux-image-{same}"))
                })
                .max_by_key(|n| version_key(n));
            match old {
                Some(p) => p,
                None => bail!(
                    "apt knows no package matching {pattern}: run `apt-get update` (it lists bookworm's kernels)"
                ),
            }
        }
    };
    let unpacked = dir.join(&package);
    if let Some(v) = vmlinuz_in(&unpacked) {
        return Ok(Image {
            vmlinuz: v,
            package,
        });
    }
    let debs = vm_dir.join("debs");
    fs::create_dir_all(&debs)?;
    let has_deb = |debs: &Path| {
        fs::read_dir(debs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
    };
    let deb = match has_deb(&debs) {
        Some(d) => d,
        None => {
            say(&format!("apt-get download {package} (into target/vm/debs)"));
            crate::status(
                Command::new("apt-get")
                    .current_dir(&debs)
                    .args(&apt_opts)
                    .args(["download", "-q", &package]),
            )?;
            has_deb(&debs).context("apt-get download left no .deb")?
        }
    };
    say(&format!("unpacking {} (dpkg-deb -x)", deb.display()));
    let tmp = dir.join(format!("{package}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    crate::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    // Only the image is needed: the cloud kernels build in what we use.
    let _ = fs::remove_dir_all(tmp.join("lib"));
    let _ = fs::remove_dir_all(tmp.join("usr"));
    fs::rename(&tmp, &unpacked)?;
    let vmlinuz = vmlinuz_in(&unpacked).context("the package holds no boot/vmlinuz-*")?;
    Ok(Image { vmlinuz, package })
}

fn vmlinuz_in(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// The numbers in a package name, to order `6.1.0-9` before `6.1.0-57`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// apt options for a source list of our own (bullseye's 5.10 is not in
/// this system's sources): its lists and cache live under target/vm/apt-NAME
/// and the system's apt configuration is left alone. Updated once.
fn private_apt(vm_dir: &Path, name: &str, source: &str, arch: Arch) -> Result<Vec<String>> {
    let dir = vm_dir.join(format!("apt-{name}"));
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    fs::create_dir_all(dir.join("parts"))?;
    let list = dir.join("sources.list");
    fs::write(&list, format!("{source}\n"))?;
    let opts = vec![
        format!("-oAPT::Architecture={}", arch.debian()),
        format!("-oAPT::Architectures={}", arch.debian()),
        format!("-oDir::Etc::SourceList={}", list.display()),
        format!("-oDir::Etc::SourceParts={}", dir.join("parts").display()),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
    ];
    let have_lists = fs::read_dir(&lists)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false);
    if !have_lists {
        say(&format!(
            "apt-get update for `{source}` (lists kept in target/vm/apt-{name})"
        ));
        crate::status(Command::new("apt-get").args(&opts).args(["update", "-q"]))?;
    }
    Ok(opts)
}

/// Adds static busybox (`path`) as /bin/busybox with the applets /init uses.
fn add_busybox(a: &mut Archive, path: &Path) -> Result<()> {
    let bb = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    a.file("bin/busybox", 0o755, &bb)?;
    for applet in [
        "sh", "mount", "mkdir", "cat", "echo", "timeout", "poweroff", "uname", "nproc", "env",
        "sleep", "ln", "ls", "grep",
    ] {
        a.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// The guest's /init. Each test runs alone (`--exact`, one thread), with a
/// time limit, between `@@VM begin` / `@@VM end NAME rc=N` lines; the
/// plan's lines are `FILE NAME [ENV="VALUE"...]` (the variables quoted for
/// the shell).
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
# Modules the cluster tests need (veth, IPVS), when the cell carries them.
if [ -f /modules/order ]; then
    while read -r m; do insmod /modules/$m || echo "@@VM insmod $m failed"; done < /modules/order
fi
echo "@@VM init kernel=$(uname -r) cpus=$(nproc)"
export REUSEPORT_BIN=/bin/reuseport RUST_BACKTRACE=1 HOME=/root
export LD_LIBRARY_PATH=/lib/aarch64-linux-gnu
while read -r file name extra; do
    [ -n "$file" ] || continue
    echo "@@VM begin $file::$name"
    limit={timeout}
    for kv in $extra; do case "$kv" in VM_LIMIT=*) limit="${{kv#VM_LIMIT=}}";; esac; done
    eval "env $extra timeout -s KILL $limit /t/$file --exact \"\$name\" --test-threads 1" </dev/null 2>&1
    echo "@@VM end $file::$name rc=$?"
done < /plan
echo "@@VM done"
poweroff -f
"#,
        timeout = TEST_TIMEOUT.as_secs()
    )
}

/// Writes the parts of the guest every cell of `arch` shares (everything
/// but /plan) into the archive `base`.
fn stage(
    root: &Path,
    vm_dir: &Path,
    arch: Arch,
    exes: &Executables,
    tests: &[TestName],
    base: &Path,
) -> Result<()> {
    say(&format!(
        "staging the {} guest: busybox, {}reuseport and the test executables (stripped)",
        arch.debian(),
        if arch == Arch::X86_64 {
            "ip, setpriv, python3, "
        } else {
            ""
        }
    ));
    let stage = base.with_extension("d");
    fs::create_dir_all(&stage)?;
    let mut a = Archive::create(base)?;
    let busybox = match arch {
        Arch::X86_64 => PathBuf::from("/bin/busybox"),
        Arch::Aarch64 => arm64_busybox(vm_dir)?,
    };
    add_busybox(&mut a, &busybox)?;
    // /run: `ip netns add` keeps its namespaces in /run/netns.
    for d in ["proc", "sys", "dev", "tmp", "root", "t", "run"] {
        a.dir(d)?;
    }
    a.file("init", 0o755, init_script().as_bytes())?;
    a.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )?;
    a.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;

    // Each binary with its shared libraries: guest path -> host file.
    let mut libs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut add_binary = |a: &mut Archive, path: &Path, guest: &str| -> Result<()> {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        a.file(guest, 0o755, &data)?;
        match arch {
            Arch::X86_64 => libs.extend(
                shared_libs(path)?
                    .into_iter()
                    .map(|p| (p.to_string_lossy().into_owned(), p)),
            ),
            Arch::Aarch64 => cross_libs(path, &mut libs)?,
        }
        Ok(())
    };
    if arch == Arch::X86_64 {
        for tool in ["ip", "setpriv"] {
            let path = which(tool)?;
            add_binary(&mut a, &path, &format!("usr/bin/{tool}"))?;
        }
        // The IPVS front-end of the cluster tests.
        if let Ok(path) = which("ipvsadm") {
            add_binary(&mut a, &path, "usr/bin/ipvsadm")?;
        }
    } else {
        // busybox's: enough for `ip link set lo up`.
        a.symlink("bin/ip", "busybox")?;
    }

    // The binaries under test, without debug information (a fraction of
    // the size, so the initramfs unpacks quickly under emulation).
    let strip_tool = match arch {
        Arch::X86_64 => "strip",
        Arch::Aarch64 => "aarch64-linux-gnu-strip",
    };
    let strip = |src: &Path, name: &str| -> Result<PathBuf> {
        let dst = stage.join(name);
        crate::status(
            Command::new(strip_tool)
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dst)
                .arg(src),
        )?;
        Ok(dst)
    };
    let bin = strip(&exes.reuseport, "reuseport")?;
    add_binary(&mut a, &bin, "bin/reuseport")?;
    let files: std::collections::BTreeSet<&str> = tests.iter().map(|t| t.file.as_str()).collect();
    for file in files {
        let exe = strip(&exes.tests[file], file)?;
        add_binary(&mut a, &exe, &format!("t/{file}"))?;
    }

    // A Python for the adopt tests: the interpreter and the modules the
    // fixture imports (as the host's Python loads them).
    let python = Path::new("/usr/bin/python3");
    if arch == Arch::X86_64 && python.exists() {
        let real = fs::canonicalize(python)?;
        add_binary(&mut a, &real, "usr/bin/python3")?;
        let modules = Command::new(&real)
            .args([
                "-c",
                "import os, socket, sys\nfor m in list(sys.modules.values()):\n    f = getattr(m, '__file__', None)\n    if f: print(f)",
            ])
            .output()
            .context("asking python3 for its modules")?;
        for m in String::from_utf8_lossy(&modules.stdout).lines() {
            let p = Path::new(m);
            let data = fs::read(p).with_context(|| format!("reading {m}"))?;
            a.file(m, 0o644, &data)?;
            if m.ends_with(".so") {
                libs.extend(
                    shared_libs(p)?
                        .into_iter()
                        .map(|p| (p.to_string_lossy().into_owned(), p)),
                );
            }
        }
        // Python finds its prefix by this landmark.
        let landmark = "/usr/lib/python3.11/os.py";
        if let Ok(data) = fs::read(landmark) {
            a.file(landmark, 0o644, &data)?;
        }
        let fixtures = root.join("tests/fixtures");
        for e in fs::read_dir(&fixtures).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_file() {
                a.file(&p.to_string_lossy(), 0o644, &fs::read(&p)?)?;
            }
        }
    }

    for (guest, host) in libs {
        let data = fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
        a.file(&guest, 0o755, &data)?;
    }
    a.finish()?;
    let size = fs::metadata(base).map(|m| m.len()).unwrap_or(0);
    say(&format!("guest image: {} MiB", size >> 20));
    Ok(())
}

/// Debian's busybox-static for arm64, downloaded and unpacked once under
/// target/vm/busybox-arm64.
fn arm64_busybox(vm_dir: &Path) -> Result<PathBuf> {
    let dir = vm_dir.join("busybox-arm64");
    let bin = dir.join("bin/busybox");
    if bin.exists() {
        return Ok(bin);
    }
    let opts = private_apt(vm_dir, "arm64-6.1", BOOKWORM, Arch::Aarch64)?;
    let debs = vm_dir.join("debs");
    fs::create_dir_all(&debs)?;
    say("apt-get download busybox-static (arm64, into target/vm/debs)");
    crate::status(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(&opts)
            .args(["download", "-q", "busybox-static"]),
    )?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("busybox-static_") && n.ends_with("_arm64.deb")
            })
        })
        .context("apt-get download left no busybox-static .deb")?;
    crate::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    if !bin.exists() {
        bail!("{} holds no bin/busybox", deb.display());
    }
    Ok(bin)
}

/// The shared libraries an aarch64 binary needs (`readelf -d`, followed
/// recursively), from Debian's cross libc (libc6-arm64-cross), placed where
/// the arm64 guest's loader looks: /lib/aarch64-linux-gnu, the loader itself
/// at /lib/ld-linux-aarch64.so.1.
fn cross_libs(path: &Path, libs: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    let sysroot = Path::new("/usr/aarch64-linux-gnu/lib");
    let loader = sysroot.join("ld-linux-aarch64.so.1");
    libs.insert("lib/ld-linux-aarch64.so.1".into(), loader);
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let out = Command::new("aarch64-linux-gnu-readelf")
            .arg("-d")
            .arg(&p)
            .output()
            .with_context(|| format!("aarch64-linux-gnu-readelf -d {}", p.display()))?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = l
                .split_once("Shared library: [")
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(n, _)| n)
            else {
                continue;
            };
            let guest = format!("lib/aarch64-linux-gnu/{name}");
            if libs.contains_key(&guest) || name.starts_with("ld-linux") {
                continue;
            }
            let host = sysroot.join(name);
            if !host.exists() {
                bail!(
                    "{} needs {name}, which {} lacks",
                    p.display(),
                    sysroot.display()
                );
            }
            libs.insert(guest, host.clone());
            todo.push(host);
        }
    }
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return Ok(fs::canonicalize(p)?);
        }
    }
    bail!("`{tool}` is not installed (run `cargo xtask setup`? the tests need it)")
}

/// The shared libraries `ldd` lists for `path` (and the dynamic loader).
fn shared_libs(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .with_context(|| format!("ldd {}", path.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

/// The outcome of one boot.
struct Boot {
    init_seen: bool,
    console: String,
    elapsed: Duration,
}

/// Boots `image` with `initrd` and `cpus` vCPUs, its console going to
/// `log`. Returns when the guest powers off, when /init has not started
/// within the boot time limit (a stall), or when no test has reported for
/// longer than one test may take. `numa`: two sockets, one NUMA node each.
#[allow(clippy::too_many_arguments)] // one boot's settings, each used once
fn boot(
    image: &Image,
    initrd: &Path,
    log: &Path,
    cpus: u32,
    accel: Accel,
    boot_limit: Duration,
    arch: Arch,
    numa: bool,
) -> Result<Boot> {
    let _ = fs::remove_file(log);
    let (qemu, console) = match arch {
        Arch::X86_64 => ("qemu-system-x86_64", "ttyS0"),
        Arch::Aarch64 => ("qemu-system-aarch64", "ttyAMA0"),
    };
    let mut cmd = Command::new(qemu);
    if arch == Arch::Aarch64 {
        cmd.args(["-M", "virt"]);
    }
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
    };

    let mem = 1024 + 128 * cpus;
    if numa {
        // Two sockets, each its own NUMA node with half of the memory: the
        // guest's /sys/devices/system/node/node{0,1}/cpulist read 0-3 and
        // 4-7, and each socket has its own last-level cache.
        let half = cpus / 2;
        cmd.args([
            "-smp",
            &format!("{cpus},sockets=2,cores={half},threads=1"),
            "-m",
            &mem.to_string(),
        ]);
        for node in 0..2 {
            cmd.args([
                "-object",
                &format!("memory-backend-ram,id=m{node},size={}M", mem / 2),
                "-numa",
                &format!(
                    "node,nodeid={node},cpus={}-{},memdev=m{node}",
                    node * half,
                    node * half + half - 1
                ),
            ]);
        }
    } else {
        cmd.args(["-smp", &cpus.to_string(), "-m", &mem.to_string()]);
    }
    cmd.arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 with -no-reboot: a kernel panic ends QEMU at once.
        .args([
            "-append",
            &format!("console={console} quiet loglevel=1 panic=-1 rdinit=/init"),
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-serial",
        ])
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {qemu}"))?;
    let mut init_seen = false;
    let mut last_report = Instant::now();
    let mut seen_len = 0;
    let ended = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        let console = read_console(log);
        if console.len() != seen_len {
            let new = &console[seen_len.min(console.len())..];
            if new.contains("@@VM") {
                last_report = Instant::now();
            }
            seen_len = console.len();
        }
        if !init_seen && console.contains("@@VM init") {
            init_seen = true;
        }
        if !init_seen && started.elapsed() > boot_limit {
            break None;
        }
        if init_seen && last_report.elapsed() > longest_test() + Duration::from_secs(60) {
            break None;
        }
        thread::sleep(Duration::from_millis(250));
    };
    if ended.is_none() {
        kill(&mut child);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let mut console = read_console(log);
    if !err.trim().is_empty() {
        console.push_str("\n@@QEMU stderr: ");
        console.push_str(&err);
    }
    Ok(Boot {
        init_seen: console.contains("@@VM init"),
        console,
        elapsed: started.elapsed(),
    })
}

/// The console so far; the guest's tty ends lines with CR LF.
fn read_console(log: &Path) -> String {
    fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// Ends a QEMU we started (by its own handle, nothing else).
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// One VM cell: a guest image with this cell's plan, booted (retried once
/// if the boot stalls), its console parsed.
/// The downloaded .deb of kernel image package `package`.
fn kernel_deb(vm_dir: &Path, package: &str) -> Result<PathBuf> {
    fs::read_dir(vm_dir.join("debs"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("no .deb of {package} in target/vm/debs"))
}

fn vm_cell(
    vm_dir: &Path,
    base: &Path,
    image: &Image,
    kernel: Kernel,
    cpus: u32,
    plan: &[(TestName, String)],
    accel: Accel,
) -> Result<Cell> {
    let name = format!("{kernel}-{cpus}cpu");
    let title = if kernel == Kernel::NumaV6_1 {
        format!("6.1 ×{cpus} numa")
    } else {
        format!("{kernel} ×{cpus}")
    };
    let cell_dir = vm_dir.join("cells").join(&name);
    fs::create_dir_all(&cell_dir)?;
    // The shared archive, then a second one with the plan: the kernel
    // unpacks concatenated archives one after the other.
    let initrd = cell_dir.join("initramfs");
    fs::copy(base, &initrd).context("copying the guest image")?;
    let plan_cpio = cell_dir.join("plan.cpio");
    let mut a = Archive::create(&plan_cpio)?;
    let text: String = plan
        .iter()
        .map(|(t, env)| format!("{} {} {env}\n", t.file, t.name))
        .collect();
    a.file("plan", 0o644, text.as_bytes())?;
    a.finish()?;
    {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new().append(true).open(&initrd)?;
        f.write_all(&fs::read(&plan_cpio)?)?;
    }
    // The cluster tests need modules this kernel builds as such (veth,
    // IPVS): a third archive with them, from the kernel's own package.
    if plan.iter().any(|(t, _)| t.file == "cluster") {
        let modules_cpio = cell_dir.join("modules.cpio");
        match kernel_deb(vm_dir, &image.package)
            .and_then(|deb| crate::vm_modules::archive(&deb, &cell_dir, &modules_cpio))
        {
            Ok(order) => {
                say(&format!("{title}: modules {}", order.join(" ")));
                use std::io::Write as _;
                let mut f = fs::OpenOptions::new().append(true).open(&initrd)?;
                f.write_all(&fs::read(&modules_cpio)?)?;
            }
            Err(e) => say(&format!("{title}: no modules for the cluster tests: {e:#}")),
        }
    }

    // Boots reach /init in about 5 s with a few vCPUs under TCG here; more
    // vCPUs take longer to bring up.
    let boot_limit = Duration::from_secs(60 + 15 * u64::from(cpus));
    let log = cell_dir.join("console.log");
    let accel_name = if accel == Accel::Kvm { "KVM" } else { "TCG" };
    say(&format!(
        "{title}: booting {} with {cpus} vCPU(s) under {accel_name}, {} test(s)",
        image.package,
        plan.len()
    ));
    let arch = kernel.arch();
    let numa = kernel == Kernel::NumaV6_1;
    let mut attempt = boot(image, &initrd, &log, cpus, accel, boot_limit, arch, numa)?;
    let mut retried = false;
    if !attempt.init_seen {
        say(&format!(
            "{title}: the boot stalled before /init ({} s); retrying once",
            attempt.elapsed.as_secs()
        ));
        let _ = fs::copy(&log, cell_dir.join("console-stalled.log"));
        attempt = boot(image, &initrd, &log, cpus, accel, boot_limit, arch, numa)?;
        retried = true;
    }
    let outcomes = parse_console(
        &attempt.console,
        plan.iter().map(|(t, _)| t),
        &vm_dir.join("logs").join(&name),
    );
    let passed = outcomes.values().filter(|o| **o == Outcome::Pass).count();
    say(&format!(
        "{title}: {passed}/{} passed in {} s{}",
        outcomes.len(),
        attempt.elapsed.as_secs(),
        if retried {
            " (after a retried boot)"
        } else {
            ""
        }
    ));
    let kernel_line = attempt
        .console
        .lines()
        .find_map(|l| l.split("@@VM init ").nth(1))
        .unwrap_or("did not boot")
        .trim()
        .to_string();
    Ok(Cell {
        title,
        outcomes,
        note: format!(
            "{} ({kernel_line}), {accel_name}, {} s{}",
            image.package,
            attempt.elapsed.as_secs(),
            if retried { ", boot retried" } else { "" }
        ),
    })
}

/// Reads each test's outcome from the console, and keeps the output of
/// each one that did not pass in `logs/TEST.log`.
fn parse_console<'a>(
    console: &str,
    plan: impl Iterator<Item = &'a TestName>,
    logs: &Path,
) -> BTreeMap<String, Outcome> {
    // Logs of an earlier run of this cell would mislead.
    let _ = fs::remove_dir_all(logs);
    let mut out = BTreeMap::new();
    for t in plan {
        let key = t.to_string();
        let begin = format!("@@VM begin {key}\n");
        let end = format!("@@VM end {key} rc=");
        let (outcome, text) = match console.find(&begin) {
            None => (Outcome::NotRun, String::new()),
            Some(b) => {
                let body = &console[b + begin.len()..];
                match body.find(&end) {
                    None => (Outcome::Timeout, body.to_string()),
                    Some(e) => {
                        let rc: i32 = body[e + end.len()..]
                            .split_whitespace()
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(-1);
                        let text = body[..e].to_string();
                        (judge(rc, &text), text)
                    }
                }
            }
        };
        if outcome != Outcome::Pass {
            let _ = fs::create_dir_all(logs);
            let _ = fs::write(logs.join(format!("{key}.log")), &text);
        }
        out.insert(key, outcome);
    }
    out
}

/// A test's outcome from its exit code and libtest's summary line.
fn judge(rc: i32, text: &str) -> Outcome {
    // busybox `timeout -s KILL` ends the test with 137.
    if rc == 137 {
        return Outcome::Timeout;
    }
    if rc == 0 && text.contains("test result: ok. 1 passed") {
        Outcome::Pass
    } else if rc == 0 && text.contains("test result: ok. 0 passed") {
        Outcome::Missing
    } else {
        Outcome::Fail
    }
}

/// The same subset run here, on the running kernel (each test in its own
/// network namespace, as `cargo test` runs them).
fn host_cell(root: &Path, exes: &Executables, tests: &[TestName], vm_dir: &Path) -> Result<Cell> {
    let release = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .context("uname -r")?
            .stdout,
    )
    .trim()
    .to_string();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let title = format!("host ×{cpus}");
    say(&format!(
        "{title}: running {} test(s) on {release}",
        tests.len()
    ));
    let logs = vm_dir.join("logs").join("host");
    let _ = fs::remove_dir_all(&logs);
    let started = Instant::now();
    let mut outcomes = BTreeMap::new();
    for t in tests {
        let mut child = Command::new(&exes.tests[&t.file])
            .current_dir(root.join("tests"))
            .args(["--exact", &t.name, "--test-threads", "1"])
            .env("REUSEPORT_BIN", &exes.reuseport)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {t}"))?;
        let mut out_pipe = child.stdout.take().expect("piped");
        let mut err_pipe = child.stderr.take().expect("piped");
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = out_pipe.read_to_string(&mut s);
            let mut e = String::new();
            let _ = err_pipe.read_to_string(&mut e);
            s + &e
        });
        let deadline = Instant::now() + TEST_TIMEOUT;
        let rc = loop {
            if let Some(st) = child.try_wait()? {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                kill(&mut child);
                break 137;
            }
            thread::sleep(Duration::from_millis(100));
        };
        let text = reader.join().unwrap_or_default();
        let outcome = judge(rc, &text);
        if outcome != Outcome::Pass {
            let _ = fs::create_dir_all(&logs);
            let _ = fs::write(logs.join(format!("{t}.log")), &text);
        }
        outcomes.insert(t.to_string(), outcome);
    }
    Ok(Cell {
        title,
        outcomes,
        note: format!("{release}, no VM, {} s", started.elapsed().as_secs()),
    })
}

/// The table: one row per test, one column per cell.
fn render(cells: &[Cell], tests: &[TestName], elapsed: Duration) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut s = format!(
        "VM test matrix, run {date} ({} min): kernel × vCPUs × test\n\n",
        elapsed.as_secs().div_ceil(60)
    );
    s.push_str("| test |");
    for c in cells {
        s.push_str(&format!(" {} |", c.title));
    }
    s.push_str("\n|---|");
    for _ in cells {
        s.push_str("---|");
    }
    s.push('\n');
    for t in tests {
        let key = t.to_string();
        if !cells.iter().any(|c| c.outcomes.contains_key(&key)) {
            continue;
        }
        s.push_str(&format!("| {key} |"));
        for c in cells {
            match c.outcomes.get(&key) {
                Some(o) => s.push_str(&format!(" {o} |")),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    for c in cells {
        s.push_str(&format!("- {}: {}\n", c.title, c.note));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lists_parse() {
        assert_eq!(
            Kernel::parse_list("all").unwrap(),
            vec![
                Kernel::V5_10,
                Kernel::V6_1,
                Kernel::NumaV6_1,
                Kernel::V6_12,
                Kernel::Arm64V6_1,
                Kernel::Host
            ]
        );
        assert_eq!(
            Kernel::parse_list("6.12,6.1").unwrap(),
            vec![Kernel::V6_1, Kernel::V6_12]
        );
        assert!(Kernel::parse_list("4.19").is_err());
        assert_eq!(parse_cpus("1,4,8").unwrap(), vec![1, 4, 8]);
        assert!(parse_cpus("0").is_err());
    }

    #[test]
    fn newest_package_by_its_numbers() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
        ];
        assert_eq!(
            names.iter().max_by_key(|n| version_key(n)).unwrap(),
            &"linux-image-6.1.0-57-cloud-amd64-unsigned"
        );
    }

    #[test]
    fn console_outcomes() {
        let t = |n: &str| TestName {
            file: "f".into(),
            name: n.into(),
        };
        let plan = [t("a"), t("b"), t("c"), t("d"), t("e")];
        let console = "\
[    1.0] noise\n@@VM init kernel=6.1 cpus=4\n\
@@VM begin f::a\n\nrunning 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed\n@@VM end f::a rc=0\n\
@@VM begin f::b\ntest b ... FAILED\ntest result: FAILED. 0 passed; 1 failed\n@@VM end f::b rc=101\n\
@@VM begin f::c\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out\n@@VM end f::c rc=0\n\
@@VM begin f::d\nrunning 1 test\n";
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
        let got = parse_console(console, plan.iter(), &dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(got["f::a"], Outcome::Pass);
        assert_eq!(got["f::b"], Outcome::Fail);
        assert_eq!(got["f::c"], Outcome::Missing);
        assert_eq!(got["f::d"], Outcome::Timeout);
        assert_eq!(got["f::e"], Outcome::NotRun);
    }
}
