//! `--policy hash`: the slot is our documented MurmurHash3 of the key,
//! modulo the live workers, and user space predicts it exactly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use reuseport_common::{hash::hash_addrs, key};
use reuseport_tests::{netns, pattern, tcp_once, Server};

/// The worker the program must pick, computed in user space.
fn predicted(
    kind: u32,
    seed: u32,
    workers: usize,
    client: SocketAddr,
    server: SocketAddr,
) -> usize {
    let hash = hash_addrs(kind, seed, client, server).expect("address key");
    (hash % workers as u32) as usize
}

/// Opens one echo connection from `src` and returns the worker that
/// served it (the one whose accepted counter moved).
fn served_by(server: &Server, src: SocketAddr, workers: usize) -> (usize, SocketAddr) {
    server.served_by(workers, || {
        tcp_once(src, server.addr, &pattern(32, u64::from(src.port())))
    })
}

fn client(last: u8, third: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, third, last)), 0)
}

#[test]
fn src_ip_keeps_one_client_on_one_worker_and_spreads_clients() {
    netns();
    let workers = 4;
    let seed: u32 = 24301;
    let seed_arg = seed.to_string();
    let server = Server::start(&[
        "--policy",
        "hash",
        "--hash-key",
        "src-ip",
        "--workers",
        "4",
        "--seed",
        &seed_arg,
    ]);
    // One client address, many source ports: always the same worker.
    let one = client(7, 0);
    let (first, _) = served_by(&server, one, workers);
    for _ in 0..30 {
        assert_eq!(
            served_by(&server, one, workers).0,
            first,
            "client {one} moved"
        );
    }
    assert_eq!(
        first,
        predicted(key::SRC_IP, seed, workers, one, server.addr)
    );

    // 64 client addresses: each on its predicted worker, every worker used.
    let mut per_worker = vec![0; workers];
    for i in 0..64u8 {
        let src = client(i + 1, 9);
        let (w, _) = served_by(&server, src, workers);
        assert_eq!(
            w,
            predicted(key::SRC_IP, seed, workers, src, server.addr),
            "client {src}"
        );
        per_worker[w] += 1;
    }
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "every worker serves some clients: {per_worker:?}"
    );
    assert_eq!(server.metrics().fallback(), 0);
}

#[test]
fn four_tuple_maps_each_tuple_to_its_predicted_slot() {
    netns();
    let workers = 2;
    let server = Server::start(&[
        "--policy",
        "hash",
        "--hash-key",
        "four-tuple",
        "--workers",
        "2",
    ]);
    let mut seen = [0; 2];
    for i in 0..40u16 {
        // A fixed source port, so the same 4-tuple can be used twice.
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 20_000 + i);
        let (w1, local) = served_by(&server, src, workers);
        let (w2, _) = served_by(&server, src, workers);
        assert_eq!(w1, w2, "the same 4-tuple {local} moved");
        assert_eq!(
            w1,
            predicted(key::FOUR_TUPLE, 0, workers, local, server.addr),
            "tuple {local}"
        );
        seen[w1] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "both workers used: {seen:?}");
}

#[test]
fn another_seed_gives_another_spread() {
    netns();
    let workers = 2;
    let mut moved = 0;
    let a = Server::start(&["--policy", "hash", "--workers", "2", "--seed", "1"]);
    let b = Server::start(&["--policy", "hash", "--workers", "2", "--seed", "2"]);
    for i in 0..32u8 {
        let src = client(i + 1, 3);
        let (wa, _) = served_by(&a, src, workers);
        let (wb, _) = served_by(&b, src, workers);
        assert_eq!(wa, predicted(key::SRC_IP, 1, workers, src, a.addr));
        assert_eq!(wb, predicted(key::SRC_IP, 2, workers, src, b.addr));
        moved += usize::from(wa != wb);
    }
    assert!(moved > 0, "the seed changes where clients land");
}

#[test]
fn switching_away_and_back_keeps_the_key_and_seed() {
    netns();
    let workers = 3;
    let server = Server::start(&[
        "--policy",
        "hash",
        "--hash-key",
        "four-tuple",
        "--seed",
        "77",
        "--workers",
        "3",
    ]);
    let (code, _, err) = server.ctl(&["policy", "round-robin"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = server.ctl(&["policy", "hash"]);
    assert_eq!(code, 0, "{err}");
    let (_, status, _) = server.ctl(&["status"]);
    assert!(
        status.contains("policy hash (key four-tuple, seed 77)"),
        "{status}"
    );
    // And the program steers by them again.
    for i in 0..20u8 {
        let (w, src) = served_by(&server, client(i + 1, 3), workers);
        assert_eq!(
            w,
            predicted(key::FOUR_TUPLE, 77, workers, src, server.addr),
            "connection from {src}"
        );
    }
}

/// `--hash-key flow`: the kernel's own hash of the 4-tuple, read from the
/// program's context (no header read). Not predictable from user space,
/// but stable: a 4-tuple always reaches the same worker, many tuples reach
/// every worker, and the program places every connection.
#[test]
fn the_flow_key_keeps_a_tuple_on_one_worker_and_spreads_tuples() {
    netns();
    let workers = 3;
    let server = Server::start(&["--policy", "hash", "--hash-key", "flow", "--workers", "3"]);
    let (_, status, _) = server.ctl(&["status"]);
    assert!(status.contains("key flow"), "{status}");
    let mut seen = [0; 3];
    for i in 0..30u16 {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), 21_000 + i);
        let (w1, local) = served_by(&server, src, workers);
        let (w2, _) = served_by(&server, src, workers);
        assert_eq!(w1, w2, "the same 4-tuple {local} moved");
        seen[w1] += 1;
    }
    assert!(seen.iter().all(|&n| n > 0), "every worker used: {seen:?}");
    let m = server.metrics();
    assert_eq!(m.fallback(), 0);
    assert_eq!(m.count("reuseport_bpf_key_unreadable_total", &[]), 0);
}
