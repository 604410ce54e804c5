//! Installs what building the eBPF program needs, each step only when
//! missing (so running it again does nothing), saying what it does:
//!
//! 1. the nightly toolchain with `rust-src` (`-Z build-std=core` for the BPF target);
//! 2. LLVM development files of the nightly's own LLVM major version,
//!    from Debian's packages (`llvm-N-dev`);
//! 3. `bpf-linker` built against that LLVM;
//! 4. fontconfig's development files (the benchmark's charts);
//! 5. for the tests ([`ensure_test_tools`]): `ip` (iproute2), `setpriv`
//!    (util-linux) and `python3`, and the `nobody` account.
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
    apt_install(&["libfontconfig1-dev", "libfreetype-dev", "pkg-config"])
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
    // libLLVM is what bpf-linker links against; it comes with llvm-N-dev
    // (llvm-config alone comes with llvm-N).
    if Path::new(&prefix).join("lib/libLLVM.so").exists() {
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
    apt_install(&[&package])
}

/// Where setup notes which LLVM the installed bpf-linker was built against
/// (`bpf-linker --version` does not say): a nightly on another LLVM needs
/// another build.
fn linker_llvm_note() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    Some(home.join(".bpf-linker-llvm"))
}

fn ensure_bpf_linker(major: u32) -> Result<()> {
    let built_for = linker_llvm_note()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        match built_for {
            _ if !v.contains(BPF_LINKER_VERSION) => say(&format!(
                "bpf-linker is {}, not {BPF_LINKER_VERSION}: reinstalling",
                v.trim()
            )),
            Some(m) if m != major => say(&format!(
                "bpf-linker was built for LLVM {m}, the nightly uses LLVM {major}: rebuilding"
            )),
            _ => {
                say(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
                return Ok(());
            }
        }
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
        .env("LLVM_PREFIX", llvm_prefix(major)))?;
    if let Some(p) = linker_llvm_note() {
        std::fs::write(&p, major.to_string())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// What the tests run besides the project's binary: `ip` (network
/// namespaces), `setpriv` (tests as another user), `python3` (a server in
/// another language joins a group), and the `nobody` account.
pub fn ensure_test_tools() -> Result<()> {
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<(&str, &str)> = [
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
        ("python3", "python3"),
    ]
    .into_iter()
    .filter(|(tool, _)| !has(tool))
    .collect();
    if missing.is_empty() {
        say("test tools (ip, setpriv, python3): present");
    } else {
        let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        if !is_debian() || !is_root() {
            bail!(
                "the tests need {}: install {} (as root), then run `cargo xtask test` again",
                missing
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", "),
                packages.join(" ")
            );
        }
        say(&format!(
            "installing what the tests need: {}",
            packages.join(" ")
        ));
        apt_install(&packages)?;
    }
    if output(Command::new("id").arg("nobody")).is_none() {
        bail!("the tests run some steps as the user `nobody`, which this system lacks: create it (useradd -r nobody)");
    }
    Ok(())
}

/// `apt-get install`, with the package lists brought up to date first (a
/// fresh image may have none).
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
