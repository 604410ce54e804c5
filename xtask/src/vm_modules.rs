//! Kernel modules for the VM cells: what the cluster tests need that
//! Debian's cloud kernels build as modules, not in: `veth` (the links
//! between the namespaces) and IPVS with the Maglev scheduler (`ip_vs`,
//! `ip_vs_mh`, and what `ip_vs` depends on).
//!
//! They come from the kernel's own .deb (already downloaded into
//! `target/vm/debs`), are decompressed when Debian ships them as `.ko.xz`
//! (6.12; busybox's `insmod` loads plain ELF), ordered so that each module
//! comes after those it depends on (the `depends=` field of its `.modinfo`
//! section, which is what `depmod` reads), and appended to the cell's
//! initramfs under `/modules`, with the order in `/modules/order`. The
//! guest's `/init` loads them before the tests run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cpio::Archive;

/// The modules the cluster tests load, by name; their dependencies are
/// found and added.
pub const WANTED: &[&str] = &["veth", "ip_vs", "ip_vs_mh"];

/// Writes an archive with the modules of `deb` (a kernel image package)
/// that [`WANTED`] needs, and `/modules/order`, to `out`.
pub fn archive(deb: &Path, work: &Path, out: &Path) -> Result<Vec<String>> {
    let tree = work.join("modules-tree");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree)?;
    // The whole package, once per cell: a few seconds, and no list of
    // paths to keep in step with Debian's layout.
    crate::status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    collect(&tree.join("lib/modules"), &mut by_name)?;
    if by_name.is_empty() {
        bail!("{} holds no kernel modules", deb.display());
    }
    // Depth first: dependencies before the modules that need them.
    let mut order: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    for name in WANTED {
        visit(name, &by_name, work, &mut seen, &mut order)?;
    }
    let mut a = Archive::create(out)?;
    a.dir("modules")?;
    for name in &order {
        let data = fs::read(plain(&by_name[name], work)?)?;
        a.file(&format!("modules/{name}.ko"), 0o644, &data)?;
    }
    let list: String = order.iter().map(|n| format!("{n}.ko\n")).collect();
    a.file("modules/order", 0o644, list.as_bytes())?;
    a.finish()?;
    let _ = fs::remove_dir_all(&tree);
    Ok(order)
}

fn visit(
    name: &str,
    by_name: &BTreeMap<String, PathBuf>,
    work: &Path,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some(path) = by_name.get(name) else {
        // Built into this kernel: nothing to load.
        return Ok(());
    };
    for dep in depends(&fs::read(plain(path, work)?)?) {
        visit(&dep, by_name, work, seen, order)?;
    }
    order.push(name.to_string());
    Ok(())
}

/// Every `*.ko` and `*.ko.xz` under `dir`, by module name (file name
/// without the extension, `-` read as `_` as the kernel does).
fn collect(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
            continue;
        }
        let file = p.file_name().unwrap_or_default().to_string_lossy();
        let stem = file
            .strip_suffix(".ko.xz")
            .or_else(|| file.strip_suffix(".ko"));
        if let Some(stem) = stem {
            out.insert(stem.replace('-', "_"), p.clone());
        }
    }
    Ok(())
}

/// The module as plain ELF: `.ko.xz` is decompressed next to `work`.
fn plain(path: &Path, work: &Path) -> Result<PathBuf> {
    if path.extension().is_some_and(|e| e == "xz") {
        let name = path.file_stem().unwrap_or_default();
        let out = work.join(name);
        if !out.exists() {
            let data = Command::new("xz")
                .args(["-dc"])
                .arg(path)
                .output()
                .context("running xz (apt-get install xz-utils)")?;
            if !data.status.success() {
                bail!("xz -d {} failed", path.display());
            }
            fs::write(&out, data.stdout)?;
        }
        Ok(out)
    } else {
        Ok(path.to_path_buf())
    }
}

/// The `depends=a,b` field of a module's `.modinfo` (NUL-separated
/// `key=value` strings).
fn depends(elf: &[u8]) -> Vec<String> {
    let key = b"depends=";
    elf.windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &elf[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::depends;

    #[test]
    fn depends_field_is_read() {
        let elf = b"\x7fELF..license=GPL\0depends=nf_conntrack,libcrc32c\0name=ip_vs\0";
        assert_eq!(depends(elf), vec!["nf_conntrack", "libcrc32c"]);
        assert!(depends(b"depends=\0name=veth\0").is_empty());
    }
}
