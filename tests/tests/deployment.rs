//! The control plane on hosts that look like production: two network
//! namespaces sharing bpffs, an owner killed with SIGKILL, a stop signal
//! during start-up, several starts at once on one address. Each test
//! takes the steps the issue reported (issue 11) and checks what a user
//! sees: echoes, the program's counters, exit codes, the error line, the
//! pins left behind.

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use reuseport_tests::{
    binary, echo, namespace_pin_dir, netns, pattern, pin_dir, reuseport, unique_group, Failed,
    Server,
};

/// The address every test here serves: the same one in every namespace.
const ADDR: &str = "127.0.0.1:7100";
/// Its default group name.
const NAME: &str = "tcp-127_0_0_1-7100";

/// `reuseport run --addr ADDR --metrics-addr 127.0.0.1:0 ARGS` (no
/// `--group`: the default name), waiting for "ready".
fn start(args: &[&str]) -> Result<Server, Failed> {
    let mut cmd = reuseport_tests::reuseport_command();
    cmd.args(["run", "--addr", ADDR, "--metrics-addr", "127.0.0.1:0"])
        .args(args);
    Server::spawn(&mut cmd)
}

/// Waits until `count` has reached `n` (every thread arrived), at most 60 s:
/// a thread that failed must not leave the others waiting for good.
fn rendezvous(count: &AtomicUsize, n: usize) {
    count.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the other namespace's thread did not arrive"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_namespaces_sharing_bpffs_each_serve_their_own_group_on_one_address() {
    // What a container runtime with the host's /sys/fs/bpf gives: two
    // network namespaces, one bpffs. The second start used to be refused
    // ("group tcp-127_0_0_1-7100 is already running").
    let steps: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let threads: Vec<_> = [3u64, 5]
        .into_iter()
        .map(|connections| {
            let steps = steps.clone();
            thread::spawn(move || {
                netns();
                let started = start(&["--workers", "2", "--policy", "round-robin"]);
                // Arrive even on failure, then fail: the other thread's
                // start is the one that matters as much.
                rendezvous(&steps[0], 2);
                let server = started.unwrap_or_else(|f| {
                    panic!("a second namespace could not start its group: {}", f.stderr)
                });
                assert_eq!(server.group, NAME);
                for i in 0..connections {
                    let p = pattern(100, i);
                    assert_eq!(echo(server.addr, &p), p);
                }
                rendezvous(&steps[1], 2);
                // Each namespace's counters saw its own connections only.
                let m = server.metrics();
                let selected: u64 = (0..2).map(|s| m.selected(s)).sum();
                let accepted: u64 = (0..2).map(|w| m.accepted(w)).sum();
                assert_eq!((selected, accepted), (connections, connections));
                // ctl and stats without --group find this namespace's group.
                for cmd in [&["stats"][..], &["ctl", "status"]] {
                    let (code, out, err) = reuseport(cmd);
                    assert_eq!(code, 0, "{cmd:?}: {err}");
                    let first = out.lines().next().unwrap_or_default();
                    assert!(
                        first.starts_with(&format!(
                            "group {NAME}: tcp {ADDR}, pid {},",
                            server.pid()
                        )),
                        "{cmd:?} in this namespace shows another group: {out}"
                    );
                }
                let dir = pin_dir(NAME);
                assert!(dir.exists(), "{} missing", dir.display());
                rendezvous(&steps[2], 2);
                let (status, err) = server.stop();
                assert!(status.success(), "{err}");
                assert!(!dir.exists(), "pins left at {}", dir.display());
                dir
            })
        })
        .collect();
    let dirs: Vec<PathBuf> = threads
        .into_iter()
        .map(|t| t.join().expect("a namespace's thread failed"))
        .collect();
    assert_ne!(dirs[0], dirs[1], "two namespaces, two pin directories");
}

/// The one line a command on a dead group must print.
fn dead_line(name: &str, pid: u32) -> String {
    format!(
        "error: group {name} is dead: its owner (pid {pid}) is gone; remove it with `reuseport cleanup --group {name}`, or start `reuseport run` on tcp {ADDR} to replace it"
    )
}

/// Runs `reuseport ARGS`, killing it if it has not exited within 15 s
/// (a `join` that wrongly starts would serve for ever): (code, stderr).
fn bounded(args: &[&str]) -> (i32, String) {
    let mut child = reuseport_tests::reuseport_command()
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning reuseport");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`reuseport {}` was still running after 15 s",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    (status.code().unwrap_or(-1), err)
}

