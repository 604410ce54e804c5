//! Faults in handlers: a panic in one connection's task (it ends that
//! connection only), a datagram handler's panic (it ends its worker, which
//! is taken out at once and restarted).
//! These use the library directly, with handlers that fail on purpose.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use reuseport::{
    echo::echo,
    server::{ServeOptions, Server},
    Group, Policy, PolicyKind, Proto,
};
use reuseport_tests::{connect_from, echo_on, eventually, netns, pattern, selected_delta, Metrics};

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
    let mut options = ServeOptions::default();
    options.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    options
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

/// A UDP group of `workers` under round robin.
fn udp_group(workers: usize) -> Group {
    Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .proto(Proto::Udp)
        .workers(workers)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .pin(false)
        .build()
        .expect("group")
}

/// A datagram handler that echoes, and panics on `boom`: a datagram
/// handler runs in its worker's receive loop, so this ends the worker.
fn fragile(buf: &mut [u8], len: usize, _: SocketAddr) -> Option<usize> {
    if &buf[..len] == b"boom" {
        panic!("this datagram takes its worker down");
    }
    Some(len)
}

/// Sends `payload` and returns the echo, if one comes within 2 s.
fn exchange(addr: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(payload, addr).unwrap();
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

#[test]
fn a_worker_that_dies_is_taken_out_at_once_and_restarted() {
    netns();
    let server = Server::start_udp(udp_group(2), fragile, options()).unwrap();
    let addr = server.local_addr();
    let metrics = server.metrics_addr().unwrap();
    assert_eq!(exchange(addr, b"warm").as_deref(), Some(&b"warm"[..]));
    // Panics print their message only: capturing a backtrace (this
    // environment sets RUST_BACKTRACE) takes longer than the supervisor's
    // check, and the fault hook runs only after it.
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    // Sent without waiting: what follows must come before the supervisor's
    // next check (every 100 ms) rebuilds the policy, so that only the
    // fault hook, run as the worker died, keeps datagrams off its socket.
    // When that check comes first anyway (it may, by chance), the fault is
    // made again, until one shows the hook at work: datagrams steered to
    // the dead slot found it empty and went on to the live worker.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut killed = None;
    for attempt in 0..3 {
        let before = Metrics::scrape(metrics);
        s.send_to(b"boom", addr).unwrap();
        thread::sleep(Duration::from_millis(20));
        for i in 0..10u8 {
            s.send_to(&[i; 8], addr).unwrap();
            let n = s.recv(&mut buf).unwrap_or_else(|e| {
                panic!("attempt {attempt}: datagram {i} right after the fault was lost: {e}")
            });
            assert_eq!(&buf[..n], &[i; 8]);
        }
        let m = Metrics::scrape(metrics);
        let moved: Vec<u64> = (0..2).map(|w| m.selected(w) - before.selected(w)).collect();
        assert_eq!(moved.iter().sum::<u64>(), 11, "{moved:?}");
        let skipped = m.empty_slot() - before.empty_slot();
        if skipped > 0 {
            // The dead worker's slot got the fatal datagram and nothing
            // more; the other got the ten that followed.
            let dead = if moved[0] < moved[1] { 0 } else { 1 };
            assert_eq!(moved[dead], 1, "{moved:?}");
            killed = Some(dead);
            break;
        }
        // Restarted in the meantime: wait until both serve again.
        assert!(eventually(Duration::from_secs(5), || {
            let before = Metrics::scrape(metrics);
            for i in 0..4 {
                let p = pattern(8, i);
                assert_eq!(exchange(addr, &p), Some(p));
            }
            let moved = selected_delta(&before, &Metrics::scrape(metrics), 2);
            moved.iter().all(|&n| n > 0)
        }));
    }
    let killed = killed.expect("in one of three attempts the fault hook emptied the slot first");
    for i in 0..50 {
        let p = pattern(20, i);
        assert_eq!(exchange(addr, &p), Some(p), "datagram {i} after the fault");
    }
    // And the worker comes back: round robin reaches its slot again.
    assert!(
        eventually(Duration::from_secs(5), || {
            let before = Metrics::scrape(metrics);
            for i in 0..4 {
                let p = pattern(8, i);
                assert_eq!(exchange(addr, &p), Some(p));
            }
            let after = Metrics::scrape(metrics);
            after.selected(killed) > before.selected(killed)
        }),
        "worker {killed} was restarted and serves again"
    );
    let m = Metrics::scrape(metrics);
    assert_eq!(m.fallback(), 0, "nothing was left to the kernel's hash");
    server.shutdown().unwrap();
}

/// A worker that dies on every datagram is restarted at most 5 times in
/// 10 s; once no worker is left, serving ends with an error that says so
/// (the process would exit 1), not as if it had drained.
#[test]
fn a_worker_that_always_dies_ends_serving_with_an_error() {
    netns();
    let server = Server::start_udp(udp_group(1), fragile, options()).unwrap();
    let addr = server.local_addr();
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut fatal = 0;
    let ended = eventually(Duration::from_secs(20), || {
        let _ = s.send_to(b"boom", addr);
        fatal += 1;
        thread::sleep(Duration::from_millis(100));
        server.finished()
    });
    assert!(ended, "serving ended (after {fatal} fatal datagrams)");
    let err = server.wait().expect_err("serving ends with an error");
    assert!(
        err.to_string()
            .contains("worker(s) 0 died again after 5 restarts in 10s and were not restarted"),
        "{err}"
    );
}
