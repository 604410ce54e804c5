//! Shared helpers of the integration tests.
//!
//! Every test runs against the real kernel, in a network namespace of its
//! own ([`netns`]): the test thread unshares its network namespace, so the
//! server process it starts, and the client threads it spawns, live there
//! too, with nothing else on their ports. The tests need root (network
//! namespaces, BPF); without it they fail, they are never skipped.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

pub mod cluster;
pub mod quic;

use nix::{sched::CpuSet, unistd::Pid};
use socket2::{Domain, Socket, Type};

/// Moves the calling thread into a new network namespace with `lo` up.
///
/// A network namespace belongs to a thread, so tests running in parallel
/// (one thread each) do not see each other's sockets.
pub fn netns() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the integration tests need root: network namespaces and BPF (run `cargo xtask test` as root)"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("running `ip link set lo up`");
    assert!(st.success(), "ip link set lo up failed");
    // A new namespace can have the inode of one that is gone, and bpffs
    // keeps what was pinned under that inode (a test run that was killed
    // leaves its groups there): none of it belongs to this namespace.
    let _ = std::fs::remove_dir_all(namespace_pin_dir());
}

/// The `reuseport` binary under test: `$REUSEPORT_BIN` (set by
/// `cargo xtask test`), else `target/debug/reuseport` next to this test.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REUSEPORT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/reuseport
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("reuseport"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// Pins the calling thread to `cpu`. On loopback the CPU that sends a SYN
/// is the CPU that receives it, which is what the `cpu` policy reads.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu in range");
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// The CPUs this process may run on, failing the test (never skipping it)
/// when there are fewer than `n`: `why` says what needs them.
pub fn cpus_at_least(n: usize, why: &str) -> Vec<usize> {
    let cpus = cpus();
    assert!(
        cpus.len() >= n,
        "this test needs at least {n} usable CPUs ({why}); it has {}: run it on a larger machine or VM",
        cpus.len()
    );
    cpus
}

/// The CPUs this process may run on.
pub fn cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// A group name no other test uses (bpffs is shared by every namespace).
pub fn unique_group() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-{}-{n}", std::process::id())
}

/// The calling thread's network namespace: the inode number of its nsfs
/// file, as the binary names the namespace's pin directory.
pub fn netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("reading /proc/thread-self/ns/net")
        .ino()
}

/// Where the groups of the calling thread's network namespace are pinned.
pub fn namespace_pin_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/reuseport/netns-{}", netns_inode()))
}

/// Where a group of the calling thread's network namespace has its maps
/// pinned.
pub fn pin_dir(group: &str) -> PathBuf {
    namespace_pin_dir().join(group)
}

/// The log level of every `reuseport` process the tests start, whatever
/// `RUST_LOG` the tests themselves run with.
pub const LOG_LEVEL: &str = "info";

/// A `reuseport` command with the tests' log level ([`LOG_LEVEL`]), so that
/// the `RUST_LOG` the tests run with cannot change what its output holds.
pub fn reuseport_command() -> Command {
    let mut cmd = Command::new(binary());
    cmd.env("RUST_LOG", LOG_LEVEL);
    cmd
}

