//! Bad input and missing privileges: a clear one-line error and a non-zero
//! exit, never a panic or a hang.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
};

use reuseport_tests::{binary, netns, Failed, Server};

/// Runs the binary expecting it to fail; returns (exit code, stderr).
fn fails(cmd: &mut Command) -> (i32, String) {
    let Failed { status, stderr, .. } = match Server::spawn(cmd) {
        Ok(_) => panic!("the server started, an error was expected"),
        Err(f) => f,
    };
    assert!(
        !stderr.contains("panicked"),
        "a panic is not an error message:\n{stderr}"
    );
    assert!(
        stderr.starts_with("error: "),
        "the first line says what is wrong:\n{stderr}"
    );
    (status.code().expect("exited, not killed"), stderr)
}

fn run(args: &[&str]) -> (i32, String) {
    fails(reuseport_tests::reuseport_command().arg("run").args(args))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[test]
fn unknown_policy_or_key() {
    netns();
    let (code, err) = run(&["--policy", "fastest"]);
    assert_eq!(code, 2);
    assert!(
        first_line(&err).contains("invalid value 'fastest' for '--policy"),
        "{err}"
    );
    assert!(err.contains("possible values: cpu, hash"), "{err}");

    let (code, err) = run(&["--policy", "hash", "--hash-key", "dst-ip"]);
    assert_eq!(code, 2);
    assert!(
        first_line(&err).contains("unknown hash key `dst-ip`"),
        "{err}"
    );
}

#[test]
fn worker_count_out_of_range() {
    netns();
    let max = reuseport_common::MAX_WORKERS;
    for n in [0, max + 1] {
        let (code, err) = run(&["--addr", "127.0.0.1:0", "--workers", &n.to_string()]);
        assert_eq!(code, 1);
        assert_eq!(
            first_line(&err),
            format!("error: --workers must be between 1 and {max}, not {n}")
        );
    }
}

#[test]
fn address_taken_by_a_socket_without_so_reuseport() {
    netns();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["--addr", &addr]);
    assert_eq!(code, 1);
    assert_eq!(
        first_line(&err),
        format!("error: tcp {addr} is in use by a socket without SO_REUSEPORT or of another user (EADDRINUSE)")
    );
}

#[test]
fn address_served_by_another_group_of_this_user() {
    netns();
    let first = Server::start(&["--policy", "cpu"]);
    let addr = first.addr.to_string();
    let (code, err) = run(&["--addr", &addr]);
    assert_eq!(code, 1);
    assert!(
        first_line(&err).contains("is already served by another reuseport group of this user"),
        "{err}"
    );
    // The running group was not touched: it still steers by its program.
    let p = b"still here".to_vec();
    assert_eq!(reuseport_tests::echo(first.addr, &p), p);
}

/// `reuseport run --policy POLICY` as root without any capability: what a
/// service account gets.
fn without_capabilities(policy: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
    ])
    .arg(binary())
    .args(["run", "--addr", "127.0.0.1:0", "--policy", policy]);
    cmd
}

#[test]
fn no_privilege_names_the_capabilities() {
    netns();
    let (code, err) = fails(&mut without_capabilities("cpu"));
    assert_eq!(code, 1);
    assert_eq!(
        first_line(&err),
        "error: loading the steering program needs CAP_BPF and CAP_NET_ADMIN (or root); this process lacks CAP_BPF and CAP_NET_ADMIN"
    );

    // The kernel policy needs no privilege at all.
    let server = Server::spawn(&mut without_capabilities("kernel"))
        .expect("the kernel policy runs unprivileged");
    let p = b"unprivileged".to_vec();
    assert_eq!(reuseport_tests::echo(server.addr, &p), p);
}

