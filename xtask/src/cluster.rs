//! `cargo xtask cluster`: several hosts, each serving a steered group,
//! behind an ECMP router (and IPVS where the kernel has it), all in network
//! namespaces on this machine. The topology and the measurements live in
//! the tests crate (`reuseport_tests::cluster`, binary `cluster`), which
//! the integration test `tests/tests/cluster.rs` shares; this builds both
//! binaries (release) and runs it.

use std::{path::Path, process::Command};

use anyhow::Result;

/// Builds `reuseport` and `cluster` (release), then becomes `cluster ARGS`,
/// writing `docs/cluster/report.md` unless `--out` is given.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    crate::setup::ensure()?;
    crate::setup::ensure_test_tools()?;
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "reuseport-cli",
            "--bin",
            "reuseport",
            "-p",
            "reuseport-tests",
            "--bin",
            "cluster",
        ],
    )?;
    let mut cmd = Command::new(root.join("target/release/cluster"));
    cmd.current_dir(root)
        .arg("--bin")
        .arg(root.join("target/release/reuseport"));
    if !args.iter().any(|a| a == "--out") {
        cmd.arg("--out").arg(root.join("docs/cluster"));
    }
    cmd.args(args);
    println!("xtask: {:?}", cmd);
    crate::exec(&mut cmd)
}
