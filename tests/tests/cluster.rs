//! Beyond one host: two hosts, each serving a `consistent` group, behind an
//! ECMP router, in network namespaces made for the test (`ip netns`,
//! removed at the end, on failure too). The short form of
//! `cargo xtask cluster`.

use std::{thread, time::Duration};

use reuseport_tests::cluster::{compare, Cluster, FrontEnd, Options, Pass};

const HOSTS: usize = 2;
const WORKERS: usize = 3;
const KEYS: usize = 400;

/// Keys of the IPVS form: [`KEYS`], or `REUSEPORT_CLUSTER_KEYS` for a full
/// measurement (`cargo xtask vm-test` passes it into the VM).
fn ipvs_keys() -> usize {
    std::env::var("REUSEPORT_CLUSTER_KEYS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(KEYS)
}

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
        "{what}: the program's selections differ from the workers' accepts (or it fell back to the kernel's hash): {:?}",
        pass.program_mismatch
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

/// IPVS with the Maglev scheduler (`mh`) in front of three hosts. Where the
/// kernel has IPVS (Debian's kernels, as modules: the VM cells of
/// `cargo xtask vm-test` load them and set `REUSEPORT_EXPECT_IPVS=1`), every
/// key keeps its host and worker, and a host that leaves (weight 0) takes
/// only its own keys away, give or take Maglev's small reshuffle, while
/// the connections open on it finish. Where it has not
/// (this project's build machine), the front-end refuses with a message
/// that names what is missing, and the test says so.
#[test]
fn ipvs_maglev_keeps_affinity_and_a_host_leaving_moves_its_keys() {
    let cluster = Cluster::build(Options {
        hosts: 3,
        workers: 2,
        ecmp_seed: 1,
        binary: reuseport_tests::binary(),
    })
    .expect("building the topology");
    if let Err(why) = cluster.ipvs_available() {
        assert!(
            std::env::var_os("REUSEPORT_EXPECT_IPVS").is_none(),
            "IPVS was expected here: {why}"
        );
        let refused = cluster
            .set_front(FrontEnd::Ipvs, &[0, 1, 2], true)
            .expect_err("no IPVS: the front-end refuses");
        let text = format!("{refused:#}");
        assert!(
            text.contains("cannot run here") && (text.contains("ipvsadm") || text.contains("IPVS")),
            "the refusal names what is missing: {text}"
        );
        eprintln!(
            "IPVS is not available on this kernel ({why}); the IPVS form ran its refusal only"
        );
        return;
    }
    let keys = ipvs_keys();
    cluster
        .set_front(FrontEnd::Ipvs, &[0, 1, 2], true)
        .expect("ipvsadm -A ... -s mh");
    let first = cluster.probe(keys).expect("first pass");
    clean(&first, "first pass");
    assert!(
        first.per_host(3).iter().all(|&n| n > 0),
        "Maglev spreads keys over the hosts: {:?}",
        first.per_host(3)
    );
    let second = cluster.probe(keys).expect("second pass");
    clean(&second, "second pass");
    let m = compare(&first, &second);
    assert_eq!(m.same, keys, "every key on the same host and worker: {m:?}");

    // Host 1 leaves (weight 0) under a steady load: IPVS keeps the open
    // connections on it, so none is reset or fails.
    let gone = 1;
    let load = cluster
        .load(4, Duration::from_millis(100))
        .expect("starting the load");
    thread::sleep(Duration::from_millis(500));
    let changed = cluster.set_front(FrontEnd::Ipvs, &[0, 2], false);
    thread::sleep(Duration::from_millis(1000));
    let through = load.stop();
    changed.expect("ipvsadm -e ... -w 0");
    assert!(through.completed > 0, "the load ran: {through:?}");
    assert_eq!(
        (through.failed, through.reset),
        (0, 0),
        "no connection failed or was reset as host {gone} left: {through:?}"
    );
    let after = cluster.probe(keys).expect("after host 1 left");
    clean(&after, "after host 1 left");
    let mut others_moved = 0;
    for (i, (x, y)) in first.placed.iter().zip(&after.placed).enumerate() {
        let (x, y) = (x.expect("placed"), y.expect("placed"));
        if x.host == gone {
            assert_ne!(y.host, gone, "key {i} left the host that left");
        } else if x != y {
            assert_ne!(x.host, y.host, "key {i} kept its host, so its worker too");
            others_moved += 1;
        }
    }
    let its = first.per_host(3)[gone];
    eprintln!(
        "IPVS mh on {}: {keys} keys, per host {:?}, {} of {keys} on the same host and worker twice; host {gone} left: {} keys moved ({:.1} %, its share {:.1} %), {others_moved} of the other hosts' keys moved; load through the change: {} completed, {} reset, {} failed",
        reuseport_tests::cluster::kernel_release(),
        first.per_host(3),
        m.same,
        its + others_moved,
        100.0 * (its + others_moved) as f64 / keys as f64,
        100.0 * its as f64 / keys as f64,
        through.completed,
        through.reset,
        through.failed,
    );
    // Maglev rebuilds its table from each remaining host's preference
    // list: a few entries of the remaining hosts change hands too (the
    // NSDI paper measures a few per cent), never a large share.
    assert!(
        others_moved * 10 < keys,
        "{others_moved} of {keys} keys of the remaining hosts moved"
    );
}
