//! Installs what building the eBPF program needs, each step only when
//! missing (so running it again does nothing), saying what it does:
//!
//! 1. the nightly toolchain with `rust-src` (`-Z build-std=core` for the BPF target);
//! 2. LLVM development files of the nightly's own LLVM major version,
//!    from Debian's packages (`llvm-N-dev`);
//! 3. `bpf-linker` built against that LLVM;
//! 4. fontconfig's development files (the benchmark's charts).
//!
//! The recipe is the one verified in `shared/notes/toolchain.md`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The bpf-linker release that builds with the pinned aya versions.
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    let llvm = nightly_llvm_major()?;
    ensure_llvm(llvm)?;
    ensure_bpf_linker(llvm)?;
    ensure_fontconfig()?;
    Ok(())
}

/// The benchmark's SVG charts measure their text with fontconfig and
/// FreeType (plotters' `ttf` feature), whose development files the build
/// links against.
fn ensure_fontconfig() -> Result<()> {
    let present = Command::new("pkg-config")
        .args(["--exists", "fontconfig", "freetype2"])
        .status()
        .is_ok_and(|s| s.success());
    if present {
        say("fontconfig and freetype development files: present");
        return Ok(());
    }
    if !is_debian() {
        bail!("fontconfig and freetype development files are missing: install them (pkg-config names fontconfig, freetype2), then run `cargo xtask setup` again");
    }
    if !is_root() {
        bail!("libfontconfig1-dev is missing and installing it needs root: run `sudo apt-get install -y libfontconfig1-dev pkg-config`");
    }
    say("fontconfig development files are missing: installing them from Debian's packages");
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "libfontconfig1-dev",
            "libfreetype-dev",
            "pkg-config",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn say(msg: &str) {
    println!("setup: {msg}");
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    say(&format!("running {cmd:?}"));
    crate::status(cmd)
}

fn ensure_nightly() -> Result<()> {
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!("rustup is not installed: install it from https://rustup.rs, then run `cargo xtask setup` again");
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        say("the nightly toolchain is missing: installing it");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("nightly toolchain with rust-src: present");
    } else {
        say("rust-src for the nightly toolchain is missing: adding it");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    Ok(())
}

/// The major version of the LLVM the nightly compiler uses: bpf-linker must
/// be built against the same one to read its bitcode.
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))
        .context("running the nightly rustc")?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("the nightly rustc does not report its LLVM version")
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

fn is_debian() -> bool {
    std::fs::read_to_string("/etc/os-release").is_ok_and(|s| {
        s.lines()
            .any(|l| l == "ID=debian" || (l.starts_with("ID_LIKE=") && l.contains("debian")))
    })
}

fn llvm_prefix(major: u32) -> String {
    format!("/usr/lib/llvm-{major}")
}

fn ensure_llvm(major: u32) -> Result<()> {
    let prefix = llvm_prefix(major);
    let package = format!("llvm-{major}-dev");
    if Path::new(&prefix).join("bin/llvm-config").exists() {
        say(&format!("{package}: present ({prefix})"));
        return Ok(());
    }
    if !is_debian() {
        bail!(
            "LLVM {major} development files are missing and automatic setup only knows Debian's packages: \
             install LLVM {major} (with llvm-config and libLLVM) under {prefix}, then run `cargo xtask setup` again"
        );
    }
    if !is_root() {
        bail!("{package} is missing and installing it needs root: run `sudo apt-get install -y {package}` (or run this as root)");
    }
    say(&format!(
        "{package} is missing: installing it from Debian's packages"
    ));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", &package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_bpf_linker(major: u32) -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
            return Ok(());
        }
        say(&format!(
            "bpf-linker is {}, not {BPF_LINKER_VERSION}: reinstalling",
            v.trim()
        ));
    } else {
        say(&format!("bpf-linker is missing: building {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        // bpf-linker's build script looks for libLLVM under LLVM_PREFIX.
        .env("LLVM_PREFIX", llvm_prefix(major)))
}
