//! Groups past the old limits (64 workers, a 256-entry CPU table), and a
//! plan far behind its workers: the program's probes are capped, and what
//! it cannot place is counted.

use std::thread;

use reuseport_common::{MAX_WORKERS, PROBES};
use reuseport_tests::{cpus, echo, empty_slot, netns, pattern, pin_to_cpu, selected_delta, Server};

/// The largest group, [`MAX_WORKERS`] workers, under round robin: each
/// takes exactly its turn, so a group that large is steered by the
/// program and only by it.
#[test]
fn the_largest_group_takes_its_turns() {
    netns();
    let workers = MAX_WORKERS as usize;
    let arg = workers.to_string();
    let server = Server::start(&["--policy", "round-robin", "--workers", &arg]);
    let before = server.metrics();
    let addr = server.addr;
    // Two clients, one round each.
    let clients: Vec<_> = (0..2u64)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..workers as u64 {
                    let p = pattern(8, t * 10_000 + i);
                    assert_eq!(echo(addr, &p), p);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let after = server.metrics();
    let sel = selected_delta(&before, &after, workers);
    assert!(sel.iter().all(|&n| n == 2), "every worker twice: {sel:?}");
    assert_eq!(after.fallback(), 0);
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");
}

/// 300 workers under `cpu` (more than the old 256-entry table): every
/// connection from a CPU goes to that CPU's workers.
#[test]
fn three_hundred_workers_under_cpu_stay_on_their_cpu() {
    netns();
    let cpus = cpus();
    let workers = 300;
    let server = Server::start(&["--policy", "cpu", "--workers", "300"]);
    let addr = server.addr;
    for (i, cpu) in cpus.iter().copied().enumerate() {
        let before = server.metrics();
        thread::spawn(move || {
            pin_to_cpu(cpu);
            for k in 0..50u64 {
                let p = pattern(8, k);
                assert_eq!(echo(addr, &p), p);
            }
        })
        .join()
        .unwrap();
        let after = server.metrics();
        let sel = selected_delta(&before, &after, workers);
        assert_eq!(sel.iter().sum::<u64>(), 50, "CPU {cpu}");
        // Worker w is on usable CPU number w mod |cpus|.
        for (w, n) in sel.iter().enumerate() {
            if *n > 0 {
                assert_eq!(w % cpus.len(), i, "worker {w} is not on CPU {cpu}: {sel:?}");
            }
        }
        assert_eq!(after.fallback(), 0);
    }
}

/// A plan that still lists 8 live slots when only slots 0 and 7 hold a
/// socket (6 emptied behind the control plane's back, as a crash leaves
/// them until the plan is rebuilt). Round robin's first choices walk the
/// live list; after an empty one the program probes at most [`PROBES`]
/// further live slots (here the next 4, as 8 slots are too few to spread
/// them), then leaves the connection to the kernel's hash and counts it.
/// So of every 8 tickets: 1 to slot 0, 5 to slot 7 (found by probes from
/// tickets 3 to 6), 2 fallbacks (tickets 1 and 2 see 5 empty slots each),
/// and 20 empty picks counted.
#[test]
fn a_stale_plan_costs_a_few_probes_and_what_is_left_is_counted() {
    assert_eq!(PROBES, 4, "the expected counts below assume 4 probes");
    netns();
    let workers = 8;
    let server = Server::start(&["--policy", "round-robin", "--workers", "8"]);
    for slot in 1..=6 {
        empty_slot(&server.group, slot);
    }
    let before = server.metrics();
    let rounds = 10;
    for i in 0..8 * rounds {
        let p = pattern(8, i);
        assert_eq!(echo(server.addr, &p), p, "every connection is served");
    }
    let after = server.metrics();
    let sel = selected_delta(&before, &after, workers);
    assert_eq!(
        sel,
        [rounds, 0, 0, 0, 0, 0, 0, 5 * rounds],
        "first choices and probes"
    );
    assert_eq!(after.fallback() - before.fallback(), 2 * rounds);
    assert_eq!(after.empty_slot() - before.empty_slot(), 20 * rounds);
}
