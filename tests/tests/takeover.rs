//! `run --takeover` in a group with other members: a joined process and a
//! socket adopted from another program keep their share across the
//! handover, the old policy is kept, a long-lived connection goes on, and
//! the group's name resolves to a live owner throughout. And a takeover of
//! a group created by a build with another map layout is refused before
//! anything is touched.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use reuseport_tests::{
    binary, bpf_cmd, echo, map_elem, netns, pin_dir, pinned_map, reuseport, selected_delta, Load,
    Python, Server,
};

/// A steady client load like [`Load`], for a group with an adopted Python
/// member: its echoes start with "py:", the workers' do not; anything else
/// is a failure.
struct MixedLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(u64, Vec<String>)>>,
}

impl MixedLoad {
    fn start(addr: SocketAddr, threads: usize) -> MixedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let (mut ok, mut failures, mut i) = (0u64, Vec::new(), 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let payload = reuseport_tests::pattern(64, (t as u64) << 32 | i);
                        match echo_either(addr, &payload) {
                            Ok(()) => ok += 1,
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        MixedLoad { stop, threads }
    }

    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ok = 0;
        let mut failures = Vec::new();
        for t in self.threads {
            let (o, f) = t.join().expect("load thread");
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// One connection: send, half-close, read to the end; the answer must be
/// the payload, or the payload after "py:".
fn echo_either(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(payload).map_err(|e| format!("send: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("receive: {e}"))?;
    if got == payload || got.strip_prefix(b"py:") == Some(payload) {
        Ok(())
    } else {
        Err(format!(
            "echo differs: {} bytes for {}",
            got.len(),
            payload.len()
        ))
    }
}

fn assert_clean(load: Load, what: &str) -> u64 {
    check_clean(load.stop(), what)
}

fn check_clean((ok, failures): (u64, Vec<String>), what: &str) -> u64 {
    assert!(
        failures.is_empty(),
        "{what}: {} of {} connections failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "{what}: the load ran ({ok} connections)");
    ok
}

fn joined_accepted(joined: &Server, slot: u32) -> u64 {
    joined
        .metrics()
        .get(
            "reuseport_worker_accepted_total",
            &[("worker", &slot.to_string())],
        )
        .unwrap_or(0.0) as u64
}

/// The program's selections of `slot` (0 while it has none: a slot the
/// program has never selected has no series).
fn selected(m: &reuseport_tests::Metrics, slot: usize) -> u64 {
    m.get(
        "reuseport_bpf_selected_total",
        &[("slot", &slot.to_string())],
    )
    .unwrap_or(0.0) as u64
}

/// Runs `ctl --group NAME status` over and over until stopped; returns
/// every failure (exit code and stderr), and how many runs there were.
fn watch_name(group: String) -> (Arc<AtomicBool>, thread::JoinHandle<(u32, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let t = thread::spawn(move || {
        let mut runs = 0;
        let mut failures = Vec::new();
        // Bounded: at most ten minutes of polling even if never stopped.
        while !s.load(Ordering::Relaxed) && runs < 20_000 {
            runs += 1;
            let (code, out, err) = reuseport(&["ctl", "--group", &group, "status"]);
            let owner_alive = out
                .split_whitespace()
                .skip_while(|w| *w != "pid")
                .nth(1)
                .and_then(|p| p.trim_end_matches([',', ')']).parse::<u32>().ok())
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if code != 0 || !owner_alive {
                failures.push(format!("exit {code}: {}{}", err.trim(), out.trim()));
            }
            thread::sleep(Duration::from_millis(20));
        }
        (runs, failures)
    });
    (stop, t)
}

#[test]
fn a_takeover_carries_joined_and_adopted_members_and_keeps_the_policy() {
    netns();
    let first = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let group = first.group.clone();
    let addr = first.addr;

    // A second process joins (slot 2); a Python server is adopted (slot 3).
    let mut join = reuseport_tests::reuseport_command();
    join.args(["join", "--group", &group, "--metrics-addr", "127.0.0.1:0"]);
    let joined = Server::spawn(&mut join).expect("join starts");
    assert!(
        joined.banner.iter().any(|l| l == "worker 2: slot 2, cpu 0"),
        "{:?}",
        joined.banner
    );
    let python = Python::start(addr.port(), None);
    let (code, out, err) = reuseport(&[
        "adopt",
        "--group",
        &group,
        "--pid",
        &python.pid.to_string(),
        "--fd",
        &python.fd.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().ends_with("serves slot 3"), "{out}");

    // A long-lived connection, opened before the handover.
    let mut held = TcpStream::connect(addr).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).unwrap();

    let load = MixedLoad::start(addr, 4);
    thread::sleep(Duration::from_millis(300));
    let (watching, watcher) = watch_name(group.clone());
    thread::sleep(Duration::from_millis(200));

    // The new generation, without --policy: it keeps round-robin.
    let next = Server::try_start(&["--takeover", &group, "--workers", "2"])
        .unwrap_or_else(|f| panic!("the takeover failed: {}", f.stderr));
    assert!(
        next.banner.iter().any(|l| l == "policy round-robin"),
        "the old policy is kept without --policy: {:?}",
        next.banner
    );
    assert_eq!(next.metrics().policy(), "round-robin");

    // While the old owner drains (the held connection keeps it), its pins
    // are under NAME-next-PID with its lock held: one group, alive, found
    // without --group, and not dead for `cleanup`.
    let aside = pin_dir(&format!("{group}-next-{}", next.pid()));
    assert!(
        aside.join("GROUP").exists(),
        "the old owner's pins, swapped aside"
    );
    let (code, out, err) = reuseport(&["ctl", "status"]);
    assert_eq!(code, 0, "ctl without --group during the drain: {err}");
    assert!(
        out.starts_with(&format!("group {group}: "))
            && out.contains(&format!("pid {}", next.pid())),
        "{out}"
    );
    let (code, out, err) = reuseport(&["cleanup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "no dead group in this network namespace");
    assert!(aside.join("GROUP").exists(), "a draining owner is alive");

    // The held connection still echoes after the takeover, then ends, so
    // the old owner can finish draining.
    held.write_all(b"after!").unwrap();
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!", "the long-lived connection goes on");
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    let (status, stderr) = first.wait(Duration::from_secs(30));
    assert!(status.success(), "the old owner exits 0: {stderr}");
    assert!(!aside.exists(), "the old owner removed its pins as it left");
    thread::sleep(Duration::from_millis(300));
    watching.store(true, Ordering::Relaxed);
    let (runs, failures) = watcher.join().unwrap();
    assert!(
        failures.is_empty(),
        "the group's name resolves to a live owner throughout ({} of {runs} lookups failed): {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        runs > 5,
        "the name was looked up during the handover ({runs})"
    );

    // The joined process serves in the new generation: the new program
    // selects its slot and its own accepted counter moves with it.
    let before = (next.metrics(), joined_accepted(&joined, 2));
    thread::sleep(Duration::from_secs(1));
    let after = (next.metrics(), joined_accepted(&joined, 2));
    let moved: Vec<u64> = (0..4)
        .map(|slot| selected(&after.0, slot) - selected(&before.0, slot))
        .collect();
    assert!(
        moved.iter().all(|&n| n > 10),
        "every member of the new generation gets new connections, the joined (2) and adopted (3) too: {moved:?}"
    );
    let served = after.1 - before.1;
    assert!(
        served > 10,
        "the joined process accepts connections after the takeover: {served}"
    );
    assert_eq!(after.0.fallback(), 0, "the program chose every connection");
    let ok = check_clean(load.stop(), "a takeover with joined and adopted members");
    println!(
        "takeover with a joined and an adopted member: {ok} connections, none failed; {runs} lookups of the name, all to a live owner; after it, per second: {moved:?} selections of slots 0-3"
    );

    // Round robin over four live slots: each member answers exactly a
    // quarter of 100 sequential connections, the adopted socket and the
    // joined process too, and the program counts exactly that for them.
    let before = (next.metrics(), joined_accepted(&joined, 2));
    let mut from_python = 0;
    for i in 0..100 {
        let p = format!("hello {i}").into_bytes();
        let got = echo(addr, &p);
        if got.starts_with(b"py:") {
            assert_eq!(&got[3..], &p[..]);
            from_python += 1;
        } else {
            assert_eq!(got, p);
        }
    }
    let after = (next.metrics(), joined_accepted(&joined, 2));
    let counted: Vec<u64> = (0..4)
        .map(|slot| selected(&after.0, slot) - selected(&before.0, slot))
        .collect();
    assert_eq!(
        counted,
        [25, 25, 25, 25],
        "round robin over all four members"
    );
    assert_eq!(from_python, 25, "the adopted socket keeps its share");
    assert_eq!(
        after.1 - before.1,
        25,
        "the joined process accepted what the program sent to its slot"
    );

    // Asked to stop, the joined process leaves the new generation cleanly.
    let (status, stderr) = joined.stop();
    assert!(status.success(), "{stderr}");
    let (code, out, err) = reuseport(&["ctl", "--group", &group, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("pid {}", next.pid())), "{out}");
    let (status, _) = next.stop();
    assert!(status.success());
}

/// The old owner killed while it drains after a takeover: its pins, swapped
/// aside, are dead; the new owner removes them, and the group is one live
/// group throughout (by name, without --group, and for `cleanup`).
#[test]
fn an_old_owner_killed_during_its_drain_leaves_one_live_group() {
    netns();
    let first = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let group = first.group.clone();
    let addr = first.addr;
    // Keeps the old owner draining after the takeover.
    let mut held = TcpStream::connect(addr).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).unwrap();

    let next = Server::try_start(&["--takeover", &group, "--workers", "2"])
        .unwrap_or_else(|f| panic!("the takeover failed: {}", f.stderr));
    let aside = pin_dir(&format!("{group}-next-{}", next.pid()));
    assert!(aside.join("GROUP").exists(), "the old owner drains");
    let old_pid = first.pid();
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = first.wait(Duration::from_secs(10));
    assert!(!status.success());
    assert!(
        reuseport_tests::eventually(Duration::from_secs(10), || !aside.exists()),
        "the new owner removes the dead old owner's pins"
    );
    assert!(
        next.stderr()
            .contains(&format!("took over group {group} from pid {old_pid}")),
        "{}",
        next.stderr()
    );
    for args in [
        &["ctl", "--group", &group, "status"][..],
        &["ctl", "status"],
    ] {
        let (code, out, err) = reuseport(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(&format!("pid {}", next.pid())), "{out}");
    }
    let (code, out, err) = reuseport(&["cleanup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "no dead group in this network namespace");
    for i in 0..20 {
        let p = format!("after {i}").into_bytes();
        assert_eq!(echo(addr, &p), p);
    }
    assert_eq!(next.metrics().fallback(), 0);
    let (status, stderr) = next.stop();
    assert!(status.success(), "{stderr}");
    assert!(!pin_dir(&group).exists());
}

/// SIGTERM to a takeover at its last step before it switches the group:
/// it exits 0 having undone everything, and the old owner, with its
/// joined member, serves on under its name as if nothing had happened.
#[test]
fn a_takeover_stopped_before_its_switch_leaves_the_old_group_as_it_was() {
    netns();
    let first = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let group = first.group.clone();
    let addr = first.addr;
    let mut join = reuseport_tests::reuseport_command();
    join.args(["join", "--group", &group, "--metrics-addr", "127.0.0.1:0"]);
    let joined = Server::spawn(&mut join).expect("join starts");

    let mut cmd = reuseport_tests::reuseport_command();
    cmd.args([
        "run",
        "--takeover",
        &group,
        "--workers",
        "2",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .env("REUSEPORT_TEST_PAUSE_AT", "switching")
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut next = cmd.spawn().unwrap();
    let pid = next.id();
    let mut lines = BufReader::new(next.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    // Bounded by the pause's own limit (10 s): then the line or EOF comes.
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("paused at switching") {
            break;
        }
    }
    assert!(seen.contains("paused at switching"), "{seen}");
    let aside = pin_dir(&format!("{group}-next-{pid}"));
    assert!(aside.join("GROUP").exists(), "its pins, aside");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = next.wait().unwrap();
    let all = format!("{seen}{}", rest.join("\n"));
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(
        all.contains("stopped by SIGTERM during start-up (switching); removed what it had set up"),
        "{all}"
    );
    assert!(!aside.exists(), "its pins are gone");

    // The old generation: its name, its owner, its three members.
    let (code, out, err) = reuseport(&["ctl", "--group", &group, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("pid {}", first.pid())), "{out}");
    let before = first.metrics();
    for i in 0..30 {
        let p = format!("on {i}").into_bytes();
        assert_eq!(echo(addr, &p), p);
    }
    let after = first.metrics();
    assert_eq!(
        selected_delta(&before, &after, 3),
        [10, 10, 10],
        "round robin over the owner's two workers and the joined one"
    );
    assert_eq!(after.fallback(), 0);
    assert!(!first.stderr().contains("taken over"), "{}", first.stderr());
    let (status, _) = joined.stop();
    assert!(status.success());
    let (status, stderr) = first.stop();
    assert!(status.success(), "{stderr}");
}

/// A takeover from another pid namespace than the owner's, of a group with
/// a joined member: the records name that member by a pid that means
/// another process (or none) there, so the takeover refuses before it
/// changes anything, and the group serves on.
#[test]
fn a_takeover_from_another_pid_namespace_does_not_carry_members_by_foreign_pids() {
    netns();
    let first = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let group = first.group.clone();
    let mut join = reuseport_tests::reuseport_command();
    join.args(["join", "--group", &group, "--metrics-addr", "127.0.0.1:0"]);
    let joined = Server::spawn(&mut join).expect("join starts");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(binary())
        .args(["run", "--takeover", &group, "--workers", "2"])
        .stdin(Stdio::null())
        .output()
        .expect("running unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "error: cannot carry the members of other processes from another pid namespace than the owner's (pid {} there): run the takeover in the owner's pid namespace; nothing was changed",
            first.pid()
        )
    );
    let before = first.metrics();
    for i in 0..30 {
        let p = format!("on {i}").into_bytes();
        assert_eq!(echo(first.addr, &p), p);
    }
    let after = first.metrics();
    assert_eq!(selected_delta(&before, &after, 3), [10, 10, 10]);
    assert!(!first.stderr().contains("taken over"), "{}", first.stderr());
    let (status, _) = joined.stop();
    assert!(status.success());
    let (status, stderr) = first.stop();
    assert!(status.success(), "{stderr}");
}

/// The binary built from the last commit without a layout version, which
/// `cargo xtask test` builds once (xtask/src/old_build.rs).
fn old_binary() -> PathBuf {
    let path = std::env::var_os("REUSEPORT_OLD_LAYOUT_BIN").unwrap_or_else(|| {
        panic!(
            "REUSEPORT_OLD_LAYOUT_BIN is not set: run this test through `cargo xtask test`, which builds the old-layout binary and sets it"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask test` to build it",
        path.display()
    );
    path
}

/// Where the old build pins group `group`: right under the pin root, not
/// in a directory of the network namespace.
fn old_pin_dir(group: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/reuseport").join(group)
}

fn pinned_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_takeover_of_a_group_with_an_older_layout_is_refused_before_anything_changes() {
    netns();
    let old_bin = old_binary();
    let group = reuseport_tests::unique_group();
    let mut cmd = Command::new(&old_bin);
    cmd.args([
        "run",
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--group",
        &group,
        "--policy",
        "round-robin",
        "--workers",
        "2",
    ]);
    let old = Server::spawn(&mut cmd).expect("the old build starts");
    let addr: SocketAddr = old.addr;
    let pins = pinned_files(&old_pin_dir(&group));
    assert!(pins.contains(&"GROUP".to_string()), "{pins:?}");
    let load = Load::start(addr, 3);
    thread::sleep(Duration::from_millis(300));

    let expected = format!(
        "error: group {group} was created by an incompatible build (an older layout that records no version, this build"
    );
    for extra in [&[][..], &["--policy", "cpu"][..]] {
        let mut args = vec!["run", "--takeover", &group, "--workers", "2"];
        args.extend(extra);
        args.extend(["--metrics-addr", "127.0.0.1:0"]);
        let (code, _, err) = reuseport(&args);
        assert_eq!(code, 1, "the takeover {extra:?} is refused: {err}");
        let line = err.lines().next().unwrap_or("");
        assert!(line.starts_with(&expected), "{line}");
    }
    // Reading it is refused the same way, not misread.
    let (code, _, err) = reuseport(&["ctl", "--group", &group, "status"]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&expected), "{err}");

    // The old group goes on untouched: its pins, its program's steering
    // (round robin over its own two workers), every connection served.
    assert_eq!(
        pinned_files(&old_pin_dir(&group)),
        pins,
        "its pins are as they were"
    );
    assert!(!pin_dir(&group).exists(), "nothing pinned for it here");
    let before = old.metrics();
    thread::sleep(Duration::from_millis(500));
    let after = old.metrics();
    let moved = selected_delta(&before, &after, 2);
    assert!(moved[0] > 10 && moved[1] > 10, "{moved:?}");
    assert_eq!(after.fallback(), 0);
    assert_eq!(after.policy(), "round-robin");
    assert_clean(load, "a refused takeover across layouts");
    assert!(
        !old.stderr().contains("taken over"),
        "the old owner was not told anything: {}",
        old.stderr()
    );
    let (status, stderr) = old.stop();
    assert!(status.success(), "{stderr}");
}

/// Sets the layout version recorded in group `group`'s pinned LAYOUT map
/// (a 64-byte record, version at offset 4), as a build of another layout
/// would have written it: `BPF_OBJ_GET`, `BPF_MAP_LOOKUP_ELEM`,
/// `BPF_MAP_UPDATE_ELEM`. Returns the version it replaced.
fn set_layout_version(group: &str, version: u32) -> u32 {
    use std::os::fd::AsFd;
    let map = pinned_map(group, "LAYOUT");
    let mut record = [0u8; 64];
    map_elem(
        map.as_fd(),
        bpf_cmd::MAP_LOOKUP_ELEM,
        0,
        record.as_mut_ptr(),
    )
    .expect("lookup");
    let was = u32::from_ne_bytes(record[4..8].try_into().unwrap());
    record[4..8].copy_from_slice(&version.to_ne_bytes());
    map_elem(
        map.as_fd(),
        bpf_cmd::MAP_UPDATE_ELEM,
        0,
        record.as_mut_ptr(),
    )
    .expect("update");
    was
}

#[test]
fn a_group_of_a_newer_layout_is_refused_by_ctl_join_and_takeover() {
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let ours = set_layout_version(&server.group, 99);
    let expected = format!(
        "error: group {} was created by an incompatible build (layout 99, this build {ours})",
        server.group
    );
    for args in [
        vec!["ctl", "--group", &server.group, "status"],
        vec!["join", "--group", &server.group],
        vec!["run", "--takeover", &server.group],
        vec!["run", "--takeover", &server.group, "--policy", "hash"],
        vec!["run", "--group", &server.group, "--addr", "127.0.0.1:0"],
    ] {
        let (code, _, err) = reuseport(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.lines().next().unwrap_or("").starts_with(&expected),
            "{args:?}: {err}"
        );
    }
    // Nothing was changed: the group serves on, round robin, by its program.
    let before = server.metrics();
    for i in 0..10 {
        let p = format!("still {i}").into_bytes();
        assert_eq!(echo(server.addr, &p), p);
    }
    let after = server.metrics();
    assert_eq!(selected_delta(&before, &after, 2), [5, 5]);
    assert!(pin_dir(&server.group).join("GROUP").exists());
    set_layout_version(&server.group, ours);
    let (code, _, err) = server.ctl(&["status"]);
    assert_eq!(code, 0, "its own layout again: {err}");
    let (status, _) = server.stop();
    assert!(status.success());
}

/// Under `weighted`, a joined member keeps its weight across a takeover,
/// also when the new generation's `--weights` name only its own workers.
#[test]
fn a_joined_member_keeps_its_weight_across_a_takeover() {
    netns();
    let first = Server::start(&["--policy", "weighted", "--weights", "1,1", "--workers", "2"]);
    let group = first.group.clone();
    let mut join = reuseport_tests::reuseport_command();
    join.args(["join", "--group", &group, "--metrics-addr", "127.0.0.1:0"]);
    let joined = Server::spawn(&mut join).expect("join starts");
    first.switch(&["weighted", "--weights", "1,1,2"]);
    let next = Server::try_start(&[
        "--takeover",
        &group,
        "--workers",
        "2",
        "--policy",
        "weighted",
        "--weights",
        "1,1",
    ])
    .unwrap_or_else(|f| panic!("the takeover failed: {}", f.stderr));
    assert!(
        next.banner
            .iter()
            .any(|l| l == "policy weighted (weights 1,1,2)"),
        "{:?}",
        next.banner
    );
    let (status, stderr) = first.wait(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    assert!(
        reuseport_tests::eventually(Duration::from_secs(5), || joined
            .stderr()
            .contains("re-joined its new generation")),
        "{}",
        joined.stderr()
    );
    // The weighted table is deterministic: of 100 connections in a row,
    // 25, 25 and 50 (the joined process's weight 2).
    let before = (next.metrics(), joined_accepted(&joined, 2));
    for i in 0..100 {
        let p = format!("w {i}").into_bytes();
        assert_eq!(echo(next.addr, &p), p);
    }
    let after = (next.metrics(), joined_accepted(&joined, 2));
    let counted: Vec<u64> = (0..3)
        .map(|slot| selected(&after.0, slot) - selected(&before.0, slot))
        .collect();
    assert_eq!(counted, [25, 25, 50]);
    assert_eq!(after.1 - before.1, 50, "the joined process served them");
    let (status, stderr) = joined.stop();
    assert!(status.success(), "{stderr}");
    let (status, _) = next.stop();
    assert!(status.success());
}
