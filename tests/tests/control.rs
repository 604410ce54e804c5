//! `reuseport ctl` and `reuseport stats` on a running group, through its
//! pinned maps: errors, pins, stale pins, the table.

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use reuseport_tests::{
    cpus_at_least, echo, netns, pattern, pin_dir, pin_to_cpu, reuseport, unique_group, Server,
};

#[test]
fn ctl_errors_are_one_clear_line() {
    netns();
    let (code, _, err) = reuseport(&["ctl", "--group", "no-such-group", "status"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "error: no group named no-such-group is running (nothing pinned at {})",
            pin_dir("no-such-group").display()
        )
    );

    let server = Server::start(&["--policy", "cpu", "--workers", "2"]);
    let (code, _, err) = server.ctl(&["policy", "weighted", "--weights", "3,x"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "error: invalid value '3,x' for '--weights <WEIGHTS>': bad weight list `3,x`"
        ),
        "{err}"
    );

    let (code, _, err) = server.ctl(&["policy", "weighted", "--weights", "3"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "error: --weights has 1 weights for 2 workers: give one per worker"
    );

    let (code, _, err) = server.ctl(&["policy", "weighted"]);
    assert_eq!(code, 1, "weighted without weights: {err}");
    assert_eq!(
        err.lines().next().unwrap(),
        "error: worker 0 has no weight yet: give --weights, one per worker"
    );

    let (code, _, err) = server.ctl(&["policy", "fastest"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: invalid value 'fastest' for '<POLICY>'"),
        "{err}"
    );

    let (code, _, err) = server.ctl(&["policy", "hash", "--hash-key", "payload:0:4"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs --proto udp"), "{err}");

    // Nothing of that changed the policy.
    assert_eq!(server.metrics().policy(), "cpu");
    assert!(!err.contains("panicked"));
}

#[test]
fn a_group_started_without_a_program_cannot_switch() {
    netns();
    let server = Server::start(&["--policy", "kernel"]);
    let (code, _, err) = server.ctl(&["policy", "round-robin"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "error: group {} was started with the kernel policy, without a program: restart it with another policy to switch live",
            server.group
        )
    );
    // Its counters are still there for `stats`.
    let (code, out, err) = reuseport(&["stats", "--group", &server.group]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy kernel (no program attached)"), "{out}");
}

#[test]
fn pins_are_private_and_removed_on_clean_exit() {
    netns();
    let server = Server::start(&["--policy", "cpu"]);
    let dir = pin_dir(&server.group);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        // The maps are files; `owner` is the directory whose lock the
        // owner holds while it runs.
        let mode = if name == "owner" { 0o700 } else { 0o600 };
        assert_eq!(
            e.metadata().unwrap().permissions().mode() & 0o777,
            mode,
            "{:?}",
            e.path()
        );
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        ["COUNTERS", "FLOWS", "GROUP", "LAYOUT", "SOCKETS", "STATE", "TABLE", "WORKERS", "owner"]
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert!(!dir.exists(), "pins removed on clean exit");
}

#[test]
fn stale_pins_of_a_crashed_run_are_replaced_and_a_live_group_is_refused() {
    netns();
    let group = unique_group();
    let start = |extra: &[&str]| {
        let mut args = vec!["--policy", "cpu", "--group", group.as_str()];
        args.extend(extra);
        Server::try_start(&args)
    };
    let first = start(&[]).expect("first run");
    // A second group under the same name while the first runs: refused.
    let refused = start(&[]).err().expect("the name is taken");
    assert_eq!(
        refused.stderr.lines().next().unwrap(),
        format!(
            "error: group {group} is already running (pid {}); stop it or pick another --group",
            first.pid()
        )
    );
    // The first one crashes: its pins stay behind.
    let crashed_pid = first.pid();
    first.signal(Signal::SIGKILL);
    thread::sleep(Duration::from_millis(200));
    assert!(pin_dir(&group).exists());
    let second = start(&[]).expect("a new run replaces stale pins");
    assert!(
        second.stderr().contains(&format!(
            "removing stale pins of group {group} left by pid {crashed_pid}, which is gone"
        )),
        "{}",
        second.stderr()
    );
    let p = pattern(10, 1);
    assert_eq!(echo(second.addr, &p), p);
    let (status, _) = second.stop();
    assert!(status.success());
}

#[test]
fn stats_prints_the_table_and_the_balance() {
    netns();
    // Worker 0 on the first CPU, worker 1 on the second: clients on those
    // two send 10 and 20 connections, whatever the CPU count beyond two.
    let cpus = cpus_at_least(2, "each of two workers has a CPU of its own");
    let server = Server::start(&["--policy", "cpu", "--workers", "2"]);
    let addr = server.addr;
    for (i, cpu) in cpus.into_iter().take(2).enumerate() {
        thread::spawn(move || {
            pin_to_cpu(cpu);
            for k in 0..(10 * (i + 1)) as u64 {
                let p = pattern(100, k);
                assert_eq!(echo(addr, &p), p);
            }
        })
        .join()
        .unwrap();
    }
    // The same balance on /metrics (the first scrape: since the start).
    let m = server.metrics();
    let gauge = |name: &str| m.get(name, &[]).unwrap_or(f64::NAN);
    assert!((gauge("reuseport_balance_max_over_mean") - 4.0 / 3.0).abs() < 1e-3);
    assert!((gauge("reuseport_balance_cv") - 1.0 / 3.0).abs() < 1e-3);
    assert!((gauge("reuseport_balance_jain_index") - 0.9).abs() < 1e-3);
    // A worker counts a connection open until it has seen the client's
    // close, which can come after the client read its echo: ask again
    // (for at most 5 s) until both say none is open.
    let mut out = String::new();
    for _ in 0..50 {
        let (code, now, err) = reuseport(&["stats", "--group", &server.group]);
        assert_eq!(code, 0, "{err}");
        out = now;
        let open: Vec<&str> = out
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 8 && (f[0] == "0" || f[0] == "1"))
            .map(|f| f[5])
            .collect();
        if open == ["0", "0"] {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "group {}: tcp {addr}, pid {}, policy cpu",
            server.group,
            server.pid()
        )),
        "{out}"
    );
    let row = |slot: &str| -> Vec<String> {
        lines
            .iter()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first().map(String::as_str) == Some(slot) && f.len() == 8)
            .unwrap_or_else(|| panic!("row {slot} in\n{out}"))
    };
    // slot cpu state selected accepted active load bytes
    assert_eq!(row("0")[2..], ["serving", "10", "10", "0", "0", "1000"]);
    assert_eq!(row("1")[2..], ["serving", "20", "20", "0", "0", "2000"]);
    assert!(
        out.contains("balance (since start): 30 steered, max/mean 1.333, cv 0.333, jain 0.9000"),
        "{out}"
    );
    assert!(
        out.contains("program: fallback 0, dropped 0, empty slot 0"),
        "{out}"
    );

    // --watch: one table per interval, with that interval's balance.
    let mut watch = reuseport_tests::reuseport_command()
        .args(["stats", "--group", &server.group, "--watch", "0.3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Two tables after the first: read as they come, for at most 15 s (a
    // busy machine may start the binary slowly). Read to the end, so that
    // the watcher never writes to a closed pipe.
    let stdout = watch.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut seen = seen.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        })
    };
    let interval = "balance (last 0.3 s): no connections";
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.lock().unwrap().matches(interval).count() < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    watch.kill().unwrap();
    let _ = watch.wait();
    reader.join().unwrap();
    let out = seen.lock().unwrap().clone();
    assert!(
        out.matches("balance (last 0.3 s): no connections").count() >= 2,
        "{out}"
    );
}

/// `reuseport stats --watch N | head`: when the reader goes away the
/// watcher ends as a Unix filter does, by SIGPIPE, not with a panic
/// ("failed printing to stdout: Broken pipe", seen before).
#[test]
fn stats_watch_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let mut watch = reuseport_tests::reuseport_command()
        .args(["stats", "--group", &server.group, "--watch", "0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first table's first line, then hang up, as `head -1` does.
    let mut first = String::new();
    BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("group "), "{first}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = watch.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the watcher went on writing to nobody"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {err}");
    let (status, _) = server.stop();
    assert!(status.success());
}
