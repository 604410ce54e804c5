//! Builds the eBPF program (crate `reuseport-ebpf`) with the nightly
//! toolchain for `bpfel-unknown-none` and leaves the object in `OUT_DIR`,
//! where `steering.rs` embeds it. `cargo xtask setup` installs what this
//! needs (nightly with rust-src, bpf-linker).
//!
//! With the feature `test-programs` it also builds the test object,
//! `reuseport-ebpf-test`: the same programs and maps plus the benchmark's
//! reference programs and the verifier-rejection test's program, which the
//! production object does not carry.
//!
//! Outside the workspace (this crate as packaged by `cargo xtask package`,
//! from a registry or a copy) the program's sources are not there: the
//! package then carries the object, `ebpf/reuseport-ebpf.o`, which `cargo
//! xtask package` builds from the workspace's sources just before it packs,
//! and this uses it as it is. A consumer needs no nightly toolchain.
//!
//! Hand-written rather than `aya_build::build_ebpf` because aya-build 0.2.0
//! fixes the rustflags of the eBPF build and has no way to add
//! `-C target-cpu=v3`, which the program needs: round robin and weighted
//! take tickets with an atomic fetch-and-add, an instruction of BPF ISA v3
//! that LLVM refuses to emit for the default "generic" (v1) CPU.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.join("..");
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    if !workspace.join("reuseport-ebpf/Cargo.toml").exists() {
        return shipped(&manifest_dir, &out_dir);
    }
    for dir in ["reuseport-ebpf", "reuseport-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=REUSEPORT_EBPF_TOOLCHAIN");

    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let toolchain = env::var("REUSEPORT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    // A target directory of our own: the outer cargo holds the lock on the
    // workspace's.
    let target_dir = out_dir.join("ebpf-target");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");

    let test_programs = env::var_os("CARGO_FEATURE_TEST_PROGRAMS").is_some();
    let build = Build {
        workspace: &workspace,
        toolchain: &toolchain,
        target,
        target_dir: &target_dir,
        rustflags: &rustflags,
    };
    // The production object: what the library embeds.
    build.object(&[], &out_dir.join("reuseport-ebpf"))?;
    if test_programs {
        // The test build (feature `test-programs` of both crates): the same
        // programs and maps plus the benchmark's reference programs and the
        // verifier-rejection test's program. Built second, in the same
        // target directory: only the eBPF crate itself is rebuilt.
        build.object(
            &["--features", "test-programs"],
            &out_dir.join("reuseport-ebpf-test"),
        )?;
    }
    Ok(())
}

/// One build of the eBPF crate.
struct Build<'a> {
    workspace: &'a Path,
    toolchain: &'a str,
    target: &'a str,
    target_dir: &'a Path,
    rustflags: &'a str,
}

impl Build<'_> {
    /// Builds the eBPF crate with `extra` arguments and copies the object to
    /// `dest`.
    fn object(&self, extra: &[&str], dest: &Path) -> anyhow::Result<()> {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(self.workspace)
            .args([
                "run",
                self.toolchain,
                "cargo",
                "build",
                "--package",
                "reuseport-ebpf",
            ])
            .args([
                "--bins",
                "--release",
                "--target",
                self.target,
                "-Z",
                "build-std=core",
            ])
            .args(extra)
            .arg("--target-dir")
            .arg(self.target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", self.rustflags)
            // The outer build's compiler is stable; make the nested cargo
            // pick the nightly's own.
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTC_WRAPPER");
        let status = cmd.status().with_context(|| {
            format!("running {cmd:?} (is rustup installed? run `cargo xtask setup`)")
        })?;
        if !status.success() {
            bail!("building the eBPF program failed ({status}); `cargo xtask setup` installs the toolchain it needs");
        }
        let object = self
            .target_dir
            .join(self.target)
            .join("release")
            .join("reuseport-ebpf");
        std::fs::copy(&object, dest).with_context(|| format!("copying {}", object.display()))?;
        Ok(())
    }
}

/// The object the package carries, for a build without the workspace.
fn shipped(manifest_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    if env::var_os("CARGO_FEATURE_TEST_PROGRAMS").is_some() {
        bail!("feature `test-programs` needs the reuseport workspace's eBPF sources (it is for the project's own benchmark and tests)");
    }
    let object = manifest_dir.join("ebpf/reuseport-ebpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = std::fs::read(&object).with_context(|| {
        format!(
            "{} is missing: outside the reuseport workspace this crate needs the eBPF object its package carries (`cargo xtask package` puts it there)",
            object.display()
        )
    })?;
    // An ELF object for BPF (e_machine 247, EM_BPF), not something else
    // under that name.
    if bytes.len() < 20
        || &bytes[..4] != b"\x7fELF"
        || u16::from_le_bytes([bytes[18], bytes[19]]) != 247
    {
        bail!("{} is not a BPF ELF object", object.display());
    }
    std::fs::write(out_dir.join("reuseport-ebpf"), bytes)
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