/// Runs `reuseport ARGS` to completion: (exit code, stdout, stderr).
pub fn reuseport(args: &[&str]) -> (i32, String, String) {
    let out = reuseport_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running reuseport");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `reuseport run` process.
pub struct Server {
    child: Option<Child>,
    /// The group's name (`--group`).
    pub group: String,
    /// The group's address (with its real port).
    pub addr: SocketAddr,
    /// The metrics address, if metrics were asked for.
    pub metrics_addr: Option<SocketAddr>,
    /// Everything printed on stdout up to "ready".
    pub banner: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

/// How a server that did not start ended.
#[derive(Debug)]
pub struct Failed {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it printed on stderr.
    pub stderr: String,
    /// What it printed on stdout.
    pub stdout: String,
}

impl Server {
    /// Starts `reuseport run --addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 ARGS`
    /// and waits until it is serving. Panics if it exits instead.
    pub fn start(args: &[&str]) -> Server {
        match Server::try_start(args) {
            Ok(s) => s,
            Err(f) => panic!(
                "the server did not start ({}):\n{}{}",
                f.status, f.stdout, f.stderr
            ),
        }
    }

    /// Like [`Server::start`], with `ARGS` as given (no default address).
    pub fn try_start(args: &[&str]) -> Result<Server, Failed> {
        let mut full: Vec<&str> = vec!["run"];
        if !args.contains(&"--addr") {
            full.extend(["--addr", "127.0.0.1:0"]);
        }
        if !args.contains(&"--metrics-addr") {
            full.extend(["--metrics-addr", "127.0.0.1:0"]);
        }
        let group = unique_group();
        if !args.contains(&"--group") && !args.contains(&"--takeover") {
            full.extend(["--group", &group]);
        }
        full.extend(args);
        Server::spawn(Command::new(binary()).args(&full))
    }

    /// `reuseport ctl --group GROUP ARGS`: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut full = vec!["ctl", "--group", &self.group];
        full.extend(args);
        reuseport(&full)
    }

    /// `reuseport ctl policy ARGS`, which must succeed.
    pub fn switch(&self, args: &[&str]) {
        let mut full = vec!["policy"];
        full.extend(args);
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, 0, "ctl policy {args:?}: {out}{err}");
    }

    /// Starts a prepared command of the binary and waits for "ready".
    pub fn spawn(cmd: &mut Command) -> Result<Server, Failed> {
        // The tests read info-level lines: the level is set here, never
        // taken from the environment of whoever runs the tests (a test that
        // needs another level sets it on its command).
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", LOG_LEVEL);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the reuseport binary");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let mut pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        // Once the process has exited: all it wrote on stderr (the reader
        // sees the end of the pipe), waiting at most 10 s on a busy machine.
        let all_stderr = |reader: thread::JoinHandle<()>| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            stderr.lock().unwrap().clone()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let ready = line.starts_with("ready: ");
                    banner.push(line);
                    if ready {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        return Err(Failed {
                            status,
                            stderr: all_stderr(stderr_reader),
                            stdout: banner.join("\n"),
                        });
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the server did not become ready in 60 s"
                    );
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    return Err(Failed {
                        status,
                        stderr: all_stderr(stderr_reader),
                        stdout: banner.join("\n"),
                    });
                }
            }
        }
        let ready = banner.last().expect("ready line");
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .expect("address in the ready line");
        let metrics_addr = banner.iter().find_map(|l| {
            l.strip_prefix("metrics on http://")
                .and_then(|r| r.strip_suffix("/metrics"))
                .and_then(|a| a.parse().ok())
        });
        let group = banner
            .iter()
            .find_map(|l| l.strip_prefix("group ")?.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        Ok(Server {
            child: Some(child),
            group,
            addr,
            metrics_addr,
            banner,
            stderr,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> Metrics {
        Metrics::scrape(self.metrics_addr.expect("started with --metrics-addr"))
    }

    /// What the server printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), signal).expect("kill");
    }

    /// Waits for the server to exit, at most `timeout`.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                thread::sleep(Duration::from_millis(50));
                return (status, self.stderr());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then [`Server::wait`].
    pub fn stop(self) -> (ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Killed, it could not remove its pins: do it for it.
            if !self.group.is_empty() {
                remove_pins(&self.group);
            }
        }
    }
}

/// Removes a group's pin directory (what a killed server leaves behind).
pub fn remove_pins(group: &str) {
    let dir = pin_dir(group);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            // The maps, and the owner's lock directory.
            let _ = std::fs::remove_file(e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&dir);
    // And the namespace's directory, if that was its last group.
    if let Some(ns) = dir.parent() {
        let _ = std::fs::remove_dir(ns);
    }
}

