//! Facts about the running system: kernel release, usable CPUs, capabilities.
//! What the kernel's BPF offers is probed in [`features`](crate::features).

use caps::{CapSet, Capability};
use log::{info, warn};
use nix::{sched::CpuSet, unistd::Pid};

use crate::error::{Error, Result};

/// The running kernel's release string, e.g. `6.18.44-fc`.
#[cfg(feature = "internals")]
pub fn kernel_release() -> Result<String> {
    let uts = nix::sys::utsname::uname().map_err(|e| Error::io("uname", e.into()))?;
    Ok(uts.release().to_string_lossy().into_owned())
}

/// The CPUs this process may run on, in ascending order (its affinity
/// mask, which honours `taskset` and cgroup cpusets).
pub fn usable_cpus() -> Result<Vec<usize>> {
    usable_cpus_of(0)
}

/// The CPUs process `pid` may run on (0: this process).
pub fn usable_cpus_of(pid: u32) -> Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(pid as i32))
        .map_err(|e| Error::io("sched_getaffinity", e.into()))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    if cpus.is_empty() {
        return Err(Error::io(
            "sched_getaffinity",
            std::io::Error::other("no usable CPU"),
        ));
    }
    Ok(cpus)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|e| Error::io(format!("CPU {cpu}"), e.into()))?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| Error::io(format!("pinning a worker to CPU {cpu}"), e.into()))
}

/// Fails with [`Error::NoPrivilege`] unless the process may load and attach
/// networking BPF programs: `CAP_BPF` and `CAP_NET_ADMIN`, or `CAP_SYS_ADMIN`
/// which implies both (`bpf_capable()`, `bpf_net_capable()` in the kernel).
pub fn check_bpf_privilege(action: &'static str) -> Result<()> {
    let has = |c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false);
    if has(Capability::CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (Capability::CAP_BPF, "CAP_BPF"),
        (Capability::CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| !has(*c))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NoPrivilege {
            action,
            missing: missing.join(" and "),
        })
    }
}

/// The open-file limit (soft `RLIMIT_NOFILE`) in force.
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft)
}

/// Raises this process's open-file limit (each connection is a
/// descriptor; the limit is process-wide): to `fs.nr_open` (at most
/// 1,048,576) if the process may raise its hard limit (root,
/// `CAP_SYS_RESOURCE`), else to its hard limit. Returns the limit now in
/// force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .min(1 << 20)
        .max(hard);
    if ceiling > soft && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return ceiling;
    }
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => log::warn!("could not raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    soft
}

/// The kernel's listen-queue and datagram drop counters of the calling
/// thread's network namespace (what `nstat` reads): TcpExt ListenOverflows
/// and ListenDrops, Udp InErrors, RcvbufErrors and SndbufErrors.
pub fn drop_counters() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (file, wanted) in [
        (
            "/proc/thread-self/net/netstat",
            &["TcpExt:ListenOverflows", "TcpExt:ListenDrops"][..],
        ),
        (
            "/proc/thread-self/net/snmp",
            &["Udp:InErrors", "Udp:RcvbufErrors", "Udp:SndbufErrors"][..],
        ),
    ] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let Some((prefix, names)) = names.split_once(':') else {
                continue;
            };
            let values = values.split_once(':').map_or("", |(_, v)| v);
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                let key = format!("{prefix}:{n}");
                if wanted.contains(&key.as_str()) {
                    out.insert(key, v.parse().unwrap_or(0));
                }
            }
        }
    }
    out
}

