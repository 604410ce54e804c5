//! UDP groups: every datagram echoed unchanged, every policy's property,
//! sessions that stick to a worker by a key in the payload.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
};

use reuseport_common::{hash::hash_addrs, key};
use reuseport_tests::{
    accepted_delta, cpus_at_least, netns, pattern, pin_to_cpu, reuseport, selected_delta,
    udp_exchange, udp_exchange_on, udp_socket, Metrics, Server,
};

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f20_0000 + n))
}

/// Sends one datagram from `src` and returns the worker that answered.
fn served_by(server: &Server, src: SocketAddr, payload: &[u8], workers: usize) -> usize {
    server
        .served_by(workers, || {
            assert_eq!(udp_exchange(src, server.addr, payload), payload)
        })
        .0
}

fn udp(args: &[&str]) -> Server {
    let mut full = vec!["--proto", "udp"];
    full.extend(args);
    Server::start(&full)
}

#[test]
fn datagrams_of_every_size_come_back_unchanged() {
    netns();
    let server = udp(&["--policy", "round-robin", "--workers", "2"]);
    let addr = server.addr;
    let sizes = [0usize, 1, 2, 100, 1472, 1473, 9000, 65_507];
    let clients: Vec<_> = (0..16)
        .map(|i| {
            thread::spawn(move || {
                let s = udp_socket("127.0.0.1:0".parse().unwrap());
                for (k, size) in sizes.iter().enumerate() {
                    let p = pattern(*size, (i * 100 + k) as u64);
                    let got = udp_exchange_on(&s, addr, &p);
                    assert!(
                        got == p,
                        "client {i}: a {size}-byte datagram came back changed"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let m = server.metrics();
    assert_eq!(m.accepted(0) + m.accepted(1), 16 * sizes.len() as u64);
    let bytes = m.count("reuseport_worker_bytes_total", &[("worker", "0")])
        + m.count("reuseport_worker_bytes_total", &[("worker", "1")]);
    assert_eq!(bytes, 16 * sizes.iter().sum::<usize>() as u64);
}

#[test]
fn cpu_policy_answers_from_the_worker_of_the_senders_cpu() {
    netns();
    let cpus = cpus_at_least(2, "datagrams from each CPU must reach a different worker");
    let server = udp(&["--policy", "cpu"]);
    let n = cpus.len();
    for (worker, cpu) in cpus.into_iter().enumerate() {
        let before = server.metrics();
        let addr = server.addr;
        thread::spawn(move || {
            pin_to_cpu(cpu);
            let s = udp_socket("127.0.0.1:0".parse().unwrap());
            for i in 0..100 {
                let p = pattern(40, i);
                assert_eq!(udp_exchange_on(&s, addr, &p), p);
            }
        })
        .join()
        .unwrap();
        let after = server.metrics();
        let mut expect = vec![0; n];
        expect[worker] = 100;
        assert_eq!(
            accepted_delta(&before, &after, n),
            expect,
            "datagrams from CPU {cpu}"
        );
        assert_eq!(selected_delta(&before, &after, n), expect);
    }
}

#[test]
fn hash_src_ip_puts_each_client_on_its_predicted_worker() {
    netns();
    let workers = 4;
    let server = udp(&["--policy", "hash", "--workers", "4", "--seed", "77"]);
    let mut used = [0; 4];
    for i in 1..=64 {
        let src = SocketAddr::new(ip(i), 0);
        let w = served_by(&server, src, b"x", workers);
        // The source port is the OS's pick: src-ip ignores it.
        let predicted = hash_addrs(key::SRC_IP, 77, src, server.addr).unwrap() % 4;
        assert_eq!(w, predicted as usize, "client {src}");
        used[w] += 1;
    }
    assert!(used.iter().all(|&n| n > 0), "{used:?}");
}

#[test]
fn round_robin_rotates_datagrams() {
    netns();
    // Each datagram by the policy: without a flow table, which would keep
    // a client port the OS hands out again within the flow timeout on the
    // worker that served it first.
    let server = udp(&[
        "--policy",
        "round-robin",
        "--workers",
        "3",
        "--flow-table-size",
        "0",
    ]);
    let seq: Vec<usize> = (0..30)
        .map(|i| served_by(&server, SocketAddr::new(ip(1), 0), &[i as u8], 3))
        .collect();
    for pair in seq.windows(2) {
        assert_eq!(pair[1], (pair[0] + 1) % 3, "{seq:?}");
    }
}

#[test]
fn weighted_datagram_shares_follow_the_weights() {
    netns();
    let server = udp(&["--policy", "weighted", "--weights", "1,3", "--workers", "2"]);
    let addr = server.addr;
    let clients: Vec<_> = (0..4u64)
        .map(|t| {
            thread::spawn(move || {
                let s = udp_socket("127.0.0.1:0".parse().unwrap());
                for i in 0..2500 {
                    let p = pattern(8, t * 10_000 + i);
                    assert_eq!(udp_exchange_on(&s, addr, &p), p);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // The sequence is fixed (1 then 3 per cycle of 4 tickets) and 10,000
    // datagrams are whole cycles: the counts are exact.
    let m = server.metrics();
    assert_eq!([m.selected(0), m.selected(1)], [2500, 7500]);
    assert_eq!([m.accepted(0), m.accepted(1)], [2500, 7500]);
}

#[test]
fn least_loaded_spreads_idle_work_and_leaves_no_load_behind() {
    netns();
    // Datagrams placed one by one: without a flow table, which would keep
    // this one socket's datagrams (one flow) on one worker.
    let server = udp(&[
        "--policy",
        "least-loaded",
        "--workers",
        "2",
        "--flow-table-size",
        "0",
    ]);
    let s = udp_socket("127.0.0.1:0".parse().unwrap());
    for i in 0..400 {
        let p = pattern(16, i);
        assert_eq!(udp_exchange_on(&s, server.addr, &p), p);
    }
    let m = server.metrics();
    let (a, b) = (m.accepted(0), m.accepted(1));
    assert_eq!(a + b, 400);
    // Every datagram found both workers idle: ties are broken at random.
    assert!(a > 120 && b > 120, "ties shared: {a} / {b}");
    let (code, out, err) = server.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    let loads: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("serving"))
        .map(|l| l.split_whitespace().nth(6).unwrap())
        .collect();
    assert_eq!(
        loads,
        ["0", "0"],
        "each datagram's load was taken away once answered:\n{out}"
    );
}

/// Datagrams with an 8-byte session id at offset 1 (as a QUIC short header).
fn session(id: u64, extra: &[u8]) -> Vec<u8> {
    let mut d = vec![0x40];
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(extra);
    d
}

#[test]
fn a_session_key_in_the_payload_sticks_whatever_the_source_port() {
    netns();
    for policy in ["hash", "consistent"] {
        let server = udp(&[
            "--policy",
            policy,
            "--hash-key",
            "payload:1:8",
            "--workers",
            "4",
        ]);
        let addr = server.addr;
        let before = server.metrics();
        // 1000 datagrams of one session from 50 source ports (a client whose
        // address keeps changing).
        for port in 0..50u64 {
            let s = udp_socket("127.0.0.1:0".parse().unwrap());
            for k in 0..20u64 {
                let d = session(0xfeed_f00d, &pattern(30, port * 100 + k));
                assert_eq!(udp_exchange_on(&s, addr, &d), d);
            }
        }
        let after = server.metrics();
        let delta = accepted_delta(&before, &after, 4);
        assert_eq!(delta.iter().sum::<u64>(), 1000);
        assert_eq!(
            delta.iter().filter(|&&d| d > 0).count(),
            1,
            "{policy}: one session, one worker: {delta:?}"
        );
        // 64 sessions from one socket spread over every worker.
        let before = server.metrics();
        let s = udp_socket("127.0.0.1:0".parse().unwrap());
        for id in 0..64u64 {
            let d = session(id * 7919, b"hello");
            assert_eq!(udp_exchange_on(&s, addr, &d), d);
        }
        let delta = accepted_delta(&before, &server.metrics(), 4);
        assert!(
            delta.iter().all(|&d| d > 0),
            "{policy}: 64 sessions use every worker: {delta:?}"
        );
        assert_eq!(
            server
                .metrics()
                .count("reuseport_bpf_short_payload_total", &[]),
            0
        );
    }
}

#[test]
fn short_and_empty_datagrams_are_echoed_and_counted() {
    netns();
    let server = udp(&["--policy", "hash", "--hash-key", "payload:4:8"]);
    let s = udp_socket("127.0.0.1:0".parse().unwrap());
    let short: Vec<Vec<u8>> = vec![vec![], vec![1], vec![1, 2, 3], pattern(11, 3)];
    for d in &short {
        assert_eq!(
            &udp_exchange_on(&s, server.addr, d),
            d,
            "a {}-byte datagram",
            d.len()
        );
    }
    // Long enough (4 + 8 = 12 bytes): steered by the key, not counted.
    assert_eq!(
        udp_exchange_on(&s, server.addr, &pattern(12, 1)),
        pattern(12, 1)
    );
    let m: Metrics = server.metrics();
    assert_eq!(
        m.count("reuseport_bpf_short_payload_total", &[]),
        short.len() as u64
    );
    assert_eq!(
        m.selected(0) + m.selected(1),
        short.len() as u64 + 1,
        "the program placed every one"
    );
    assert_eq!(m.fallback(), 0);
}

#[test]
fn tcp_and_udp_groups_share_a_port() {
    netns();
    let tcp = Server::start(&["--policy", "cpu"]);
    let port = tcp.addr.to_string();
    let udp = udp(&["--policy", "cpu", "--addr", &port]);
    assert_eq!(udp.addr, tcp.addr);
    let p = pattern(100, 1);
    assert_eq!(reuseport_tests::echo(tcp.addr, &p), p);
    assert_eq!(
        udp_exchange("127.0.0.1:0".parse().unwrap(), udp.addr, &p),
        p
    );
}

#[test]
fn a_payload_key_on_tcp_is_refused() {
    netns();
    let (code, _, err) = reuseport(&[
        "run",
        "--addr",
        "127.0.0.1:0",
        "--policy",
        "hash",
        "--hash-key",
        "payload:0:4",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        "error: --hash-key payload:0:4 needs --proto udp: a TCP SYN carries no payload"
    );
}

#[test]
fn consistent_sessions_mostly_stay_with_a_fifth_worker() {
    netns();
    let four = udp(&[
        "--policy",
        "consistent",
        "--hash-key",
        "payload:1:8",
        "--workers",
        "4",
    ]);
    let five = udp(&[
        "--policy",
        "consistent",
        "--hash-key",
        "payload:1:8",
        "--workers",
        "5",
    ]);
    let place = |server: &Server, n: usize| -> Vec<usize> {
        (0..200u64)
            .map(|id| served_by(server, "127.0.0.1:0".parse().unwrap(), &session(id, b""), n))
            .collect()
    };
    let (p4, p5) = (place(&four, 4), place(&five, 5));
    // Fresh tables of 4 and 5 workers: about a fifth of the sessions differ,
    // nearly all of them to the fifth worker.
    let moved: Vec<usize> = (0..p4.len()).filter(|&i| p4[i] != p5[i]).collect();
    let needless = moved.iter().filter(|&&i| p5[i] != 4).count();
    let share = moved.len() as f64 / 200.0;
    assert!((share - 0.2).abs() < 0.08, "{share}");
    assert!(
        needless <= 8,
        "{needless} sessions moved between old workers"
    );
}