/// One scrape of `/metrics`: series (`name{labels}`) to value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// `GET /metrics` over a plain TCP connection.
    pub fn scrape(addr: SocketAddr) -> Metrics {
        let mut s = TcpStream::connect(addr).expect("connecting to the metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        let mut series = BTreeMap::new();
        for line in body.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').expect("series and value");
            series.insert(name.to_string(), value.parse().expect("numeric value"));
        }
        Metrics(series)
    }

    /// The value of the series `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.iter().find_map(|(series, v)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
            .then_some(*v)
        })
    }

    /// Like [`Metrics::get`], as a count; panics if the series is missing.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name} {labels:?} in {:#?}", self.0))
            as u64
    }

    /// Connections accepted by `worker`.
    pub fn accepted(&self, worker: usize) -> u64 {
        self.count(
            "reuseport_worker_accepted_total",
            &[("worker", &worker.to_string())],
        )
    }

    /// Program selections of `slot`.
    pub fn selected(&self, slot: usize) -> u64 {
        self.count(
            "reuseport_bpf_selected_total",
            &[("slot", &slot.to_string())],
        )
    }

    /// Program fallbacks to the kernel's hash.
    pub fn fallback(&self) -> u64 {
        self.count("reuseport_bpf_fallback_total", &[])
    }
}

impl Metrics {
    /// Connections `worker` has open now.
    pub fn active(&self, worker: usize) -> u64 {
        self.count(
            "reuseport_worker_active_connections",
            &[("worker", &worker.to_string())],
        )
    }

    /// Picks that found their slot empty.
    pub fn empty_slot(&self) -> u64 {
        self.count("reuseport_bpf_empty_slot_total", &[])
    }

    /// The policy in force, from `reuseport_policy{policy=...}`.
    pub fn policy(&self) -> String {
        self.0
            .keys()
            .find_map(|k| {
                k.strip_prefix("reuseport_policy{policy=\"")?
                    .strip_suffix("\"}")
            })
            .expect("reuseport_policy series")
            .to_string()
    }
}

/// Per-worker difference of accepted connections between two scrapes.
pub fn accepted_delta(before: &Metrics, after: &Metrics, workers: usize) -> Vec<u64> {
    (0..workers)
        .map(|w| after.accepted(w) - before.accepted(w))
        .collect()
}