fn kill9(server: Server) -> u32 {
    let pid = server.pid();
    server.signal(Signal::SIGKILL);
    // Reaps it; its pins stay (`wait` takes the child, so the `Server`'s
    // drop does not remove them as it does for a server it kills).
    let (status, _) = server.wait(Duration::from_secs(10));
    assert!(!status.success());
    pid
}

#[test]
fn a_killed_owner_is_named_with_the_cure_and_the_next_run_replaces_it() {
    netns();
    let first = start(&["--workers", "1", "--policy", "round-robin"]).expect("first run");
    // A `stats --watch` that runs when the owner dies stops too.
    let watch = reuseport_tests::reuseport_command()
        .args(["stats", "--watch", "0.2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning stats --watch");
    thread::sleep(Duration::from_millis(500));
    let pid = kill9(first);
    assert!(pin_dir(NAME).exists(), "SIGKILL leaves the pins");
    let mut watch = watch;
    let deadline = Instant::now() + Duration::from_secs(15);
    while watch.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("stats --watch went on after its group's owner was killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let watch = watch.wait_with_output().expect("stats --watch");
    assert_eq!(watch.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&watch.stderr).trim(),
        dead_line(NAME, pid)
    );

    // Every command that acts on the group fails, non-zero, on one line
    // that names the dead owner and the cure. `ctl policy hash` used to
    // print "policy hash" and exit 0, and `join` to start serving nothing.
    let want = dead_line(NAME, pid);
    for args in [
        &["ctl", "--group", NAME, "policy", "hash"][..],
        &["ctl", "policy", "hash"],
        &["ctl", "--group", NAME, "add-worker"],
        &["stats", "--group", NAME],
        &["stats"],
        &["join", "--group", NAME],
        &["adopt", "--group", NAME, "--pid", "1", "--fd", "3"],
        &["adopt", "--pid", "1", "--fd", "3"],
    ] {
        let (code, err) = bounded(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.trim(), want, "{args:?}");
    }

    // The next run on the address replaces it and serves.
    let second = start(&["--workers", "1", "--policy", "round-robin"])
        .expect("a run replaces the dead group");
    assert!(
        second.stderr().contains(&format!(
            "removing stale pins of group {NAME} left by pid {pid}, which is gone"
        )),
        "{}",
        second.stderr()
    );
    let p = pattern(64, 1);
    assert_eq!(echo(second.addr, &p), p);
    assert_eq!(
        second.metrics().selected(0),
        1,
        "steered by the new program"
    );
    let (code, out, err) = reuseport(&["ctl", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("pid {}", second.pid())), "{out}");
    // A running group is not cleaned up.
    let (code, err) = bounded(&["cleanup", "--group", NAME]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "error: group {NAME} is already running (pid {}); stop it or pick another --group",
            second.pid()
        )
    );

    // A dead group of another name on the address is replaced too.
    let pid = kill9(second);
    let custom = unique_group();
    let third = start(&["--workers", "1", "--group", &custom]).expect("run under another name");
    assert!(
        third.stderr().contains(&format!(
            "removing stale pins of group {NAME} on tcp {ADDR} left by pid {pid}, which is gone"
        )),
        "{}",
        third.stderr()
    );
    assert!(!pin_dir(NAME).exists());

    // `cleanup` removes a dead group and says whose it was.
    let pid = kill9(third);
    let (code, out, err) = reuseport(&["cleanup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("removed dead group {custom} (its owner, pid {pid}, is gone)")
    );
    assert!(!pin_dir(&custom).exists());
    let (code, _, err) = reuseport(&["ctl", "status"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: no reuseport group is running in this network namespace"),
        "{err}"
    );
}

/// A `reuseport run` being started, its output read as it comes.
struct Starting {
    child: Child,
    stderr_lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: thread::JoinHandle<()>,
}

impl Starting {
    fn spawn(args: &[&str], pause_at: Option<&str>) -> Starting {
        Starting::command("run", args, pause_at)
    }

    /// `reuseport SUBCOMMAND ARGS` (`run` or `join`).
    fn command(subcommand: &str, args: &[&str], pause_at: Option<&str>) -> Starting {
        let mut cmd = reuseport_tests::reuseport_command();
        cmd.arg(subcommand)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(step) = pause_at {
            cmd.env("REUSEPORT_TEST_PAUSE_AT", step);
        }
        let mut child = cmd.spawn().expect("spawning reuseport run");
        let (tx, rx) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr");
        let all = stderr.clone();
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Starting {
            child,
            stderr_lines: rx,
            stderr,
            stderr_reader,
        }
    }

    /// Waits (at most 30 s) for a line of stderr equal to `line`.
    fn wait_for_line(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.stderr_lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains(line) => return,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "no `{line}` on stderr; stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }

    fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// Waits (at most 30 s) for the exit: (status, stdout, stderr).
    fn wait(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "still running 30 s after the signal; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        let _ = self
            .child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out);
        // All it wrote: the reader ends at the end of the pipe (waited for
        // at most 10 s; a busy machine can take longer than a moment).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.stderr_reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let err = self.stderr.lock().unwrap().clone();
        (status, out, err)
    }
}

/// Every checkpoint of the start-up, in order.
const STEPS: [&str; 9] = [
    "locked",
    "bound",
    "pinned",
    "loaded",
    "listening",
    "configured",
    "steering",
    "built",
    "workers",
];

fn migrate_req() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .expect("reading tcp_migrate_req")
        .trim()
        .to_string()
}

#[test]
fn a_stop_signal_at_any_moment_of_start_up_exits_in_order_and_leaves_nothing() {
    netns();
    assert_eq!(migrate_req(), "0", "a new namespace starts with 0");
    let group = unique_group();
    // At every step, with a program (`cpu`) and without one (`kernel`,
    // which sets net.ipv4.tcp_migrate_req), by SIGTERM and by SIGINT.
    let mut cases: Vec<(&str, &str, Signal)> =
        STEPS.iter().map(|&s| (s, "cpu", Signal::SIGTERM)).collect();
    cases.extend([
        ("configured", "kernel", Signal::SIGTERM),
        ("workers", "kernel", Signal::SIGTERM),
        ("pinned", "cpu", Signal::SIGINT),
        ("workers", "round-robin", Signal::SIGINT),
    ]);
    for (step, policy, signal) in cases {
        let run = Starting::spawn(
            &[
                "--addr",
                ADDR,
                "--group",
                &group,
                "--policy",
                policy,
                "--workers",
                "2",
            ],
            Some(step),
        );
        run.wait_for_line(&format!("paused at {step}"));
        if step == "configured" && policy == "kernel" {
            assert_eq!(migrate_req(), "1", "set by the kernel policy's start");
        }
        run.signal(signal);
        let (status, out, err) = run.wait();
        // Stopped as asked: exit 0, not 128 + the signal.
        assert_eq!(status.code(), Some(0), "{step}/{policy}/{signal}: {err}");
        assert!(
            err.contains(&format!(
                "stopped by {signal} during start-up ({step}); removed what it had set up"
            )),
            "{step}/{policy}: {err}"
        );
        assert!(!out.contains("ready"), "{step}: {out}");
        assert!(
            !pin_dir(&group).exists(),
            "pins left after a stop at {step}"
        );
        assert_eq!(
            migrate_req(),
            "0",
            "sysctl left changed after a stop at {step}"
        );
    }

    // A signal at whatever moment it lands, from when the pins appear on:
    // the start-up stops (or, if it was done, the server shuts down), in
    // order, either way exit 0 and nothing left.
    for delay_ms in [0u64, 1, 3, 10, 30, 100, 300] {
        let run = Starting::spawn(&["--addr", ADDR, "--group", &group, "--workers", "2"], None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pin_dir(&group).exists() {
            assert!(Instant::now() < deadline, "no pins within 30 s");
            thread::sleep(Duration::from_micros(200));
        }
        thread::sleep(Duration::from_millis(delay_ms));
        run.signal(Signal::SIGTERM);
        let (status, _, err) = run.wait();
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM {delay_ms} ms after the pins: {err}"
        );
        assert!(!pin_dir(&group).exists(), "pins left ({delay_ms} ms)");
    }
    // A `join` stopped before it serves leaves the group as it was: its
    // slot taken back, the owner's worker alone in the policy.
    let owner = Server::start(&["--policy", "round-robin", "--workers", "1"]);
    for step in ["built", "workers"] {
        let join = Starting::command("join", &["--group", &owner.group], Some(step));
        join.wait_for_line(&format!("paused at {step}"));
        join.signal(Signal::SIGTERM);
        let (status, out, err) = join.wait();
        assert_eq!(status.code(), Some(0), "join stopped at {step}: {err}");
        assert!(!out.contains("ready"), "{out}");
        let (code, out, err) = owner.ctl(&["status"]);
        assert_eq!(code, 0, "{err}");
        let serving = out.lines().filter(|l| l.contains(" serving ")).count();
        assert_eq!(serving, 1, "after a join stopped at {step}:\n{out}");
    }
    let before = owner.metrics().selected(0);
    let p = pattern(16, 3);
    assert_eq!(echo(owner.addr, &p), p);
    assert_eq!(
        owner.metrics().selected(0),
        before + 1,
        "the owner's worker takes it"
    );
    let (status, err) = owner.stop();
    assert!(status.success(), "{err}");

    let leftovers: Vec<_> = std::fs::read_dir(namespace_pin_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left in the namespace: {leftovers:?}");

    // Then ctl and stats without --group find the one group that runs
    // (stale pins used to make them say "several groups are running").
    let server = start(&["--workers", "2"]).expect("a run after the interrupted ones");
    for cmd in [&["stats"][..], &["ctl", "status"]] {
        let (code, out, err) = reuseport(cmd);
        assert_eq!(code, 0, "{cmd:?}: {err}");
        assert!(out.starts_with(&format!("group {NAME}: ")), "{out}");
    }
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn of_several_runs_started_at_once_on_one_address_exactly_one_serves() {
    netns();
    for round in 0..20usize {
        let n = 2 + round % 3;
        // Even rounds: every run under the default name (one name, one
        // address); odd rounds: each under a name of its own (one address).
        let names: Vec<Option<String>> = (0..n)
            .map(|_| (round % 2 == 1).then(unique_group))
            .collect();
        let go = Arc::new(AtomicUsize::new(0));
        let runs: Vec<_> = names
            .into_iter()
            .map(|name| {
                let go = go.clone();
                thread::spawn(move || {
                    let mut args = vec!["--workers", "1"];
                    if let Some(name) = &name {
                        args.extend(["--group", name.as_str()]);
                    }
                    rendezvous(&go, n);
                    start(&args)
                })
            })
            .collect();
        let results: Vec<Result<Server, Failed>> = runs
            .into_iter()
            .map(|t| t.join().expect("a starting thread panicked"))
            .collect();
        let (served, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        assert_eq!(
            served.len(),
            1,
            "round {round}: {} of {n} runs serve; refused: {:?}",
            served.len(),
            refused
                .iter()
                .map(|r| r.as_ref().err().map(|f| f.stderr.clone()))
                .collect::<Vec<_>>()
        );
        let server = served
            .into_iter()
            .next()
            .and_then(Result::ok)
            .expect("one serves");
        for r in refused {
            let f = r.err().expect("refused");
            assert_eq!(f.status.code(), Some(1), "round {round}: {}", f.stderr);
            let line = f.stderr.lines().last().unwrap_or_default().to_string();
            let clear = line.contains(&format!(
                "tcp {ADDR} is already served by another reuseport group of this user"
            )) || line.starts_with(&format!(
                "error: group {NAME} is already running (pid {}); stop it or pick another --group",
                server.pid()
            ));
            assert!(clear, "round {round}: {}", f.stderr);
        }
        let p = pattern(32, round as u64);
        assert_eq!(echo(server.addr, &p), p);
        let (status, err) = server.stop();
        assert!(status.success(), "{err}");
    }
    // Without privilege (`nobody`, policy `kernel`: no program, no pins)
    // the start lock holds as well: it is an abstract socket, not a file.
    for round in 0..5 {
        let go = Arc::new(AtomicUsize::new(0));
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let go = go.clone();
                thread::spawn(move || {
                    let mut cmd = Command::new("setpriv");
                    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                        .arg(binary())
                        .args([
                            "run",
                            "--addr",
                            ADDR,
                            "--policy",
                            "kernel",
                            "--workers",
                            "1",
                        ]);
                    rendezvous(&go, 3);
                    Server::spawn(&mut cmd)
                })
            })
            .collect();
        let results: Vec<Result<Server, Failed>> = runs
            .into_iter()
            .map(|t| t.join().expect("a starting thread panicked"))
            .collect();
        let served = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(served, 1, "unprivileged round {round}: {served} of 3 serve");
        for f in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                f.stderr.contains(&format!(
                    "tcp {ADDR} is already served by another reuseport group of this user"
                )),
                "{}",
                f.stderr
            );
        }
    }
}

