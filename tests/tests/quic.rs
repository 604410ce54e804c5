//! Cookies and QUIC: `--hash-key cookie:OFFSET` sends a datagram to the
//! socket whose cookie it carries, `--hash-key quic` reads QUIC headers,
//! and the `quic_echo` example keeps its connections through a drain, an
//! added worker and a client that changes its port (with the kernel's own
//! hash for comparison).

use std::time::Duration;

use reuseport::{Control, SlotState};
use reuseport_common::hash::hash_dcid;
use reuseport_tests::{
    any_local, cpus, eventually, netns, pattern,
    quic::{self, packet, Fleet, QuicEcho},
    udp_exchange, udp_socket, Metrics, Server,
};

/// Workers of the groups here: at least 3, so that one can drain while
/// two still serve; one per CPU on larger machines.
fn workers() -> usize {
    cpus().len().max(3)
}

fn selected(m: &Metrics, slot: usize) -> u64 {
    m.get(
        "reuseport_bpf_selected_total",
        &[("slot", &slot.to_string())],
    )
    .unwrap_or(0.0) as u64
}

fn selected_delta(before: &Metrics, after: &Metrics, slots: usize) -> Vec<u64> {
    (0..slots)
        .map(|s| selected(after, s) - selected(before, s))
        .collect()
}

fn counter(m: &Metrics, name: &str) -> u64 {
    m.count(&format!("reuseport_bpf_{name}_total"), &[])
}

fn delta(before: &Metrics, after: &Metrics, name: &str) -> u64 {
    counter(after, name) - counter(before, name)
}

fn udp_group(key: &str) -> Server {
    Server::start(&[
        "--proto",
        "udp",
        "--workers",
        &workers().to_string(),
        "--policy",
        "hash",
        "--hash-key",
        key,
    ])
}

/// A payload with `cookie` at offset 4, as `cookie:4` reads it.
fn with_cookie(cookie: &[u8], seed: u64) -> Vec<u8> {
    let mut p = b"HEAD".to_vec();
    p.extend_from_slice(cookie);
    p.extend(pattern(24, seed));
    p
}

fn slot_state(group: &str, slot: u32) -> SlotState {
    let status = Control::open(Some(group))
        .and_then(|c| c.status())
        .expect("ctl status");
    status
        .slots
        .iter()
        .find(|s| s.slot == slot)
        .map_or(SlotState::Empty, |s| s.state())
}

#[test]
fn a_minted_cookie_reaches_its_worker_from_any_source_port() {
    netns();
    let n = workers();
    let s = udp_group("cookie:4");
    let control = Control::open(Some(&s.group)).unwrap();
    for slot in 0..n {
        let cookie = control.cookie_minter(slot as u32).unwrap().mint();
        let before = s.metrics();
        for i in 0..10 {
            // Each from a socket of its own: another source port.
            let p = with_cookie(&cookie, i);
            assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
        }
        let after = s.metrics();
        let mut expect = vec![0; n];
        expect[slot] = 10;
        assert_eq!(selected_delta(&before, &after, n), expect, "slot {slot}");
        assert_eq!(delta(&before, &after, "cookie_ok"), 10);
        assert_eq!(delta(&before, &after, "cookie_bad"), 0);
        assert_eq!(after.fallback(), before.fallback());
    }
    // `reuseport stats` shows the same stage counters.
    let (code, out, err) = reuseport_tests::reuseport(&["stats", "--group", &s.group]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("udp: cookie ok {}, bad 0, old 0;", 10 * n)),
        "{out}"
    );
    assert!(out.contains("quic initial 0, unreadable 0"), "{out}");
}