/// Per-slot difference of program selections between two scrapes.
pub fn selected_delta(before: &Metrics, after: &Metrics, slots: usize) -> Vec<u64> {
    (0..slots)
        .map(|s| after.selected(s) - before.selected(s))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `payload` on a new connection, half-closes, and returns every byte
/// received until the server's EOF. Sending runs on its own thread so a
/// payload larger than the socket buffers cannot deadlock.
pub fn echo(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(addr).expect("connect");
    echo_on(stream, payload)
}

/// [`echo`] on an already connected stream.
pub fn echo_on(stream: TcpStream, payload: &[u8]) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let data = payload.to_vec();
    let sender = thread::spawn(move || {
        writer.write_all(&data).expect("send");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut got = Vec::with_capacity(payload.len());
    (&stream).read_to_end(&mut got).expect("receive the echo");
    sender.join().expect("sender");
    got
}

/// A connection from `src` (port 0: any) to `dst`.
pub fn connect_from(src: SocketAddr, dst: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.bind(&src.into())
        .expect("bind the client's source address");
    s.connect(&dst.into()).expect("connect");
    s.into()
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT, so the same 4-tuple
/// can connect again at once.
pub fn reset(stream: TcpStream) {
    let s = Socket::from(stream);
    s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(s);
}

/// Waits until `f` holds, at most `timeout`.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Ids of the BPF programs a process holds open (from `/proc/PID/fdinfo`).
pub fn bpf_programs_of(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.lines().any(|l| l.starts_with("prog_type:")) {
            continue;
        }
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids
}

/// Whether a BPF program with this id still exists in the kernel
/// (`BPF_PROG_GET_FD_BY_ID`).
pub fn bpf_program_exists(id: u32) -> bool {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command, and its
    // size is passed along.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &attr as *const GetFdById,
            std::mem::size_of::<GetFdById>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the syscall returned a new descriptor that we own.
        unsafe { libc::close(fd as i32) };
        true
    } else {
        false
    }
}

/// The name of BPF program `id` (`BPF_PROG_GET_FD_BY_ID`, then
/// `BPF_OBJ_GET_INFO_BY_FD`: `struct bpf_prog_info` has `name` at offset 64).
pub fn bpf_program_name(id: u32) -> Option<String> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let get = [id, 0, 0];
    // SAFETY: a valid bpf_attr prefix for this command, its size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            get.as_ptr(),
            std::mem::size_of_val(&get),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor that we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    let mut info = Info([0; 256]);
    #[repr(C)]
    struct InfoByFd {
        fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: 256,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points at a writable buffer of the length it gives.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return None;
    }
    let name = &info.0[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// `bpf(2)` commands the tests use on a group's pinned maps.
pub mod bpf_cmd {
    /// `BPF_MAP_LOOKUP_ELEM`.
    pub const MAP_LOOKUP_ELEM: libc::c_long = 1;
    /// `BPF_MAP_UPDATE_ELEM`.
    pub const MAP_UPDATE_ELEM: libc::c_long = 2;
    /// `BPF_MAP_DELETE_ELEM`.
    pub const MAP_DELETE_ELEM: libc::c_long = 3;
    /// `BPF_OBJ_GET`.
    pub const OBJ_GET: libc::c_long = 7;
}

/// Opens a group's pinned map `name` (`BPF_OBJ_GET`), as another process
/// of the owner could, behind the control plane's back. Written against
/// the syscall, not a BPF library, so the tests see the kernel's own
/// interface and depend on nothing of the code under test.
pub fn pinned_map(group: &str, name: &str) -> std::os::fd::OwnedFd {
    use std::{
        ffi::CString,
        os::{fd::FromRawFd, unix::ffi::OsStrExt},
    };
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit, so it is zero: the kernel refuses non-zero bytes past
        // the command's fields.
        _pad: u32,
    }
    let path = CString::new(pin_dir(group).join(name).as_os_str().as_bytes()).unwrap();
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET with its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::OBJ_GET,
            &get as *const ObjGet,
            size_of::<ObjGet>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {path:?}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// One map element command (`bpf_cmd::MAP_*`) on `map` with a 4-byte key;
/// `value` must be as large as the map's values (null for a delete).
pub fn map_elem(
    map: std::os::fd::BorrowedFd<'_>,
    cmd: libc::c_long,
    key: u32,
    value: *mut u8,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let e = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for the map element commands; `key`
    // and the caller's value outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &e as *const MapElem,
            size_of::<MapElem>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Empties `slot` of a group's socket map from outside, as the kernel does
/// when a worker's socket closes.
pub fn empty_slot(group: &str, slot: u32) {
    use std::os::fd::AsFd;
    let map = pinned_map(group, "SOCKETS");
    map_elem(
        map.as_fd(),
        bpf_cmd::MAP_DELETE_ELEM,
        slot,
        std::ptr::null_mut(),
    )
    .unwrap_or_else(|e| panic!("deleting slot {slot}: {e}"));
}

/// Opens `n` connections from a thread pinned to `cpu` (under the `cpu`
/// policy they all reach that CPU's worker), has each echo one byte, and
/// keeps them open.
pub fn hold_from_cpu(addr: SocketAddr, cpu: usize, n: u8) -> Vec<TcpStream> {
    thread::spawn(move || {
        pin_to_cpu(cpu);
        (0..n)
            .map(|i| {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                s.write_all(&[i]).expect("send");
                let mut b = [0u8];
                s.read_exact(&mut b).expect("the echo");
                s
            })
            .collect()
    })
    .join()
    .expect("the connecting thread")
}

/// Sends one datagram from `src` (port 0: any) to `server` and returns the
/// reply (waits up to 5 s).
pub fn udp_exchange(src: SocketAddr, server: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let s = udp_socket(src);
    udp_exchange_on(&s, server, payload)
}

/// A UDP socket bound to `src`. With a given port, SO_REUSEADDR lets a
/// test reuse it; never with port 0, where it would let the kernel hand out
/// a port that another SO_REUSEADDR socket holds.
pub fn udp_socket(src: SocketAddr) -> std::net::UdpSocket {
    let s = Socket::new(Domain::for_address(src), Type::DGRAM, None).expect("socket");
    if src.port() != 0 {
        s.set_reuse_address(true).expect("SO_REUSEADDR");
    }
    s.bind(&src.into())
        .expect("bind the client's source address");
    let s: std::net::UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// [`udp_exchange`] on an existing socket.
pub fn udp_exchange_on(s: &std::net::UdpSocket, server: SocketAddr, payload: &[u8]) -> Vec<u8> {
    s.send_to(payload, server).expect("send");
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("the echo of a datagram");
    assert_eq!(from, server, "the reply comes from the group's address");
    buf.truncate(n);
    buf
}

/// The loopback address of `server`'s family, port 0.
pub fn any_local(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => "127.0.0.1:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::1]:0".parse().unwrap(),
    }
}

impl Server {
    /// Runs `exchange` (one connection or one datagram) and returns the
    /// worker that served it: the one whose accepted counter moved, which
    /// must also be the slot the program selected.
    pub fn served_by<T>(&self, workers: usize, exchange: impl FnOnce() -> T) -> (usize, T) {
        let before = self.metrics();
        let out = exchange();
        let after = self.metrics();
        let delta = accepted_delta(&before, &after, workers);
        assert_eq!(delta.iter().sum::<u64>(), 1, "one accept: {delta:?}");
        // The program runs for every segment that reaches the listeners'
        // lookup, not only for SYNs: a late segment of a connection whose
        // server side is already gone finds no socket of its own and falls
        // back to it (`__inet_lookup_skb()` -> `__inet_lookup_listener()`).
        // Seen on 6.1 under emulation (a connection counted 2 or 3 runs).
        // For a keyed policy such a run picks the same slot, so the proof
        // is that the accepting worker's slot, and only it, was selected.
        let selected = selected_delta(&before, &after, workers);
        assert_eq!(
            selected.iter().map(|&n| n > 0).collect::<Vec<_>>(),
            delta.iter().map(|&n| n > 0).collect::<Vec<_>>(),
            "the program placed it: selected {selected:?}, accepted {delta:?}"
        );
        (delta.iter().position(|&d| d == 1).expect("one worker"), out)
    }
}

/// One TCP echo connection from `src`, closed with a reset (so the same
/// 4-tuple can be used again at once); returns the client's address.
pub fn tcp_once(src: SocketAddr, server: SocketAddr, payload: &[u8]) -> SocketAddr {
    let stream = connect_from(src, server);
    let local = stream.local_addr().expect("local address");
    assert_eq!(
        echo_on(stream.try_clone().expect("clone"), payload),
        payload
    );
    reset(stream);
    local
}

/// A steady client load: threads that open echo connections one after the
/// other until stopped, checking every echo.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<LoadResult>>,
}

/// What one load thread saw.
type LoadResult = (u64, Vec<String>, Vec<(Instant, Instant)>);

impl Load {
    /// Starts `threads` clients against `addr`.
    pub fn start(addr: SocketAddr, threads: usize) -> Load {
        Load::start_holding(addr, threads, Duration::ZERO)
    }

    /// Like [`Load::start`], each connection held open for `hold` between
    /// its request and the rest of its echo, so that connections are in
    /// flight at any moment. Thread `t` of `n` starts `t / n` of a hold
    /// late, so that the threads' connections do not all end together.
    pub fn start_holding(addr: SocketAddr, threads: usize, hold: Duration) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = threads as u32;
        let threads = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                thread::spawn(move || {
                    thread::sleep(hold * t as u32 / n);
                    let mut ok = 0u64;
                    let mut failures = Vec::new();
                    let mut spans = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let payload = pattern(64, (t as u64) << 32 | i);
                        let began = Instant::now();
                        match try_echo_holding(addr, &payload, hold) {
                            Ok(()) => {
                                ok += 1;
                                spans.push((began, Instant::now()));
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures, spans)
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients: (connections echoed correctly, failures).
    pub fn stop(self) -> (u64, Vec<String>) {
        let (ok, failures, _) = self.stop_with_spans();
        (ok, failures)
    }

    /// Stops the clients: (connections echoed correctly, failures, and
    /// when each correct one began and ended).
    pub fn stop_with_spans(self) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = 0;
        let mut failures = Vec::new();
        let mut spans = Vec::new();
        for t in self.threads {
            let (o, f, s) = t.join().expect("load thread");
            ok += o;
            failures.extend(f);
            spans.extend(s);
        }
        (ok, failures, spans)
    }
}

/// One echo connection; every way it can fail, as text.
pub fn try_echo(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    try_echo_holding(addr, payload, Duration::ZERO)
}

/// [`try_echo`], waiting `hold` after sending the payload and before
/// half-closing: the connection stays open (and served) that long.
pub fn try_echo_holding(addr: SocketAddr, payload: &[u8], hold: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(payload).map_err(|e| format!("send: {e}"))?;
    if !hold.is_zero() {
        thread::sleep(hold);
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("receive: {e}"))?;
    if got != payload {
        return Err(format!(
            "echo differs: {} of {} bytes",
            got.len(),
            payload.len()
        ));
    }
    Ok(())
}

/// Drops, on `lo` of the caller's namespace, every pure ACK (flags exactly
/// ACK) sent to TCP port `port`, with a small XDP program attached in
/// generic mode, so that handshakes to that port stay half-open (the
/// server never sees the client's final ACK) until the client sends data.
/// The kernel's migrate_reuseport selftest drops the ACK the same way.
/// Detached when the guard drops.
pub struct DropPureAcks {
    pin: PathBuf,
}

impl DropPureAcks {
    /// Attaches the program.
    pub fn to_port(port: u16) -> DropPureAcks {
        // (code, src << 4 | dst, off, imm)
        let port_le = i32::from(u16::from_ne_bytes(port.to_be_bytes()));
        let insns: [(u8, u8, i16, i32); 19] = [
            (0x61, 0x12, 0, 0),       // r2 = ctx->data
            (0x61, 0x13, 4, 0),       // r3 = ctx->data_end
            (0xbf, 0x24, 0, 0),       // r4 = r2
            (0x07, 0x04, 0, 54),      // r4 += eth + ip + tcp headers
            (0x2d, 0x34, 12, 0),      // if r4 > r3 goto pass
            (0x69, 0x25, 12, 0),      // r5 = eth proto
            (0x55, 0x05, 10, 0x0008), // if r5 != htons(ETH_P_IP) goto pass
            (0x71, 0x25, 23, 0),      // r5 = ip protocol
            (0x55, 0x05, 8, 6),       // if r5 != TCP goto pass
            (0x71, 0x25, 14, 0),      // r5 = version/ihl
            (0x55, 0x05, 6, 0x45),    // if no plain 20-byte header goto pass
            (0x69, 0x25, 36, 0),      // r5 = tcp dest port
            (0x55, 0x05, 4, port_le), // if r5 != port goto pass
            (0x71, 0x25, 47, 0),      // r5 = tcp flags
            (0x55, 0x05, 2, 0x10),    // if r5 != ACK goto pass
            (0xb7, 0x00, 0, 1),       // r0 = XDP_DROP
            (0x95, 0x00, 0, 0),       // exit
            (0xb7, 0x00, 0, 2),       // pass: r0 = XDP_PASS
            (0x95, 0x00, 0, 0),       // exit
        ];
        let mut code = Vec::new();
        for (op, regs, off, imm) in insns {
            code.push(op);
            code.push(regs);
            code.extend_from_slice(&off.to_le_bytes());
            code.extend_from_slice(&imm.to_le_bytes());
        }
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
        }
        let license = b"GPL\0";
        let mut log = vec![0u8; 65536];
        let load = ProgLoad {
            prog_type: 6, // BPF_PROG_TYPE_XDP
            insn_cnt: insns.len() as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
        };
        // SAFETY: a valid bpf_attr prefix for BPF_PROG_LOAD (5); the
        // buffers it points to outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                5,
                &load as *const ProgLoad,
                size_of::<ProgLoad>(),
            )
        };
        assert!(
            fd >= 0,
            "loading the ACK-dropping XDP program: {}\n{}",
            std::io::Error::last_os_error(),
            String::from_utf8_lossy(&log).trim_end_matches('\0')
        );
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/reuseport-test-xdp-{}-{n}",
            std::process::id()
        ));
        let path = std::ffi::CString::new(pin.to_str().unwrap()).unwrap();
        #[repr(C)]
        struct ObjPin {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
            path_fd: i32,
            _pad: u32,
        }
        let obj = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd as u32,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        };
        // SAFETY: as above, for BPF_OBJ_PIN (6).
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, 6, &obj as *const ObjPin, size_of::<ObjPin>()) };
        assert_eq!(
            rc,
            0,
            "pinning the XDP program: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: we own the descriptor; the pin keeps the program.
        unsafe { libc::close(fd as i32) };
        let st = Command::new("ip")
            .args(["link", "set", "dev", "lo", "xdpgeneric", "pinned"])
            .arg(&pin)
            .status()
            .expect("ip link set xdpgeneric");
        assert!(st.success(), "attaching the XDP program to lo");
        DropPureAcks { pin }
    }
}

