//! Under load and against clients that misbehave: many connections held,
//! clients that do not read or trickle, the connection limit. Nothing a
//! well-behaved client does may fail, and the server's memory stays bounded.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use reuseport_tests::{
    connect_from, cpus_at_least, echo, eventually, hold_from_cpu, netns, pattern, Server,
};

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Connections held at once in CI; the benchmark holds 10,000.
const HELD: usize = 3_000;

#[test]
fn thousands_of_connections_are_held_and_every_one_echoes() {
    netns();
    // This process holds the clients' ends: as many descriptors again.
    reuseport::sys::raise_fd_limit();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let mut held = Vec::with_capacity(HELD);
    for i in 0..HELD {
        // Many source addresses, as many clients would be.
        let src = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 9, (i / 250) as u8, (i % 250 + 1) as u8)),
            0,
        );
        let mut s = connect_from(src, server.addr);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[i as u8]).unwrap();
        let mut b = [0u8];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        held.push(s);
    }
    let m = server.metrics();
    assert_eq!(m.active(0) + m.active(1), HELD as u64, "all held at once");
    assert_eq!(m.active(0).abs_diff(m.active(1)), 0, "on both workers");
    // Every one of them still echoes.
    for (i, s) in held.iter_mut().enumerate() {
        let p = pattern(16, i as u64);
        s.write_all(&p).unwrap();
        let mut got = [0u8; 16];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}, second echo: {e}"));
        assert_eq!(&got[..], &p[..]);
    }
    drop(held);
    assert!(eventually(Duration::from_secs(10), || {
        let m = server.metrics();
        m.active(0) + m.active(1) == 0
    }));
    assert_eq!(
        server
            .metrics()
            .count("reuseport_listen_overflows_total", &[]),
        0
    );
}

#[test]
fn a_client_that_never_reads_cannot_grow_the_server() {
    netns();
    let server = Server::start(&[
        "--policy",
        "cpu",
        "--workers",
        "1",
        "--buffer-size",
        "65536",
    ]);
    let before = rss(server.pid());
    let mut greedy = TcpStream::connect(server.addr).unwrap();
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut pushed = 0usize;
    // Write until the kernel stops taking more: the server has stopped
    // reading because its echo of what it read cannot be written.
    while pushed < 512 << 20 {
        match greedy.write(&chunk) {
            Ok(n) => pushed += n,
            Err(_) => break,
        }
    }
    assert!(
        pushed < 64 << 20,
        "the client pushed {pushed} bytes: the server must stop reading"
    );
    let grown = rss(server.pid()).saturating_sub(before);
    println!(
        "a client that never reads pushed {} KiB before being held back; the server grew {} KiB",
        pushed >> 10,
        grown >> 10
    );
    assert!(
        grown < 4 << 20,
        "the server buffered {grown} bytes for one client"
    );
    // The same (only) worker still serves everyone else.
    let started = Instant::now();
    for i in 0..20 {
        let p = pattern(1000, i);
        assert_eq!(echo(server.addr, &p), p);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "others served: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_trickling_client_does_not_hold_its_worker() {
    netns();
    let server = Server::start(&["--policy", "cpu", "--workers", "1", "--idle-timeout", "5s"]);
    let addr = server.addr;
    let trickle = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3u8 {
            s.write_all(&[i]).unwrap();
            let mut b = [0u8];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
            thread::sleep(Duration::from_secs(1));
        }
    });
    thread::sleep(Duration::from_millis(200));
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        let p = pattern(100, i);
        assert_eq!(echo(addr, &p), p);
        worst = worst.max(started.elapsed());
    }
    assert!(
        worst < Duration::from_millis(500),
        "a slow client slowed the others: {worst:?}"
    );
    trickle.join().expect("the trickling client is served too");
}

#[test]
fn at_the_connection_limit_a_worker_stops_accepting_and_least_loaded_steers_elsewhere() {
    netns();
    let server = Server::start(&[
        "--policy",
        "cpu",
        "--workers",
        "2",
        "--max-connections",
        "3",
    ]);
    let addr = server.addr;
    let cpu0 = cpus_at_least(
        2,
        "the client's CPU has worker 0 to itself under the cpu policy",
    )[0];
    // Worker 0 takes three long connections: it is at its limit.
    let held = hold_from_cpu(addr, cpu0, 3);
    assert_eq!(server.metrics().active(0), 3);
    let at_limit = |m: &reuseport_tests::Metrics| {
        m.count("reuseport_worker_at_limit_total", &[("worker", "0")])
    };
    assert!(
        eventually(Duration::from_secs(5), || at_limit(&server.metrics()) == 1),
        "it counted reaching its limit, once"
    );

    // Under least-loaded the full worker's load shows, and new
    // connections go to the other.
    server.switch(&["least-loaded"]);
    assert!(
        eventually(Duration::from_secs(5), || server
            .metrics()
            .count("reuseport_worker_load", &[("worker", "0")])
            == 3),
        "the worker's load counts its open connections"
    );
    let before = server.metrics();
    for i in 0..5 {
        let p = pattern(10, i);
        assert_eq!(echo(addr, &p), p);
    }
    let after = server.metrics();
    assert_eq!(
        after.accepted(1) - before.accepted(1),
        5,
        "least-loaded sent them all to the free worker"
    );
    assert_eq!(
        reuseport_tests::selected_delta(&before, &after, 2),
        [0, 5],
        "the program chose the free worker every time"
    );
    assert_eq!(
        after.count("reuseport_worker_queued", &[("worker", "0")]),
        0,
        "none waits on the full worker"
    );

    // Under round robin, half go to the full worker: they wait in its
    // queue (counted), and are served as soon as it has room.
    server.switch(&["round-robin"]);
    let waiting: Vec<_> = (0..4u64)
        .map(|i| thread::spawn(move || echo(addr, &pattern(10, 100 + i)) == pattern(10, 100 + i)))
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || server
            .metrics()
            .count("reuseport_worker_queued", &[("worker", "0")])
            > 0),
        "the connections waiting for the worker at its limit show in its queue"
    );
    drop(held);
    for w in waiting {
        assert!(
            w.join().unwrap(),
            "a connection that waited was served, not lost"
        );
    }
}

/// With an open-file limit it may not raise, the server says so, and what
/// it means, then serves.
#[test]
fn an_open_file_limit_too_low_is_named_at_start() {
    netns();
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args([
        "--nofile=256:256",
        "--",
        "setpriv",
        "--bounding-set=-sys_resource",
        "--",
    ])
    .arg(reuseport_tests::binary())
    .args(["run", "--addr", "127.0.0.1:0", "--workers", "2"]);
    let server = Server::spawn(&mut cmd).expect("it starts anyway");
    let p = pattern(100, 1);
    assert_eq!(echo(server.addr, &p), p);
    let (code, err) = server.stop();
    assert!(code.success(), "{err}");
    assert!(
        err.contains("the open-file limit is 256 and this process may not raise it (CAP_SYS_RESOURCE, or a higher hard limit: ulimit -Hn): at most about 192 connections can be open at once, fewer than --max-connections allows (16448)"),
        "{err}"
    );
}
