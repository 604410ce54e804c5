//! `round-robin-per-cpu`: each CPU deals its connections to the workers
//! in turn from a ticket of its own (no cache line shared between CPUs).
//! Each CPU's turn is exact; the totals are within one per CPU that sent,
//! not within one as under `round-robin`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
};

use reuseport_tests::{
    accepted_delta, assert_placed_by_program, cpus, cpus_at_least, netns, pattern, pin_to_cpu,
    selected_delta, tcp_once, Server,
};

/// `n` connections one after the other from a thread pinned to `cpu`
/// (on loopback the SYN is processed on the sender's CPU); returns the
/// worker that served each.
fn sequence_from(server: &Server, cpu: usize, n: u32, workers: usize) -> Vec<usize> {
    let addr = server.addr;
    // One thread pinned for the whole sequence; the metrics are read
    // between connections from this thread too.
    thread::scope(|s| {
        s.spawn(|| {
            pin_to_cpu(cpu);
            (0..n)
                .map(|i| {
                    let src =
                        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 20, 0, 1 + i as u8)), 0);
                    server
                        .served_by(workers, || tcp_once(src, addr, &pattern(16, u64::from(i))))
                        .0
                })
                .collect()
        })
        .join()
        .expect("the client thread")
    })
}

/// The worker of CPU `cpu`'s `k`-th connection (from 1) in a new group of
/// `workers`: the CPU's ticket counts from 0 and is taken before use, and
/// its offset is the CPU's number.
fn predicted(cpu: usize, k: u32, workers: usize) -> usize {
    (k as usize + cpu) % workers
}

#[test]
fn each_cpu_deals_its_connections_in_turn_from_its_own_offset() {
    netns();
    let workers = 3;
    let server = Server::start(&["--policy", "round-robin-per-cpu", "--workers", "3"]);
    let cpus = cpus();
    let before = server.metrics();
    let mut want = vec![0u64; workers];
    for &cpu in &cpus {
        let seq = sequence_from(&server, cpu, 12, workers);
        let expected: Vec<usize> = (1..=12).map(|k| predicted(cpu, k, workers)).collect();
        assert_eq!(seq, expected, "from CPU {cpu}");
        for w in seq {
            want[w] += 1;
        }
    }
    let after = server.metrics();
    let sel = selected_delta(&before, &after, workers);
    let acc = accepted_delta(&before, &after, workers);
    assert_eq!(acc, want);
    // The program placed them, not the kernel's hash.
    assert_placed_by_program(&sel, &acc, "connections from every CPU");
    assert_eq!(after.fallback(), before.fallback(), "no fallback");
}

#[test]
fn the_totals_are_not_exact_round_robin() {
    netns();
    let cpus = cpus_at_least(2, "two CPUs taking tickets of their own");
    let workers = 3;
    let server = Server::start(&["--policy", "round-robin-per-cpu", "--workers", "3"]);
    let before = server.metrics();
    // Two connections from one CPU, one from another: each CPU deals from
    // its own offset, so (for CPUs 0 and 1) worker 2 gets two and worker 0
    // none, where the shared ticket of `round-robin` gives each one.
    let a = sequence_from(&server, cpus[0], 2, workers);
    let b = sequence_from(&server, cpus[1], 1, workers);
    assert_eq!(
        a,
        [
            predicted(cpus[0], 1, workers),
            predicted(cpus[0], 2, workers)
        ]
    );
    assert_eq!(b, [predicted(cpus[1], 1, workers)]);
    let after = server.metrics();
    let acc = accepted_delta(&before, &after, workers);
    let mut want = vec![0u64; workers];
    for w in a.iter().chain(&b) {
        want[*w] += 1;
    }
    assert_eq!(acc, want);
    if cpus[..2] == [0, 1] {
        assert_eq!(acc, [0, 1, 2], "max - min is 2, not 1");
    }
}
