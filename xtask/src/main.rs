//! Project tasks. `cargo xtask <task>`:
//!
//! - `setup`: install what building the eBPF program needs, if missing
//! - `build`: build everything (release)
//! - `run -- ARGS`: build, then `reuseport run ARGS`
//! - `test`: build, then run every test (unit and integration), and one
//!   cell of the VM matrix (6.1 with 4 vCPUs)
//! - `lint`: rustfmt and clippy, the eBPF crate in its own pass, the
//!   layering check (the library's tree holds no CLI or chart crate), and
//!   the README's benchmark figures against the committed run
//! - `bench -- ARGS`: build, then `reuseport-bench ARGS`
//! - `readme`: the README's benchmark figures, regenerated from the
//!   committed run in docs/bench (`lint` checks they are)
//! - `package`: the library's package (`cargo package`), with the eBPF
//!   object built from this workspace, so it builds outside it
//! - `cluster -- ARGS`: hosts behind an ECMP router in network namespaces,
//!   measured (docs/cluster/report.md)
//! - `vm-test`: the integration tests in QEMU on Debian's kernels (see `vm`)
//!
//! `build`, `run`, `test` and `lint` run `setup` first; it is idempotent
//! and says what it installs.

mod cluster;
mod cpio;
mod old_build;
mod setup;
mod vm;
mod vm_modules;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain if missing (nightly + rust-src, LLVM, bpf-linker).
    Setup,
    /// Build the loader, its eBPF program and the tests (release).
    Build,
    /// Build, then run `reuseport run` with the arguments after `--`.
    Run {
        /// Arguments for `reuseport run`, e.g. `-- --policy cpu`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run every test: unit tests and the integration tests (as root).
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- --nocapture policy_cpu`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy -D warnings (host crates, then the eBPF
    /// crate); the library's dependency tree and the server's linked
    /// libraries (test `layering`); the README's benchmark figures against
    /// the committed run (`readme`).
    Lint,
    /// Build (release), then run `reuseport-bench` with the arguments after
    /// `--` (e.g. `-- --quick`); results go to target/bench/<time>/.
    Bench {
        /// Arguments for `reuseport-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write the README's benchmark figures (the generated block) from the
    /// committed run in docs/bench (results.csv, report.md). Commit a run
    /// with `cargo xtask bench -- --out docs/bench`, then this.
    Readme,
    /// Build (release), then run several hosts, each serving a group, behind
    /// an ECMP router in network namespaces and measure affinity, a host
    /// leaving and a worker draining (writes docs/cluster/report.md; `--
    /// --help` lists the options).
    Cluster {
        /// Arguments for the `cluster` program.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a subset of the integration tests in QEMU on Debian's kernels
    /// (and on the host's): a pass/fail table kernel x vCPUs x test,
    /// written to target/vm/results.md.
    VmTest {
        /// Kernels: 5.10 (only the kernel-too-old check), 6.1, 6.1-numa
        /// (8 vCPUs in two NUMA nodes, the NUMA tests), 6.12, arm64, host,
        /// a comma-separated list, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// vCPU counts of each VM cell, e.g. 1,4,8.
        #[arg(long, default_value = "1,4,8")]
        cpus: String,
        /// Tests as FILE::NAME or FILE (all of tests/tests/FILE.rs),
        /// comma-separated; default: the matrix's subset.
        #[arg(long, value_delimiter = ',')]
        tests: Vec<String>,
    },
    /// Package the library (`cargo package`, verified by a build outside
    /// the workspace), carrying the eBPF object built from these sources.
    Package,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            cargo(&root, &["build", "--release", "--all-targets"])
        }
        Task::Run { args } => release(&root, "reuseport", Some("run"), &args),
        Task::Test { args } => {
            setup::ensure()?;
            setup::ensure_test_tools()?;
            cargo(
                &root,
                // The examples too: the tests run them from
                // target/debug/examples, where only `cargo build` puts them.
                &[
                    "build",
                    "-p",
                    "reuseport-cli",
                    "-p",
                    "reuseport-user",
                    "--bins",
                    "--examples",
                ],
            )?;
            // The library's documentation must build cleanly too.
            let mut doc = Command::new(cargo_bin());
            doc.current_dir(&root)
                .args([
                    "doc",
                    "--no-deps",
                    "-p",
                    "reuseport-user",
                    "-p",
                    "reuseport-common",
                ])
                .env("RUSTDOCFLAGS", "-D warnings");
            println!("xtask: cargo doc (warnings are errors)");
            status(&mut doc)?;
            let bin = root.join("target/debug/reuseport");
            let old_bin = old_build::ensure(&root)?;
            let mut cmd = Command::new(cargo_bin());
            cmd.current_dir(&root)
                .args(["test", "--all-targets"])
                .args(&args)
                .env("REUSEPORT_BIN", &bin)
                .env(old_build::ENV, &old_bin);
            println!("xtask: cargo test (REUSEPORT_BIN={})", bin.display());
            status(&mut cmd)?;
            // Doc tests (the library's examples compile; they need root
            // and a network, so they are compiled, not run).
            let mut doctest = Command::new(cargo_bin());
            doctest.current_dir(&root).args([
                "test",
                "--doc",
                "-p",
                "reuseport-user",
                "-p",
                "reuseport-common",
            ]);
            println!("xtask: cargo test --doc");
            status(&mut doctest)?;
            // One cell of the VM matrix: Debian 12's kernel with 4 vCPUs
            // (and 5.10 for the kernel-too-old error); the whole matrix is
            // `cargo xtask vm-test`.
            println!("xtask: the VM cell (6.1 x 4 vCPUs, 5.10 x 1)");
            vm::run(
                &root,
                &vm::Options {
                    kernels: vec![vm::Kernel::V5_10, vm::Kernel::V6_1],
                    cpus: vec![4],
                    tests: vm::CI.iter().map(|s| s.to_string()).collect(),
                    results: "target/vm/ci-results.md".into(),
                },
            )
        }
        Task::Bench { args } => release(&root, "reuseport-bench", None, &args),
        Task::Readme => readme(&root, false),
        Task::Package => package(&root),
        Task::Cluster { args } => cluster::run(&root, &args),
        Task::VmTest {
            kernel,
            cpus,
            tests,
        } => {
            setup::ensure()?;
            setup::ensure_test_tools()?;
            vm::run(
                &root,
                &vm::Options {
                    kernels: vm::Kernel::parse_list(&kernel)?,
                    cpus: vm::parse_cpus(&cpus)?,
                    tests,
                    results: "target/vm/results.md".into(),
                },
            )
        }
        Task::Lint => {
            setup::ensure()?;
            cargo(&root, &["fmt", "--all", "--", "--check"])?;
            cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
            let mut cmd = Command::new("rustup");
            cmd.current_dir(&root)
                .args(["run", "nightly", "cargo", "clippy", "-p", "reuseport-ebpf"])
                // The test build's programs too (they include the others).
                .args(["--features", "test-programs"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"])
                .env_remove("RUSTC")
                .env_remove("RUSTC_WORKSPACE_WRAPPER");
            println!("xtask: clippy of the eBPF crate (nightly, bpfel-unknown-none)");
            status(&mut cmd)?;
            // The library's dependency tree and the server's libraries: the
            // same test CI runs, so both enforce one list.
            cargo(&root, &["build", "-p", "reuseport-cli", "--bins"])?;
            cargo(
                &root,
                &["test", "-p", "reuseport-tests", "--test", "layering"],
            )?;
            readme(&root, true)?;
            msrv(&root)
        }
    }
}

/// Sets up, builds the release binaries, then becomes `PROGRAM
/// [SUBCOMMAND] ARGS`.
fn release(root: &Path, program: &str, subcommand: Option<&str>, args: &[String]) -> Result<()> {
    setup::ensure()?;
    cargo(
        root,
        &["build", "--release", "-p", "reuseport-cli", "--bins"],
    )?;
    let bin = root.join("target/release").join(program);
    println!(
        "xtask: {} {} {}",
        bin.display(),
        subcommand.unwrap_or(""),
        args.join(" ")
    );
    exec(
        Command::new(&bin)
            .current_dir(root)
            .args(subcommand)
            .args(args),
    )
}

/// Builds the library (and so its eBPF object, from this workspace's
/// sources), puts the object where the package carries it, then packages
/// the library with the contract crate it depends on. `cargo package`
/// verifies by building the packed crates outside the workspace, where
/// build.rs takes the carried object.
fn package(root: &Path) -> Result<()> {
    setup::ensure()?;
    println!("xtask: cargo build -p reuseport-user (for its eBPF object)");
    let out = Command::new(cargo_bin())
        .current_dir(root)
        .args(["build", "-p", "reuseport-user", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p reuseport-user failed ({})", out.status);
    }
    // The build script's OUT_DIR, from cargo's own report of it.
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains("/reuseport-user#"))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("cargo did not report reuseport-user's build script")?;
    let object = out_dir.join("reuseport-ebpf");
    let carried = root.join("reuseport-user/ebpf/reuseport-ebpf.o");
    std::fs::create_dir_all(carried.parent().expect("a parent"))?;
    std::fs::copy(&object, &carried)
        .with_context(|| format!("copying {} to {}", object.display(), carried.display()))?;
    println!("xtask: {} -> {}", object.display(), carried.display());
    // --allow-dirty: the object is not tracked (it is built, not written).
    cargo(
        root,
        &[
            "package",
            "-p",
            "reuseport-common",
            "-p",
            "reuseport-user",
            "--allow-dirty",
        ],
    )
}

/// Writes (or with `check`, only compares) the README's benchmark figures
/// from the committed run: the benchmark's own generator, so the README,
/// docs/bench/report.md and results.csv cannot disagree.
fn readme(root: &Path, check: bool) -> Result<()> {
    cargo(
        root,
        &["build", "-p", "reuseport-cli", "--bin", "reuseport-bench"],
    )?;
    let mut cmd = Command::new(root.join("target/debug/reuseport-bench"));
    cmd.current_dir(root)
        .args(["readme", "--results", "docs/bench", "--readme", "README.md"]);
    if check {
        cmd.arg("--check");
    }
    println!(
        "xtask: the README's benchmark figures {} docs/bench",
        if check { "checked against" } else { "from" }
    );
    status(&mut cmd)
}

/// Checks the library with the oldest compiler it declares
/// (`rust-version`): that toolchain must be installed (`rustup toolchain
/// list`); rustup will not fetch it here.
fn msrv(root: &Path) -> Result<()> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .context("no rust-version in the workspace's Cargo.toml")?;
    // rustup names a release by its full version.
    let toolchain = match version.matches('.').count() {
        1 => format!("{version}.0"),
        _ => version.clone(),
    };
    let installed = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup toolchain list")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with(&format!("{toolchain}-")))
    {
        bail!("the MSRV is {version}, but toolchain {toolchain} is not installed: `rustup toolchain install {toolchain}`");
    }
    println!("xtask: the library with Rust {toolchain} (its rust-version)");
    status(
        Command::new("rustup")
            .current_dir(root)
            .args(["run", &toolchain, "cargo", "check", "--lib"])
            .args(["-p", "reuseport-user", "-p", "reuseport-common"])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask is not inside the workspace")
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    status(Command::new(cargo_bin()).current_dir(root).args(args))
}

/// The cargo that runs us (cargo sets `CARGO` for `cargo run`).
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{:?} failed ({st})", cmd.get_program());
    }
    Ok(())
}

/// Replaces xtask with the program, so signals (Ctrl-C) reach it directly
/// and its exit status is ours.
fn exec(cmd: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(err).with_context(|| format!("running {:?}", cmd.get_program()))
}