#[test]
fn datagrams_without_a_valid_cookie_go_by_the_policy_and_count_bad() {
    netns();
    let n = workers();
    let s = udp_group("cookie:4");
    let before = s.metrics();
    for i in 0..40 {
        // 8 bytes that are no cookie of this group's.
        let p = with_cookie(&pattern(8, 1000 + i), i);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    let sel = selected_delta(&before, &after, n);
    assert_eq!(delta(&before, &after, "cookie_bad"), 40);
    assert_eq!(delta(&before, &after, "cookie_ok"), 0);
    assert_eq!(sel.iter().sum::<u64>(), 40, "the program placed them all");
    // The policy hashes the kernel's flow hash of each 4-tuple.
    assert!(
        sel.iter().filter(|&&c| c > 0).count() >= 2,
        "40 source ports spread over the workers: {sel:?}"
    );
    // Too short to hold a cookie at offset 4: still served.
    let before = s.metrics();
    assert_eq!(udp_exchange(any_local(s.addr), s.addr, b"abc"), b"abc");
    let after = s.metrics();
    assert_eq!(delta(&before, &after, "short_payload"), 1);
    assert_eq!(
        selected_delta(&before, &after, n).iter().sum::<u64>(),
        1,
        "placed by the program"
    );
}

#[test]
fn a_cookie_of_a_drained_or_replaced_socket_counts_old_and_goes_by_the_policy() {
    netns();
    let n = workers();
    let s = udp_group("cookie:4");
    let control = Control::open(Some(&s.group)).unwrap();
    let old = control.cookie_minter(1).unwrap();
    let p = with_cookie(&old.mint(), 1);
    assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);

    let (code, out, err) = s.ctl(&["drain", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        eventually(Duration::from_secs(10), || slot_state(&s.group, 1)
            == SlotState::Empty),
        "worker 1 drained and closed"
    );
    let before = s.metrics();
    for i in 0..10 {
        let p = with_cookie(&old.mint(), i);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    assert_eq!(
        delta(&before, &after, "cookie_old"),
        10,
        "its socket is gone"
    );
    assert_eq!(delta(&before, &after, "cookie_ok"), 0);
    let sel = selected_delta(&before, &after, n);
    assert_eq!(sel.iter().sum::<u64>(), 10, "placed by the policy: {sel:?}");
    assert_eq!(sel[1], 0, "not to the empty slot");

    // A new worker takes the free slot 1 with a new socket: the old
    // cookie still names the old one.
    let (code, out, err) = s.ctl(&["add-worker"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        eventually(Duration::from_secs(10), || slot_state(&s.group, 1)
            == SlotState::Serving),
        "a new worker in slot 1"
    );
    let new = control.cookie_minter(1).unwrap();
    assert_ne!(new.cookie().generation, old.cookie().generation);
    let before = s.metrics();
    for i in 0..5 {
        let p = with_cookie(&old.mint(), i);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let mid = s.metrics();
    assert_eq!(delta(&before, &mid, "cookie_old"), 5, "another generation");
    for i in 0..5 {
        let p = with_cookie(&new.mint(), i);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    assert_eq!(delta(&mid, &after, "cookie_ok"), 5);
    assert_eq!(selected_delta(&mid, &after, n)[1], 5);
}

#[test]
fn quic_initials_of_one_connection_id_reach_one_worker_from_any_port() {
    netns();
    let n = workers();
    let s = udp_group("quic");
    let dcid = *b"client!!";
    // `hash` over the live slots 0..n, seed 0, on the DCID's hash.
    let expect_slot = (hash_dcid(0, &dcid) % n as u32) as usize;
    let before = s.metrics();
    for _ in 0..20 {
        let p = packet::initial(&dcid);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    // 0-RTT of the same handshake, and a version 2 Initial (type bits 01).
    for p in [
        packet::long(packet::V1, 1, &dcid, 100),
        packet::long(packet::V2, 1, &dcid, 100),
    ] {
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    let mut expect = vec![0; n];
    expect[expect_slot] = 22;
    assert_eq!(selected_delta(&before, &after, n), expect);
    assert_eq!(delta(&before, &after, "quic_initial"), 22);
    assert_eq!(delta(&before, &after, "quic_unreadable"), 0);

    // Other connection IDs from one source port: the ID decides, not the
    // 4-tuple.
    let one = udp_socket(any_local(s.addr));
    let before = s.metrics();
    for i in 0..32u64 {
        let id = pattern(16, 77 + i);
        let p = packet::initial(&id);
        assert_eq!(reuseport_tests::udp_exchange_on(&one, s.addr, &p), p);
    }
    let after = s.metrics();
    let sel = selected_delta(&before, &after, n);
    assert!(
        sel.iter().filter(|&&c| c > 0).count() >= 2,
        "32 connection IDs from one port spread: {sel:?}"
    );
    assert_eq!(delta(&before, &after, "quic_initial"), 32);
}

/// Under a policy that does not hash (round robin here), a client that
/// sends its Initial again (no answer yet: a slow or lossy path) must reach
/// the worker that has its handshake, not the next one in turn: the flow
/// table remembers where the first Initial of the 4-tuple went.
#[test]
fn a_resent_initial_reaches_the_worker_of_its_handshake_under_round_robin() {
    netns();
    let n = workers();
    let s = Server::start(&[
        "--proto",
        "udp",
        "--workers",
        &n.to_string(),
        "--policy",
        "round-robin",
        "--hash-key",
        "quic",
    ]);
    let dcid = *b"resend!!";
    let client = udp_socket(any_local(s.addr));
    let before = s.metrics();
    for _ in 0..6 {
        let p = packet::initial(&dcid);
        assert_eq!(reuseport_tests::udp_exchange_on(&client, s.addr, &p), p);
    }
    let after = s.metrics();
    let sel = selected_delta(&before, &after, n);
    assert_eq!(sel.iter().sum::<u64>(), 6, "{sel:?}");
    assert_eq!(
        sel.iter().filter(|&&c| c > 0).count(),
        1,
        "one worker has the handshake: {sel:?}"
    );
    assert_eq!(delta(&before, &after, "quic_initial"), 6);
    assert_eq!(delta(&before, &after, "flow_hit"), 5, "remembered");
    // New clients (their own ports) still go round the workers.
    let before = s.metrics();
    for i in 0..n as u64 {
        let p = packet::initial(&pattern(8, 500 + i));
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    assert_eq!(
        selected_delta(&before, &after, n),
        vec![1; n],
        "round robin"
    );
}

#[test]
fn quic_packets_with_a_cookie_reach_its_worker() {
    netns();
    let n = workers();
    let s = udp_group("quic");
    let control = Control::open(Some(&s.group)).unwrap();
    for slot in 0..n {
        let mut dcid = control.cookie_minter(slot as u32).unwrap().mint().to_vec();
        dcid.extend(pattern(8, slot as u64));
        let before = s.metrics();
        for i in 0..5 {
            let p = packet::short(&dcid, 40 + i);
            assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
        }
        // A Handshake packet (v1 type 2, v2 type 3) carries the server's
        // ID too.
        for p in [
            packet::long(packet::V1, 2, &dcid, 60),
            packet::long(packet::V2, 3, &dcid, 60),
        ] {
            assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
        }
        let after = s.metrics();
        let mut expect = vec![0; n];
        expect[slot] = 7;
        assert_eq!(selected_delta(&before, &after, n), expect, "slot {slot}");
        assert_eq!(delta(&before, &after, "cookie_ok"), 7);
    }
    // A short header whose ID is no cookie: by the policy, on the ID's hash.
    let id = pattern(16, 5);
    let expect_slot = (hash_dcid(0, &id[..8].try_into().unwrap()) % n as u32) as usize;
    let before = s.metrics();
    for _ in 0..5 {
        let p = packet::short(&id, 30);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    assert_eq!(delta(&before, &after, "cookie_bad"), 5);
    assert_eq!(selected_delta(&before, &after, n)[expect_slot], 5);
}

#[test]
fn unreadable_quic_datagrams_are_counted_and_still_served() {
    netns();
    let n = workers();
    let s = udp_group("quic");
    let dcid = *b"whatever";
    let odd: Vec<Vec<u8>> = vec![
        packet::version_negotiation(&dcid),
        b"abc".to_vec(),
        // An Initial whose ID is shorter than RFC 9000 allows (8 bytes).
        packet::long(packet::V1, 0, b"abcd", 1200),
        // A version this program does not know.
        packet::long(0x0a0a_0a0a, 0, &dcid, 1200),
        // A Retry: servers send those, not clients.
        packet::long(packet::V1, 3, &dcid, 40),
    ];
    let before = s.metrics();
    for p in &odd {
        assert_eq!(&udp_exchange(any_local(s.addr), s.addr, p), p, "echoed");
    }
    let after = s.metrics();
    assert_eq!(delta(&before, &after, "quic_unreadable"), odd.len() as u64);
    assert_eq!(
        selected_delta(&before, &after, n).iter().sum::<u64>(),
        odd.len() as u64,
        "placed by the program's policy, never dropped"
    );
    assert_eq!(after.fallback(), before.fallback());
    assert_eq!(delta(&before, &after, "dropped"), 0);
}

/// Workers of the QUIC example in the churn runs.
const QUIC_WORKERS: usize = 3;
/// Concurrent connections of the churn runs.
const CONNECTIONS: usize = 200;

/// 200 connections with streams in flight; a drain of the worker that
/// holds the most, then an added worker, while they run. Returns what the
/// clients saw and the metrics before the drain, after it and at the end.
struct Churn {
    result: quic::FleetResult,
    drained: usize,
    added: usize,
    /// Before the drain, after it, at the end.
    metrics: [Metrics; 3],
    echo: QuicEcho,
}

fn churn(policy: &str) -> Churn {
    let echo = QuicEcho::start(&[
        "--workers",
        &QUIC_WORKERS.to_string(),
        "--policy",
        policy,
        "--drain-timeout",
        "30",
    ]);
    let config = quic::client_config(&echo.cert);
    let fleet = Fleet::start(
        echo.addr(),
        config,
        CONNECTIONS,
        600,
        Duration::from_millis(300),
    );
    assert_eq!(
        fleet.connected(),
        CONNECTIONS as u64,
        "every connection established before the changes; failed: {:?}",
        fleet.connect_failures()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let m0 = echo.server.metrics();
    let busiest = (0..QUIC_WORKERS)
        .max_by_key(|&w| m0.active(w))
        .expect("workers") as u32;
    let (code, out, err) = echo.server.ctl(&["drain", &busiest.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(1500));
    let m1 = echo.server.metrics();
    let (code, out, err) = echo.server.ctl(&["add-worker"]);
    assert_eq!(code, 0, "{out}{err}");
    // "group G: worker SLOT added on CPU C"
    let added = out
        .split_whitespace()
        .skip_while(|w| *w != "worker")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("the new worker's slot in {out:?}"));
    std::thread::sleep(Duration::from_millis(1500));
    fleet.mark();
    // Every connection echoes again after the changes (a broken one never
    // does: the kernel's run waits the whole time).
    let all =
        fleet.wait_all_since_mark(Duration::from_secs(if policy == "kernel" { 4 } else { 30 }));
    let result = fleet.stop();
    assert_eq!(
        all,
        result.since_mark.iter().all(|&n| n > 0),
        "the fleet's two views agree"
    );
    let m2 = echo.server.metrics();
    Churn {
        result,
        drained: busiest as usize,
        added,
        metrics: [m0, m1, m2],
        echo,
    }
}

#[test]
fn quic_connections_survive_a_drain_and_an_added_worker() {
    netns();
    let Churn {
        result: r,
        drained,
        added,
        metrics: [m0, m1, m2],
        echo,
    } = churn("hash");
    eprintln!(
        "quic policy: {} connections, {} broken, {} streams",
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
        "connections that echoed nothing after the changes: {stalled:?}"
    );
    // The program placed them by their cookies, the drained worker's
    // included, whose socket no policy chooses any more.
    assert!(delta(&m0, &m2, "cookie_ok") > 0);
    assert!(
        selected(&m2, drained) > selected(&m1, drained),
        "the drained worker's connections still reached it"
    );
    assert!(m0.active(drained) > 0, "it held connections");
    assert_eq!(m2.fallback(), m0.fallback(), "no run left to the kernel");
    // Its connections closed by their clients, the drained worker ends and
    // frees its slot.
    assert!(
        eventually(Duration::from_secs(20), || slot_state(
            &echo.server.group,
            drained as u32
        ) == SlotState::Empty),
        "worker {drained} finished draining"
    );

    // New connections go to the live workers, the added one among them.
    let config = quic::client_config(&echo.cert);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = echo.addr();
    let before = echo.server.metrics();
    let fresh = rt.block_on(quic::fresh_connections(&config, addr, 30));
    assert!(fresh.iter().all(Result::is_ok), "{fresh:?}");
    let after = echo.server.metrics();
    let accepted = |m: &Metrics, w: usize| {
        m.get(
            "reuseport_worker_accepted_total",
            &[("worker", &w.to_string())],
        )
        .unwrap_or(0.0) as u64
    };
    let got = |w: usize| accepted(&after, w) - accepted(&before, w);
    assert!(
        got(added) > 0,
        "the added worker {added} took new connections"
    );
    assert_eq!(got(drained), 0, "none for the draining worker {drained}");
    assert!(delta(&before, &after, "quic_initial") >= 30);
    drop(echo);
}

#[test]
fn the_kernel_policy_breaks_quic_connections_across_the_same_changes() {
    netns();
    let r = churn("kernel").result;
    // The comparison, not a requirement: the kernel's hash moves the
    // flows of every worker when one joins, and their packets reach
    // endpoints that do not know them.
    eprintln!(
        "kernel policy: {} connections, {} broken, {} streams; first: {:?}",
        r.connected,
        r.broken.len(),
        r.streams,
        r.broken.first()
    );
    assert_eq!(r.connected, CONNECTIONS, "the run itself worked");
}

#[test]
fn a_client_that_changes_its_port_keeps_its_worker_and_its_connection() {
    netns();
    let echo = QuicEcho::start(&["--workers", &QUIC_WORKERS.to_string()]);
    let config = quic::client_config(&echo.cert);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = echo.addr();
    rt.block_on(async {
        let ep = quic::client_endpoint(&config);
        let conn = quic::connect(&ep, addr).await.unwrap();
        quic::echo_stream(&conn, b"hello").await.unwrap();
        let m = echo.server.metrics();
        let worker = (0..QUIC_WORKERS)
            .find(|&w| m.active(w) == 1)
            .expect("one worker holds the connection");
        let before = echo.server.metrics();
        let mut ports = vec![ep.local_addr().unwrap().port()];
        for i in 0..8u64 {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            ep.rebind(socket).expect("rebind");
            let port = ep.local_addr().unwrap().port();
            assert!(!ports.contains(&port));
            ports.push(port);
            for j in 0..3 {
                quic::echo_stream(&conn, &pattern(300, i * 10 + j))
                    .await
                    .unwrap_or_else(|e| panic!("after rebind {i} to port {port}: {e}"));
            }
        }
        assert!(conn.close_reason().is_none(), "the same connection");
        let after = echo.server.metrics();
        let sel = selected_delta(&before, &after, QUIC_WORKERS);
        let mut only = vec![0; QUIC_WORKERS];
        only[worker] = sel[worker];
        assert_eq!(sel, only, "every packet to worker {worker}");
        assert!(delta(&before, &after, "cookie_ok") >= 24);
        assert_eq!(after.active(worker), 1);
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    });
}

#[test]
fn cookie_and_quic_keys_on_tcp_are_refused_with_one_line() {
    netns();
    for key in ["quic", "cookie:0"] {
        // Under any policy: these keys steer before the policy runs.
        for policy in ["round-robin", "hash"] {
            let f = match Server::try_start(&["--hash-key", key, "--policy", policy]) {
                Ok(_) => panic!("--hash-key {key} on TCP must be refused"),
                Err(f) => f,
            };
            assert_eq!(f.status.code(), Some(1));
            assert!(
                f.stderr.contains(&format!(
                    "error: --hash-key {key} needs --proto udp: a TCP SYN carries no payload"
                )),
                "{}",
                f.stderr
            );
            assert!(!f.stderr.contains("panicked"));
        }
    }
}

#[test]
fn a_takeover_keeps_the_cookie_secret_and_its_new_sockets_get_new_cookies() {
    netns();
    let n = workers();
    let old = udp_group("cookie:4");
    let minters: Vec<_> = {
        let control = Control::open(Some(&old.group)).unwrap();
        (0..n as u32)
            .map(|slot| control.cookie_minter(slot).unwrap())
            .collect()
    };
    let next = Server::try_start(&[
        "--proto",
        "udp",
        "--takeover",
        &old.group,
        "--workers",
        &n.to_string(),
    ])
    .unwrap_or_else(|f| panic!("the takeover failed: {}", f.stderr));
    // The old owner's sockets were carried into their slots, draining;
    // its echo workers keep no flows under a cookie key: they close at
    // once, and the old process exits.
    let (status, stderr) = old.wait(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    let control = Control::open(Some(&next.group)).unwrap();
    let serving: Vec<u32> = control
        .status()
        .unwrap()
        .slots
        .iter()
        .filter(|s| s.state() == SlotState::Serving)
        .map(|s| s.slot)
        .collect();
    assert_eq!(serving.len(), n, "the successor's own workers");
    assert!(
        serving.iter().all(|&s| s >= n as u32),
        "in the slots the carried sockets left free: {serving:?}"
    );
    let before = next.metrics();
    for (slot, was) in minters.iter().enumerate() {
        let now = control.cookie_minter(slot as u32).unwrap();
        assert_eq!(
            now.read(&was.mint()),
            Some(was.cookie()),
            "the successor reads the old group's cookies (same secret)"
        );
        // The old socket is gone: its cookie counts old.
        let p = with_cookie(&was.mint(), slot as u64);
        assert_eq!(udp_exchange(any_local(next.addr), next.addr, &p), p);
    }
    for &slot in &serving {
        let now = control.cookie_minter(slot).unwrap();
        assert!(
            minters.iter().all(|was| was.cookie() != now.cookie()),
            "slot {slot}: a new socket, a cookie of its own"
        );
        let p = with_cookie(&now.mint(), u64::from(slot));
        assert_eq!(udp_exchange(any_local(next.addr), next.addr, &p), p);
    }
    let after = next.metrics();
    assert_eq!(delta(&before, &after, "cookie_old"), n as u64);
    assert_eq!(delta(&before, &after, "cookie_ok"), n as u64);
    for &slot in &serving {
        assert!(
            selected(&after, slot as usize) > selected(&before, slot as usize),
            "slot {slot}'s cookie reached it"
        );
    }
}

#[test]
fn a_quic_echo_successor_serves_new_connections_with_the_same_certificate() {
    netns();
    let first = QuicEcho::start(&["--workers", "2"]);
    let next = first.take_over(&["--workers", "2"]);
    assert_eq!(
        next.addr(),
        first.addr(),
        "the successor serves the address"
    );
    let config = quic::client_config(&first.cert);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = next.server.metrics();
    rt.block_on(async {
        for i in 0..5u64 {
            let ep = quic::client_endpoint(&config);
            let conn = quic::connect(&ep, next.addr()).await.unwrap();
            quic::echo_stream(&conn, &pattern(64, i)).await.unwrap();
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
        }
    });
    let after = next.server.metrics();
    // At least one each (a client re-sends its first Initial if the
    // answer is slow).
    assert!(delta(&before, &after, "quic_initial") >= 5);
    // The successor's own workers took them: its slots are those the old
    // process's sockets (carried into the new generation, draining) left
    // free, so count every slot of its metrics.
    let all = |m: &Metrics| -> u64 {
        m.0.iter()
            .filter(|(k, _)| k.starts_with("reuseport_worker_accepted_total{"))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    assert_eq!(
        all(&after) - all(&before),
        5,
        "the successor's workers took them"
    );
}

#[test]
fn quic_cookies_and_initials_steer_over_ipv6_too() {
    netns();
    let n = workers();
    let s = Server::start(&[
        "--addr",
        "[::1]:0",
        "--proto",
        "udp",
        "--workers",
        &n.to_string(),
        "--policy",
        "hash",
        "--hash-key",
        "quic",
    ]);
    let control = Control::open(Some(&s.group)).unwrap();
    let slot = n - 1;
    let mut dcid = control.cookie_minter(slot as u32).unwrap().mint().to_vec();
    dcid.extend(pattern(8, 9));
    let before = s.metrics();
    for i in 0..5 {
        let p = packet::short(&dcid, 20 + i);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let initial_id = *b"v6client";
    for _ in 0..5 {
        let p = packet::initial(&initial_id);
        assert_eq!(udp_exchange(any_local(s.addr), s.addr, &p), p);
    }
    let after = s.metrics();
    let mut expect = vec![0; n];
    expect[slot] += 5;
    expect[(hash_dcid(0, &initial_id) % n as u32) as usize] += 5;
    assert_eq!(selected_delta(&before, &after, n), expect);
    assert_eq!(delta(&before, &after, "cookie_ok"), 5);
    assert_eq!(delta(&before, &after, "quic_initial"), 5);
}

#[test]
fn each_group_has_its_own_cookie_secret_and_keeps_it_across_policy_switches() {
    netns();
    let n = workers();
    let a = udp_group("cookie:4");
    let b = udp_group("cookie:4");
    let ma = Control::open(Some(&a.group))
        .unwrap()
        .cookie_minter(0)
        .unwrap();
    let mb = Control::open(Some(&b.group))
        .unwrap()
        .cookie_minter(0)
        .unwrap();
    assert_eq!(ma.cookie(), mb.cookie(), "slot 0, first socket, in both");
    assert_eq!(mb.read(&ma.mint()), None, "another group's secret");

    // The plan is rebuilt from scratch at every switch; the secret stays.
    a.switch(&["round-robin"]);
    a.switch(&["consistent", "--seed", "9"]);
    let before = a.metrics();
    for i in 0..5 {
        let p = with_cookie(&ma.mint(), i);
        assert_eq!(udp_exchange(any_local(a.addr), a.addr, &p), p);
    }
    let after = a.metrics();
    assert_eq!(delta(&before, &after, "cookie_ok"), 5);
    assert_eq!(selected_delta(&before, &after, n)[0], 5);
}

#[test]
fn least_loaded_places_quic_connections_by_the_flows_each_worker_holds() {
    netns();
    let echo = QuicEcho::start(&[
        "--workers",
        &QUIC_WORKERS.to_string(),
        "--policy",
        "least-loaded",
    ]);
    let config = quic::client_config(&echo.cert);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let per = 8;
    let held = rt.block_on(async {
        let mut held = Vec::new();
        // One after another, each held open: each new one goes to a
        // worker holding the fewest.
        for i in 0..(per * QUIC_WORKERS) as u64 {
            let ep = quic::client_endpoint(&config);
            let conn = quic::connect(&ep, echo.addr()).await.unwrap();
            quic::echo_stream(&conn, &pattern(32, i)).await.unwrap();
            held.push((ep, conn));
        }
        held
    });
    let m = echo.server.metrics();
    let active: Vec<u64> = (0..QUIC_WORKERS).map(|w| m.active(w)).collect();
    assert_eq!(active, vec![per as u64; QUIC_WORKERS], "even by open flows");
    // The load the program compares follows the flows.
    let load =
        |m: &Metrics, w: usize| m.count("reuseport_worker_load", &[("worker", &w.to_string())]);
    assert!(
        eventually(Duration::from_secs(5), || {
            let m = echo.server.metrics();
            (0..QUIC_WORKERS).all(|w| load(&m, w) == per as u64)
        }),
        "load per worker = its open flows"
    );
    rt.block_on(async {
        for (ep, conn) in held {
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
        }
    });
    assert!(
        eventually(Duration::from_secs(10), || {
            let m = echo.server.metrics();
            (0..QUIC_WORKERS).all(|w| m.active(w) == 0 && load(&m, w) == 0)
        }),
        "closed flows leave no load"
    );
}
