//! Faults in handlers: a panic in one connection's task, a worker that dies.
//! These use the library directly, with handlers that fail on purpose.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use reuseport::{
    echo::echo,
    server::{ServeOptions, Server},
    Group, Policy, PolicyKind,
};
use reuseport_tests::{connect_from, echo_on, eventually, netns, pattern, Metrics};

const POISON: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);

fn from(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), 0)
}

/// A connection from the poisoned address: whatever comes back before the
/// server closes or resets it.
fn poison(addr: SocketAddr) -> Vec<u8> {
    let mut s = connect_from(from(POISON), addr);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"boom");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn group(workers: usize) -> Group {
    Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .workers(workers)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .pin(false)
        .build()
        .expect("group")
}

fn options() -> ServeOptions {
    ServeOptions {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    }
}

#[test]
fn a_panic_in_one_connection_leaves_its_worker_serving() {
    netns();
    let server = Server::start_tcp(
        group(1),
        |stream, conn: reuseport::worker::Conn| async move {
            if conn.peer.ip() == IpAddr::V4(POISON) {
                panic!("this connection's handler fails");
            }
            echo(stream, conn).await
        },
        options(),
    )
    .unwrap();
    let addr = server.local_addr();
    assert!(
        poison(addr).is_empty(),
        "the failed connection is closed, not answered"
    );
    for i in 0..20 {
        let p = pattern(50, i);
        assert_eq!(
            echo_on(connect_from(from(Ipv4Addr::LOCALHOST), addr), &p),
            p
        );
    }
    let m = Metrics::scrape(server.metrics_addr().unwrap());
    assert_eq!(
        m.accepted(0),
        21,
        "the one worker served everyone, the failed one included"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_worker_that_dies_is_taken_out_at_once_and_restarted() {
    netns();
    // The handler fails before it returns its future: that takes the
    // worker's whole thread down, not only a task.
    let server = Server::start_tcp(
        group(2),
        |stream, conn: reuseport::worker::Conn| {
            if conn.peer.ip() == IpAddr::V4(POISON) {
                panic!("this handler takes its worker down");
            }
            echo(stream, conn)
        },
        options(),
    )
    .unwrap();
    let addr = server.local_addr();
    let metrics = server.metrics_addr().unwrap();
    // Round robin: find which worker the next connection goes to, then
    // send the poison there.
    let _ = echo_on(connect_from(from(Ipv4Addr::LOCALHOST), addr), b"warm");
    let victim_before = Metrics::scrape(metrics);
    let _ = poison(addr);
    let killed = (0..2)
        .find(|&w| Metrics::scrape(metrics).accepted(w) > victim_before.accepted(w))
        .expect("a worker took the poison");
    // At once, every new connection is served: none is steered to the
    // dead worker's socket.
    for i in 0..50 {
        let p = pattern(20, i);
        assert_eq!(
            echo_on(connect_from(from(Ipv4Addr::LOCALHOST), addr), &p),
            p,
            "connection {i} after the fault"
        );
    }
    // And the worker comes back: round robin reaches it again.
    assert!(
        eventually(Duration::from_secs(5), || {
            let before = Metrics::scrape(metrics);
            for i in 0..4 {
                let p = pattern(8, i);
                assert_eq!(
                    echo_on(connect_from(from(Ipv4Addr::LOCALHOST), addr), &p),
                    p
                );
            }
            let after = Metrics::scrape(metrics);
            after.accepted(killed) > before.accepted(killed)
        }),
        "worker {killed} was restarted and serves again"
    );
    let m = Metrics::scrape(metrics);
    assert_eq!(m.fallback(), 0, "nothing was left to the kernel's hash");
    server.shutdown().unwrap();
}