#[test]
fn verifier_rejection_shows_the_log() {
    netns();
    let object = reuseport_tests::test_object_file("verifier");
    let object_arg = object.to_str().expect("a UTF-8 temp path");
    let (code, err) = run(&[
        "--addr",
        "127.0.0.1:0",
        "--bpf-object",
        object_arg,
        "--bpf-program",
        "verifier_reject",
    ]);
    let _ = std::fs::remove_file(&object);
    assert_eq!(code, 1);
    assert!(
        first_line(&err)
            .starts_with("error: the kernel's verifier rejected BPF program `verifier_reject`"),
        "{err}"
    );
    assert!(
        err.contains("invalid access to packet"),
        "the verifier's own words follow:\n{err}"
    );
    assert!(err.lines().count() > 3, "the whole log:\n{err}");
}

/// The built-in (production) object carries no test program: asking the
/// server for one is a clear error, not a load.
#[test]
fn the_built_in_object_has_no_test_programs() {
    netns();
    for program in ["verifier_reject", "floor"] {
        let (code, err) = run(&["--addr", "127.0.0.1:0", "--bpf-program", program]);
        assert_eq!(code, 1);
        assert!(
            first_line(&err).contains(&format!("finding program `{program}`"))
                && first_line(&err).contains("no such program in the object"),
            "{err}"
        );
    }
}

#[test]
fn metrics_address_taken() {
    netns();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["--addr", "127.0.0.1:0", "--metrics-addr", &addr]);
    assert_eq!(code, 1);
    assert!(
        first_line(&err).starts_with(&format!("error: binding the metrics address {addr}")),
        "{err}"
    );
}