impl Drop for DropPureAcks {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", "lo", "xdpgeneric", "off"])
            .status();
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// Asserts that the program placed what the workers accepted: every
/// worker accepted at most what the program selected for it, and the
/// selections beyond the connections are few. A SYN the client sent again
/// (a slow or emulated machine: seen on 6.1 under QEMU, 0.1 to 1.7 % of
/// connections) runs the program again, so selections may exceed the
/// connections by that much, never the other way round.
pub fn assert_placed_by_program(selected: &[u64], accepted: &[u64], what: &str) {
    let (s, a): (u64, u64) = (selected.iter().sum(), accepted.iter().sum());
    assert!(
        s >= a && s - a <= 2 + a / 50,
        "{what}: {s} selections for {a} connections: selected {selected:?}, accepted {accepted:?}"
    );
    for (w, (a, s)) in accepted.iter().zip(selected).enumerate() {
        assert!(
            a <= s,
            "{what}: worker {w} accepted {a} but was selected {s} times: {accepted:?} {selected:?}"
        );
    }
}

/// `GET /` over a connection of its own (`Connection: close`): asserts a
/// `200 OK` and returns the body.
pub fn http_get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

/// A running Python echo server and the pid and descriptor of its socket.
pub struct Python {
    child: Child,
    /// Its process.
    pub pid: u32,
    /// Its listening socket's descriptor number.
    pub fd: i32,
}

impl Python {
    /// Starts tests/fixtures/py_echo.py on `port` (bound with SO_REUSEPORT
    /// by itself), as `user` if given (setpriv), and reads its pid and fd.
    pub fn start(port: u16, user: Option<&str>) -> Python {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/py_echo.py");
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    "--regid=nogroup",
                    "--clear-groups",
                    system_python(),
                    script,
                ]);
                c
            }
            None => {
                let mut c = Command::new(system_python());
                c.arg(script);
                c
            }
        };
        let mut child = cmd
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "python said {line:?}");
        Python {
            pid: f[1].parse().unwrap(),
            fd: f[3].parse().unwrap(),
            child,
        }
    }
}

/// The system's Python (another user may not reach a per-user install).
pub fn system_python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The library's test object (`reuseport::objects::TEST`: the steering
/// programs plus the benchmark's reference programs and a program the
/// verifier rejects) in a file of its own, for the server's hidden
/// `--bpf-object`: the server itself embeds only the production object.
/// The caller removes it.
pub fn test_object_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("reuseport-{name}-{}.o", std::process::id()));
    std::fs::write(&path, reuseport::objects::TEST).expect("writing the test object");
    path
}
