//! The `reuseport` binary of an older build, for the test that takes over
//! a group created with another map layout (tests/tests/takeover.rs).
//!
//! Built once from [`OLD_LAYOUT_COMMIT`] and cached: the commit's tree is
//! exported with `git archive` into `target/old-layout/src` and built there
//! with a target directory of its own (`target/old-layout/target`); a stamp
//! file names the commit it was built from, so later runs skip the build.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The last landed commit before the maps carried a layout version.
pub const OLD_LAYOUT_COMMIT: &str = "4953d3879cdb2854de823b38575fc02e2867414b";

/// The environment variable that hands the binary's path to the tests.
pub const ENV: &str = "REUSEPORT_OLD_LAYOUT_BIN";

/// Builds (or finds, already built) the old-layout binary; returns its path.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let base = root.join("target/old-layout");
    let src = base.join("src");
    let target = base.join("target");
    let bin = target.join("debug/reuseport");
    let stamp = base.join("built-from");
    if bin.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == OLD_LAYOUT_COMMIT) {
        println!(
            "xtask: old-layout binary of {} already built: {}",
            &OLD_LAYOUT_COMMIT[..7],
            bin.display()
        );
        return Ok(bin);
    }
    println!(
        "xtask: building the reuseport binary of commit {} (before layout versions) once, into {}",
        &OLD_LAYOUT_COMMIT[..7],
        target.display()
    );
    if src.exists() {
        fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    // git archive | tar -x: the commit's files, without a second checkout
    // in the repository's worktree list.
    let mut archive = Command::new("git")
        .current_dir(root)
        .args(["archive", "--format=tar", OLD_LAYOUT_COMMIT])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let out = archive.stdout.take().context("git archive's output")?;
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(out)
        .status()
        .context("running tar")?;
    let archived = archive.wait().context("waiting for git archive")?;
    if !archived.success() || !untar.success() {
        bail!(
            "exporting commit {OLD_LAYOUT_COMMIT} failed (git archive {archived}, tar {untar}): is it in this repository?"
        );
    }
    let st = Command::new(super::cargo_bin())
        .current_dir(&src)
        .args(["build", "-p", "reuseport-user", "--bin", "reuseport"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("building the old-layout binary")?;
    if !st.success() || !bin.exists() {
        bail!("building the reuseport binary of {OLD_LAYOUT_COMMIT} failed ({st})");
    }
    fs::write(&stamp, OLD_LAYOUT_COMMIT).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}