/// Runs the binary in a new pid namespace with its own /proc (as in a
/// container that shares the host's network namespace and bpffs, but not
/// its pids): (code, stdout, stderr).
fn in_new_pid_namespace(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running unshare (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_owner_is_alive_from_another_pid_namespace_and_pid_bound_commands_say_where_to_run() {
    netns();
    let server = start(&["--workers", "1", "--policy", "round-robin"]).expect("run");
    // There, the owner's pid names no process (or another one): liveness
    // by pid alone would call the group dead. Its lock says it runs.
    let (code, out, err) = in_new_pid_namespace(&["ctl", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("group {NAME}: tcp {ADDR}, pid {},", server.pid())),
        "{out}"
    );
    let (code, out, err) = in_new_pid_namespace(&["ctl", "policy", "hash"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("group {NAME}: policy hash (key src-ip, seed 0)")
    );
    // Commands that name processes by pid refuse, saying why.
    let want = format!(
        "error: group {NAME}'s owner (pid {} in its own pid namespace) is not visible from this pid namespace: join, adopt and add-worker must run in the owner's pid namespace",
        server.pid()
    );
    for args in [&["join", "--group", NAME][..], &["ctl", "add-worker"]] {
        let (code, _, err) = in_new_pid_namespace(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.trim(), want, "{args:?}");
    }
    // Still one worker serving, steered by the program.
    let p = pattern(64, 7);
    assert_eq!(echo(server.addr, &p), p);
    assert_eq!(server.metrics().selected(0), 1);
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    // Once it is gone, the other pid namespace sees it gone too.
    let (code, _, err) = in_new_pid_namespace(&["ctl", "status"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: no reuseport group is running in this network namespace"),
        "{err}"
    );
}

#[test]
fn policy_switches_at_once_keep_each_others_settings() {
    // `ctl policy round-robin` keeps the seed in force. It used to read
    // that seed before taking the group's lock, so a `ctl policy hash
    // --seed 7` written in between was undone: round-robin went in with the
    // old seed, and a later `ctl policy hash` brought seed 0 back. Under
    // the lock, either order ends with seed 7.
    netns();
    let server = Server::start(&["--policy", "hash", "--workers", "2"]);
    let group = server.group.clone();
    let ctl = |args: &[&str]| {
        let mut full = vec!["ctl", "--group", group.as_str(), "policy"];
        full.extend(args);
        let (code, out, err) = reuseport(&full);
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    for round in 0..30 {
        ctl(&["hash", "--seed", "0"]);
        let go = Arc::new(AtomicUsize::new(0));
        let switches: Vec<_> = [&["round-robin"][..], &["hash", "--seed", "7"]]
            .into_iter()
            .map(|args| {
                let go = go.clone();
                let group = group.clone();
                let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                thread::spawn(move || {
                    rendezvous(&go, 2);
                    let mut full = vec!["ctl", "--group", group.as_str(), "policy"];
                    full.extend(args.iter().map(String::as_str));
                    reuseport(&full)
                })
            })
            .collect();
        for s in switches {
            let (code, _, err) = s.join().expect("a switch panicked");
            assert_eq!(code, 0, "{err}");
        }
        let out = ctl(&["hash"]);
        assert_eq!(
            out.trim(),
            format!("group {group}: policy hash (key src-ip, seed 7)"),
            "round {round}: a concurrent switch undid the seed"
        );
    }
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

/// A named network namespace (`ip netns add`), deleted when dropped.
struct NamedNetns(String);

impl NamedNetns {
    fn new() -> NamedNetns {
        let name = format!("reuseport-{}", unique_group());
        let ok = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("running ip");
            assert!(st.success(), "ip {args:?}");
        };
        ok(&["netns", "add", &name]);
        let ns = NamedNetns(name);
        ok(&["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME reuseport ARGS`.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0])
            .arg(binary())
            .args(args)
            .env("RUST_LOG", "info");
        cmd
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn commands_under_ip_netns_exec_see_the_group_another_one_started() {
    // `ip netns exec` gives each command a mount namespace with a fresh
    // sysfs on /sys, which hides /sys/fs/bpf: each command used to mount a
    // bpffs of its own, so `ctl` never found the group `run` had made.
    let ns = NamedNetns::new();
    let server = Server::spawn(&mut ns.command(&[
        "run",
        "--addr",
        ADDR,
        "--workers",
        "1",
        "--policy",
        "round-robin",
        "--metrics-addr",
        "127.0.0.1:0",
    ]))
    .unwrap_or_else(|f| panic!("run under ip netns exec: {}", f.stderr));
    // The pins are in the host's bpffs, under the namespace's inode.
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", ns.0))
            .unwrap()
            .ino()
    };
    let dir = PathBuf::from(format!("/sys/fs/bpf/reuseport/netns-{ino}/{NAME}"));
    assert!(dir.exists(), "{} missing", dir.display());
    assert!(
        server
            .banner
            .iter()
            .any(|l| l.contains(&dir.display().to_string())),
        "{:?}",
        server.banner
    );
    for args in [&["ctl", "status"][..], &["stats"]] {
        let out = ns.command(args).output().expect("ip netns exec");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            stdout.starts_with(&format!("group {NAME}: tcp {ADDR}, pid {},", server.pid())),
            "{args:?}: {stdout}"
        );
    }
    // Clients in that namespace reach it, through the program.
    nix::sched::setns(
        std::fs::File::open(format!("/run/netns/{}", ns.0)).unwrap(),
        nix::sched::CloneFlags::CLONE_NEWNET,
    )
    .expect("setns");
    for i in 0..3 {
        let p = pattern(40, i);
        assert_eq!(echo(server.addr, &p), p);
    }
    assert_eq!(server.metrics().selected(0), 3);
    let out = ns
        .command(&["ctl", "policy", "hash"])
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.metrics().policy(), "hash");
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert!(!dir.exists(), "pins left at {}", dir.display());
}

/// A group without a program sets `net.ipv4.tcp_migrate_req` (so a closing
/// listener hands its queued connections on) and puts it back when it
/// stops. An owner killed with SIGKILL cannot: whoever removes its pins,
/// `cleanup` or the next `run` on the address, puts it back instead.
#[test]
fn the_sysctl_a_killed_owner_set_is_put_back_by_cleanup_or_its_replacement() {
    netns();
    let read = || {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read(), "0", "a fresh namespace starts at 0");
    let group = unique_group();
    let server = start(&["--policy", "kernel", "--workers", "1", "--group", &group]).unwrap();
    assert_eq!(read(), "1");
    let pid = kill9(server);
    assert_eq!(read(), "1", "left set by the killed owner");
    let (code, out, err) = reuseport(&["cleanup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "removed dead group {group} (its owner, pid {pid}, is gone)\nrestored net.ipv4.tcp_migrate_req to 0"
        )
    );
    assert_eq!(read(), "0");

    // The next run on the address replaces the dead group: it restores the
    // value, sets it again for itself, and restores it when it stops.
    let server = start(&["--policy", "kernel", "--workers", "1", "--group", &group]).unwrap();
    kill9(server);
    assert_eq!(read(), "1");
    let next = start(&["--policy", "kernel", "--workers", "1", "--group", &group]).unwrap();
    assert_eq!(read(), "1");
    next.signal(Signal::SIGTERM);
    let (status, stderr) = next.wait(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert_eq!(read(), "0", "{stderr}");
}

#[test]
fn a_group_that_goes_leaves_the_sysctl_set_for_another_that_relies_on_it() {
    // Two groups without a program in one namespace: the first set the
    // sysctl, the second found it set. The first to go, by a stop or by a
    // cleanup after a kill, used to put it back to 0 under the second,
    // whose closing listeners would then reset their queued connections.
    netns();
    assert_eq!(migrate_req(), "0", "a fresh namespace starts at 0");
    let kernel = ["--policy", "kernel", "--workers", "1"];
    let first = Server::start(&kernel);
    assert_eq!(migrate_req(), "1");
    let second = Server::start(&kernel);
    let second_group = second.group.clone();
    first.signal(Signal::SIGTERM);
    let (status, stderr) = first.wait(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert_eq!(
        migrate_req(),
        "1",
        "put back under a group that relies on it:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "left net.ipv4.tcp_migrate_req at 1 for group {second_group}, which relies on it"
        )),
        "{stderr}"
    );

    // Now the second holds the value to put back; a third relies on it
    // too. The second is killed, and the cleanup hands the value on.
    let third = Server::start(&kernel);
    let third_group = third.group.clone();
    let pid = kill9(second);
    let (code, out, err) = reuseport(&["cleanup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "removed dead group {second_group} (its owner, pid {pid}, is gone)\n\
             left net.ipv4.tcp_migrate_req at 1 for group {third_group}, which relies on it"
        )
    );
    assert_eq!(migrate_req(), "1");
    // The last group to go puts back what the namespace had.
    third.signal(Signal::SIGTERM);
    let (status, stderr) = third.wait(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert_eq!(migrate_req(), "0", "{stderr}");
}
