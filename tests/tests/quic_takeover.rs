//! A restart of the QUIC example by takeover (`quic_echo --takeover`): 200
//! connections with streams in flight go on in the old process (their
//! cookies name its sockets, which the new generation carries, draining),
//! none broken, while new connections reach the new process; the old one
//! exits once its connections have closed. The same run under `--policy
//! kernel` is counted and printed for comparison.

use std::{process::Command, time::Duration};

use reuseport_tests::{
    quic::{self, example_path, Fleet, FleetResult, QuicEcho},
    unique_group, Metrics, Server,
};

const WORKERS: usize = 3;
const CONNECTIONS: usize = 200;

fn counter(m: &Metrics, name: &str) -> u64 {
    m.count(&format!("reuseport_bpf_{name}_total"), &[])
}

/// Every worker's connections accepted, summed.
fn accepted(m: &Metrics) -> u64 {
    m.0.iter()
        .filter(|(k, _)| k.starts_with("reuseport_worker_accepted_total{"))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// Whether process `pid` (a child not yet reaped) has exited.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// `quic_echo --takeover GROUP`, with a certificate of its own at `cert`.
fn takeover(group: &str, policy: &str, cert: &std::path::Path) -> Server {
    let mut cmd = Command::new(example_path());
    cmd.args([
        "127.0.0.1:0",
        "--takeover",
        group,
        "--metrics",
        "127.0.0.1:0",
    ])
    .args(["--workers", &WORKERS.to_string(), "--policy", policy])
    .args(["--drain-timeout", "30", "--cert"])
    .arg(cert)
    .env("RUST_LOG", "info");
    match Server::spawn(&mut cmd) {
        Ok(s) => s,
        Err(f) => panic!(
            "the takeover did not start ({}):\n{}{}",
            f.status, f.stdout, f.stderr
        ),
    }
}

struct Run {
    result: FleetResult,
    first: QuicEcho,
    next: Server,
    next_cert: std::path::PathBuf,
    /// The new process's metrics just after the takeover and at the end.
    metrics: [Metrics; 2],
}

/// 200 connections with streams in flight, then a takeover while they run.
fn restart(policy: &str) -> Run {
    let first = QuicEcho::start(&[
        "--workers",
        &WORKERS.to_string(),
        "--policy",
        policy,
        "--drain-timeout",
        "30",
    ]);
    let fleet = Fleet::start(
        first.addr(),
        quic::client_config(&first.cert),
        CONNECTIONS,
        600,
        Duration::from_millis(300),
    );
    assert_eq!(
        fleet.connected(),
        CONNECTIONS as u64,
        "every connection established before the takeover"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let next_cert = std::env::temp_dir().join(format!("{}-next.der", unique_group()));
    let next = takeover(&first.server.group, policy, &next_cert);
    let m0 = next.metrics();
    std::thread::sleep(Duration::from_millis(1500));
    fleet.mark();
    // Every connection echoes again after the takeover (a broken one never
    // does: the kernel's run waits the whole time).
    let all =
        fleet.wait_all_since_mark(Duration::from_secs(if policy == "kernel" { 4 } else { 30 }));
    let result = fleet.stop();
    assert_eq!(all, result.since_mark.iter().all(|&n| n > 0));
    let m1 = next.metrics();
    Run {
        result,
        first,
        next,
        next_cert,
        metrics: [m0, m1],
    }
}

#[test]
fn quic_connections_survive_a_takeover_restart() {
    reuseport_tests::netns();
    let Run {
        result: r,
        first,
        next,
        next_cert,
        metrics: [m0, m1],
    } = restart("hash");
    eprintln!(
        "takeover, quic policy: {} connections, {} broken, {} streams",
        r.connected,
        r.broken.len(),
        r.streams
    );
    assert_eq!(r.connected, CONNECTIONS);
    assert!(r.failed_to_connect.is_empty(), "{:?}", r.failed_to_connect);
    assert!(r.broken.is_empty(), "broken: {:?}", r.broken);
    let stalled: Vec<usize> = (0..CONNECTIONS).filter(|&i| r.since_mark[i] == 0).collect();
    assert!(
        stalled.is_empty(),
        "connections that echoed nothing after the takeover: {stalled:?}"
    );
    // The new generation's program steered the old connections by their
    // cookies to the old process's sockets, which it carried.
    assert!(
        counter(&m1, "cookie_ok") > counter(&m0, "cookie_ok"),
        "the new program steered by cookies"
    );
    assert_eq!(
        counter(&m1, "cookie_old"),
        counter(&m0, "cookie_old"),
        "no cookie named a socket that was gone"
    );
    // Its connections closed by their clients, the old process exits by
    // itself, long before its drain timeout (30 s).
    assert!(
        reuseport_tests::eventually(Duration::from_secs(25), || exited(first.server.pid())),
        "the old process exits once its connections closed:\n{}",
        first.server.stderr()
    );
    assert!(
        first.server.stderr().contains("shut down cleanly"),
        "{}",
        first.server.stderr()
    );

    // New connections reach the new process.
    let config = quic::client_config(&next_cert);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = next.addr;
    let before = next.metrics();
    let fresh = rt.block_on(quic::fresh_connections(&config, addr, 20));
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    assert_eq!(accepted(&next.metrics()) - accepted(&before), 20);
    let _ = std::fs::remove_file(&next_cert);
}

#[test]
fn the_kernel_policy_breaks_quic_connections_across_a_takeover_restart() {
    reuseport_tests::netns();
    let run = restart("kernel");
    let r = &run.result;
    // The comparison, not a requirement: without a program, the new
    // process's sockets join the group and the kernel's hash sends the old
    // connections' packets to endpoints that do not know them.
    eprintln!(
        "takeover, kernel policy: {} connections, {} broken, {} streams; first: {:?}",
        r.connected,
        r.broken.len(),
        r.streams,
        r.broken.first()
    );
    assert_eq!(r.connected, CONNECTIONS, "the run itself worked");
    // The old process may still wait for its broken connections: stopped,
    // it removes its pins (a killed one would leave them behind).
    run.first.server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(reuseport_tests::eventually(Duration::from_secs(30), || {
        exited(run.first.server.pid())
    }));
    let _ = std::fs::remove_file(&run.next_cert);
}

#[test]
fn a_takeover_while_a_worker_drains_carries_it_and_breaks_nothing() {
    // The steps that failed: a worker of the QUIC example drains (its
    // endpoint keeps its socket for its connections), a worker is added,
    // then a new generation takes over. The draining slot's record named
    // the group's descriptor of its socket, closed at the drain and by
    // then reused for the added worker's socket, so the takeover tried to
    // carry that one into the draining slot and failed ("placing a socket
    // in slot N: ... Device or resource busy").
    reuseport_tests::netns();
    let connections = 60;
    let first = QuicEcho::start(&[
        "--workers",
        &WORKERS.to_string(),
        "--policy",
        "hash",
        "--drain-timeout",
        "30",
    ]);
    let fleet = Fleet::start(
        first.addr(),
        quic::client_config(&first.cert),
        connections,
        600,
        Duration::from_millis(300),
    );
    assert_eq!(fleet.connected(), connections as u64);
    let (code, out, err) = first.server.ctl(&["drain", "0"]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = first.server.ctl(&["add-worker"]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(1000));
    let next_cert = std::env::temp_dir().join(format!("{}-next.der", unique_group()));
    let next = takeover(&first.server.group, "hash", &next_cert);
    assert!(
        next.stderr()
            .contains("carried the owner's worker 0 of process"),
        "the draining worker is carried into the new generation:\n{}",
        next.stderr()
    );
    let m0 = next.metrics();
    std::thread::sleep(Duration::from_millis(1500));
    fleet.mark();
    let all = fleet.wait_all_since_mark(Duration::from_secs(30));
    let r = fleet.stop();
    eprintln!(
        "takeover during a drain: {} connections, {} broken, {} streams",
        r.connected,
        r.broken.len(),
        r.streams
    );
    assert!(r.broken.is_empty(), "broken: {:?}", r.broken);
    assert!(all, "every connection echoed after the takeover");
    // The new program kept them there by their cookies, the drained
    // worker's too: none named a socket that was gone.
    let m1 = next.metrics();
    assert!(
        counter(&m1, "cookie_ok") > counter(&m0, "cookie_ok"),
        "the new program steered by cookies"
    );
    assert_eq!(
        counter(&m1, "cookie_old"),
        counter(&m0, "cookie_old"),
        "no cookie named a socket that was gone"
    );
    drop(next);
    let _ = std::fs::remove_file(&next_cert);
}
