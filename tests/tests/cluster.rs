//! Beyond one host: two hosts, each serving a `consistent` group, behind an
//! ECMP router, in network namespaces made for the test (`ip netns`,
//! removed at the end, on failure too). The short form of
//! `cargo xtask cluster`.

use std::{thread, time::Duration};

use reuseport_tests::cluster::{compare, Cluster, FrontEnd, Options, Pass};

const HOSTS: usize = 2;
const WORKERS: usize = 3;
const KEYS: usize = 400;

fn two_hosts() -> Cluster {
    Cluster::build(Options {
        hosts: HOSTS,
        workers: WORKERS,
        ecmp_seed: 1,
        binary: reuseport_tests::binary(),
    })
    .expect("building the topology")
}

fn clean(pass: &Pass, what: &str) {
    assert_eq!(pass.failed, 0, "{what}: {:?}", pass.failures);
    assert!(
        pass.placed_by_program,
        "{what}: the program's selections differ from the workers' accepts (or it fell back to the kernel's hash)"
    );
}

#[test]
fn keys_keep_host_and_worker_and_a_drained_worker_moves_only_its_keys() {
    let cluster = two_hosts();
    cluster
        .set_front(FrontEnd::Multipath, &[0, 1], true)
        .expect("the multipath route");

    // Affinity at both levels: every key, twice, on the same host and worker.
    let first = cluster.probe(KEYS).expect("first pass");
    clean(&first, "first pass");
    let per_host = first.per_host(HOSTS);
    assert!(
        per_host.iter().all(|&n| n > 0),
        "the router spreads keys over both hosts: {per_host:?}"
    );
    for h in 0..HOSTS {
        assert!(
            first.per_worker(h).len() > 1,
            "host {h} spreads its keys over its workers: {:?}",
            first.per_worker(h)
        );
    }
    let second = cluster.probe(KEYS).expect("second pass");
    clean(&second, "second pass");
    let m = compare(&first, &second);
    assert_eq!(m.same, KEYS, "every key on the same host and worker: {m:?}");

    // A worker of host 0 drains under a steady load: its keys, and only
    // they, move, each to another worker of the same host; no connection
    // of the load fails.
    let (&worker, &its) = first
        .per_worker(0)
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("host 0 served keys");
    let load = cluster
        .load(4, Duration::from_millis(50))
        .expect("starting the load");
    thread::sleep(Duration::from_millis(300));
    cluster.drain(0, worker).expect("reuseport ctl drain");
    thread::sleep(Duration::from_millis(700));
    let through = load.stop();
    assert!(through.completed > 0, "the load ran: {through:?}");
    assert_eq!(
        (through.failed, through.reset),
        (0, 0),
        "no connection failed through the drain: {through:?}"
    );
    let after = cluster.probe(KEYS).expect("pass after the drain");
    clean(&after, "after the drain");
    let mut moved = 0;
    for (i, (x, y)) in first.placed.iter().zip(&after.placed).enumerate() {
        let (x, y) = (x.expect("placed"), y.expect("placed"));
        if (x.host, x.worker) == (0, worker) {
            assert_eq!(y.host, 0, "key {i} stays on its host");
            assert_ne!(y.worker, worker, "key {i} left the drained worker");
            moved += 1;
        } else {
            assert_eq!(x, y, "key {i} was not the drained worker's: it stays");
        }
    }
    assert_eq!(moved, its);
}

#[test]
fn a_host_leaving_a_resilient_group_moves_only_its_keys() {
    let front = FrontEnd::Resilient { buckets: 64 };
    let three = Cluster::build(Options {
        hosts: 3,
        workers: 2,
        ecmp_seed: 1,
        binary: reuseport_tests::binary(),
    })
    .expect("building the three-host topology");
    three
        .resilient_available()
        .expect("resilient nexthop groups (Linux 5.13)");
    three.set_front(front, &[0, 1, 2], true).expect("the group");
    let before = three.probe(KEYS).expect("before");
    clean(&before, "before");
    let gone = 1;
    three
        .set_front(front, &[0, 2], false)
        .expect("ip nexthop replace without host 1");
    let after = three.probe(KEYS).expect("after");
    clean(&after, "after");
    for (i, (x, y)) in before.placed.iter().zip(&after.placed).enumerate() {
        let (x, y) = (x.expect("placed"), y.expect("placed"));
        if x.host == gone {
            assert_ne!(y.host, gone, "key {i} left the host that left");
        } else {
            assert_eq!(x, y, "key {i} stays on its host and worker");
        }
    }
    assert!(before.per_host(3)[gone] > 0, "host {gone} had keys");
}
