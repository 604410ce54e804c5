//! Builds the eBPF program (crate `reuseport-ebpf`) with the nightly
//! toolchain for `bpfel-unknown-none` and leaves the object in `OUT_DIR`,
//! where `steering.rs` embeds it. `cargo xtask setup` installs what this
//! needs (nightly with rust-src, bpf-linker).
//!
//! Hand-written rather than `aya_build::build_ebpf` because aya-build 0.2.0
//! fixes the rustflags of the eBPF build and has no way to add
//! `-C target-cpu=v3`, which the program needs: round robin and weighted
//! take tickets with an atomic fetch-and-add, an instruction of BPF ISA v3
//! that LLVM refuses to emit for the default "generic" (v1) CPU.
use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.join("..");
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
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

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&workspace)
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--package",
            "reuseport-ebpf",
        ])
        .args([
            "--bins",
            "--release",
            "--target",
            target,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer build's compiler is stable; make the nested cargo pick
        // the nightly's own.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER");
    let status = cmd.status().with_context(|| {
        format!("running {cmd:?} (is rustup installed? run `cargo xtask setup`)")
    })?;
    if !status.success() {
        bail!("building the eBPF program failed ({status}); `cargo xtask setup` installs the toolchain it needs");
    }
    let object = target_dir
        .join(target)
        .join("release")
        .join("reuseport-ebpf");
    std::fs::copy(&object, out_dir.join("reuseport-ebpf"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