#[test]
fn help_lists_the_policies() {
    let out = reuseport_tests::reuseport_command()
        .args(["run", "--help"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for p in [
        "cpu",
        "hash",
        "kernel",
        "--hash-key",
        "--metrics-addr",
        "--idle-timeout",
    ] {
        assert!(help.contains(p), "{p} in help:\n{help}");
    }
}

#[test]
fn limits_and_intervals_out_of_range() {
    netns();
    for (args, shown) in [
        (
            &["--max-connections", "0"][..],
            "invalid value '0' for '--max-connections <MAX_CONNECTIONS>': 0 is not in 1..=1048576",
        ),
        (
            &["--max-connections", "18446744073709551615"][..],
            "invalid value '18446744073709551615' for '--max-connections <MAX_CONNECTIONS>'",
        ),
        (
            &["--buffer-size", "99999999999"][..],
            "invalid value '99999999999' for '--buffer-size <BUFFER_SIZE>': 99999999999 is not in 64..=16777216",
        ),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{err}");
        assert!(first_line(&err).starts_with(&format!("error: {shown}")), "{err}");
    }
    let (code, err) = fails(reuseport_tests::reuseport_command().args(["stats", "--watch", "inf"]));
    assert_eq!(code, 2);
    assert_eq!(
        first_line(&err),
        "error: invalid value 'inf' for '--watch <SECONDS>': inf is out of range: 0.1 to 86400"
    );
    let (code, err) = fails(reuseport_tests::reuseport_command().args(["bench", "--soak", "NaN"]));
    assert_eq!(code, 2);
    assert!(first_line(&err).contains("NaN is out of range"), "{err}");
}

#[test]
fn add_worker_on_a_cpu_the_owner_cannot_use() {
    netns();
    let server = Server::start(&["--workers", "1"]);
    let (code, _, err) = server.ctl(&["add-worker", "--cpu", "4000"]);
    assert_eq!(code, 1);
    let usable: Vec<String> = reuseport_tests::cpus()
        .iter()
        .map(usize::to_string)
        .collect();
    assert_eq!(
        first_line(&err),
        format!(
            "error: --cpu 4000: the group's owner may only run on CPUs {}",
            usable.join(",")
        )
    );
    let (_, status, _) = server.ctl(&["status"]);
    assert!(
        !status.lines().any(|l| l.trim_start().starts_with("1 ")),
        "no slot was taken:\n{status}"
    );
}

/// The loader probes what the kernel offers instead of reading its version.
/// In the VM matrix, Debian 11's 5.10 kernel lacks BPF atomics (5.12), and
/// the matrix says so through `REUSEPORT_TEST_KERNEL_LACKS` (what the error
/// must name, and nothing else): every steered
/// policy then fails with one line naming what is missing and the release
/// that brought it, while the kernel policy, which loads no program, serves.
/// On a kernel that has everything, the steering program loads and steers.
#[test]
fn missing_kernel_features_are_named() {
    netns();
    if let Ok(lacks) = std::env::var("REUSEPORT_TEST_KERNEL_LACKS") {
        for policy in ["cpu", "round-robin", "hash"] {
            let (code, err) = run(&["--addr", "127.0.0.1:0", "--policy", policy]);
            assert_eq!(code, 1, "{err}");
            let line = first_line(&err);
            // Exactly what is missing: the features it has are not named.
            assert!(
                line.starts_with("error: this kernel (Linux ")
                    && line.ends_with(&format!(
                        "is too old for the steering program: it lacks {lacks}"
                    )),
                "--policy {policy}, expected it to lack {lacks}: {err}"
            );
        }
        let server = Server::start(&["--policy", "kernel", "--workers", "2"]);
        let p = b"no program needed".to_vec();
        assert_eq!(reuseport_tests::echo(server.addr, &p), p);
        return;
    }
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let before = server.metrics();
    for i in 0..4 {
        let p = reuseport_tests::pattern(16, i);
        assert_eq!(reuseport_tests::echo(server.addr, &p), p);
    }
    let moved = reuseport_tests::selected_delta(&before, &server.metrics(), 2);
    assert_eq!(moved, vec![2, 2], "the program steered every connection");
    assert!(
        !server.stderr().contains("lacks"),
        "nothing is missing here: {}",
        server.stderr()
    );
}

/// Without listener migration (before 5.14) the loader attaches the
/// select-only program and says once what that loses. No kernel within the
/// matrix's reach has BPF atomics but no migration, so the debug build's
/// `REUSEPORT_PROBE_HIDE` makes the probe report it missing.
#[test]
fn without_listener_migration_the_program_selects_only() {
    netns();
    let group = reuseport_tests::unique_group();
    let mut cmd = reuseport_tests::reuseport_command();
    cmd.env("REUSEPORT_PROBE_HIDE", "migrate").args([
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
    let server = Server::spawn(&mut cmd).expect("it serves without migration");
    let names: Vec<String> = reuseport_tests::bpf_programs_of(server.pid())
        .into_iter()
        .filter_map(reuseport_tests::bpf_program_name)
        .collect();
    assert!(
        names.iter().any(|n| n == "steer_select") && !names.iter().any(|n| n == "steer"),
        "the select-only program is loaded: {names:?}"
    );
    let before = server.metrics();
    for i in 0..6 {
        let p = reuseport_tests::pattern(16, i);
        assert_eq!(reuseport_tests::echo(server.addr, &p), p);
    }
    let moved = reuseport_tests::selected_delta(&before, &server.metrics(), 2);
    assert_eq!(moved, vec![3, 3], "the select-only program steers");
    let said = server.stderr().matches("lacks listener migration").count();
    assert_eq!(said, 1, "said once:\n{}", server.stderr());
    assert!(
        server.stderr().contains("reset when it closes"),
        "and what that loses:\n{}",
        server.stderr()
    );
}

/// `RUST_LOG` in the environment of whoever runs the tests does not change
/// what they see (issue 12): this test executable runs its select-only test
/// again, which reads a warning from the server's log, with the log turned
/// off, down to errors and up to trace around it. The harness sets the
/// servers' level itself.
#[test]
fn rust_log_of_the_environment_does_not_change_results() {
    let me = std::env::current_exe().expect("current_exe");
    for level in ["off", "error", "trace"] {
        let out = Command::new(&me)
            .args([
                "--exact",
                "without_listener_migration_the_program_selects_only",
                "--test-threads",
                "1",
            ])
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .output()
            .expect("running this test executable again");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("test result: ok. 1 passed"),
            "with RUST_LOG={level}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