/// This process's resident memory (VmRSS), in bytes.
#[cfg(feature = "internals")]
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// This process's open file descriptors.
#[cfg(feature = "internals")]
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Brings up `lo` in the calling thread's network namespace (a new
/// namespace starts with it down).
#[cfg(feature = "internals")]
pub fn set_loopback_up() -> Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("socket for SIOCSIFFLAGS", e.into()))?;
    // SAFETY: an all-zero ifreq is valid; the name fits in IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: `req` is a valid ifreq for these requests on a socket we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::io(
                "SIOCGIFFLAGS lo",
                std::io::Error::last_os_error(),
            ));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::io(
                "SIOCSIFFLAGS lo",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_open` +
/// `pidfd_getfd`, Linux 5.6). Needs ptrace access to the process: the same
/// user, or `CAP_SYS_PTRACE`.
pub fn take_fd(pid: u32, fd: i32) -> Result<std::os::fd::OwnedFd> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let no_such = || Error::Adopt {
        what: format!("no process with pid {pid}"),
    };
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(no_such)?;
    let pidfd = pidfd_open(target, PidfdFlags::empty()).map_err(|e| match e.raw_os_error() {
        libc::ESRCH => no_such(),
        _ => Error::io(format!("pidfd_open({pid})"), e.into()),
    })?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| {
        let e = std::io::Error::from(e);
        match e.raw_os_error() {
            Some(libc::EBADF) => Error::Adopt {
                what: format!("process {pid} has no descriptor {fd}"),
            },
            Some(libc::EPERM) | Some(libc::EACCES) => Error::Adopt {
                what: format!(
                    "no permission to take process {pid}'s descriptors (it runs as another user, or this process lacks CAP_SYS_PTRACE)"
                ),
            },
            Some(libc::ESRCH) => Error::Adopt {
                what: format!("process {pid} has exited"),
            },
            _ => Error::io(format!("pidfd_getfd({pid}, {fd})"), e),
        }
    })
}

/// `/proc/PID/stat` of process `pid`, if it is running.
pub(crate) fn process_stat(pid: u32) -> Option<procfs_core::process::Stat> {
    use procfs_core::FromRead as _;
    let file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    procfs_core::process::Stat::from_read(file).ok()
}

/// The CPU process `pid` last ran on (`/proc/PID/stat`'s `processor`).
pub fn last_cpu(pid: u32) -> Option<u32> {
    process_stat(pid)?
        .processor
        .and_then(|c| u32::try_from(c).ok())
}

/// Whether [`check_bpf_privilege`] would pass.
pub fn has_bpf_privilege() -> bool {
    check_bpf_privilege("").is_ok()
}

/// Connections waiting in a listening TCP socket's accept queue: for a
/// listener, `tcp_info.tcpi_unacked` is the queue length
/// (`tcp_get_info()` in `net/ipv4/tcp.c`).
pub fn accept_queue_len(listener: &impl std::os::fd::AsRawFd) -> Option<u64> {
    // SAFETY: an all-zero tcp_info is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` describe a writable buffer of that size.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(u64::from(info.tcpi_unacked))
}

/// `net.ipv4.tcp_migrate_req`, set by a group without a program so that a
/// closing listener hands its queue to the others; restored at the end.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req` back to `before`, the value a group
/// found there; whether it could.
pub(crate) fn write_migrate_req(before: u32) -> bool {
    match std::fs::write(MIGRATE_REQ, before.to_string()) {
        Ok(()) => {
            info!("restored net.ipv4.tcp_migrate_req to {before}");
            true
        }
        Err(e) => {
            warn!("could not restore net.ipv4.tcp_migrate_req to {before}: {e}");
            false
        }
    }
}

/// Restores `net.ipv4.tcp_migrate_req` when dropped, from its old value
/// plus one (0: nothing to restore), as [`enable_migrate_req`] returns it.
pub(crate) struct MigrateReqGuard(pub(crate) u32);

impl Drop for MigrateReqGuard {
    fn drop(&mut self) {
        if self.0 > 0 {
            let before = self.0 - 1;
            match std::fs::write(MIGRATE_REQ, before.to_string()) {
                Ok(()) => info!("restored net.ipv4.tcp_migrate_req to {before}"),
                Err(e) => warn!("could not restore net.ipv4.tcp_migrate_req to {before}: {e}"),
            }
        }
    }
}

/// Sets `net.ipv4.tcp_migrate_req` to 1 (for a group without a program:
/// with one, the program's attach type already asks for migration) and
/// returns its old value plus one, or 0 if it was already 1 or cannot be set.
pub(crate) fn enable_migrate_req() -> u32 {
    let before: u32 = match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(_) => return 0,
    };
    if before == 1 {
        return 0;
    }
    match std::fs::write(MIGRATE_REQ, "1") {
        Ok(()) => {
            info!(
                "set net.ipv4.tcp_migrate_req to 1 (was {before}): a closing listener hands its queued connections to the others; restored on exit"
            );
            before + 1
        }
        Err(e) => {
            warn!("could not set net.ipv4.tcp_migrate_req (connections queued on a closing listener will be reset): {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_cpus_include_the_current_one() {
        let cpus = usable_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }
}
