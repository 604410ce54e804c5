//! A writer of `newc` cpio archives, the format the kernel unpacks as its
//! initramfs (`init/initramfs.c`; `Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Written here rather than run through `cpio(1)` because the host may not
//! have it, and because the archive's layout (which file goes where, as
//! which path) is decided in code anyway.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{Context as _, Result};

/// An archive being written. Parent directories are added before any entry
/// that needs them: the kernel's unpacker does not create them.
pub struct Archive {
    out: BufWriter<File>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Archive {
    /// Starts an archive at `path` (truncating it).
    pub fn create(path: &Path) -> Result<Archive> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Archive {
            out: BufWriter::with_capacity(1 << 20, file),
            ino: 1,
            dirs: BTreeSet::new(),
        })
    }

    /// Adds directory `path` (and its parents) unless already there.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[])
    }

    /// Adds a regular file with `mode` (permission bits) and `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, 0o100000 | (mode & 0o7777), data)
    }

    /// Adds a symbolic link `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(path, 0o120777, target.as_bytes())
    }

    /// Writes the trailer and flushes.
    pub fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush().context("writing the archive")
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let ino = self.ino;
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        // magic, then 13 fields of 8 hex digits: ino, mode, uid, gid, nlink,
        // mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize (with its NUL), check.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        // Header and name, then the data, each padded to 4 bytes.
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        Ok(())
    }
}
