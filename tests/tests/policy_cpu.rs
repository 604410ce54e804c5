//! `--policy cpu`: a connection is served by the worker pinned to the CPU
//! that received its SYN.

use std::thread;

use reuseport::policy::{plan, LiveSlot, Policy, PolicyKind};
use reuseport_tests::{
    accepted_delta, assert_placed_by_program, cpus, cpus_at_least, echo, netns, pattern,
    pin_to_cpu, selected_delta, Server,
};

const PER_CPU: usize = 100;

#[test]
fn every_connection_reaches_the_worker_of_its_cpu() {
    netns();
    let cpus = cpus_at_least(2, "each CPU's connections must reach a different worker");
    let n = cpus.len();
    let server = Server::start(&["--policy", "cpu"]);
    let addr = server.addr;
    // Visit the CPUs forwards and then backwards, like the kernel's
    // reuseport_bpf_cpu selftest, so a fixed mapping cannot pass by luck.
    let order: Vec<(usize, usize)> = cpus
        .iter()
        .copied()
        .enumerate()
        .chain(cpus.iter().copied().enumerate().rev())
        .collect();
    for (worker, cpu) in order {
        let before = server.metrics();
        thread::spawn(move || {
            pin_to_cpu(cpu);
            for i in 0..PER_CPU {
                let payload = pattern(64, (cpu * 1000 + i) as u64);
                assert_eq!(echo(addr, &payload), payload, "echo on CPU {cpu}");
            }
        })
        .join()
        .expect("client thread");
        let after = server.metrics();
        let mut expect = vec![0; n];
        expect[worker] = PER_CPU as u64;
        assert_eq!(
            accepted_delta(&before, &after, n),
            expect,
            "connections from CPU {cpu}: accepted per worker"
        );
        // The program placed them: a SYN sent again on a slow machine
        // runs it again, so selections may exceed connections by a few.
        assert_placed_by_program(
            &selected_delta(&before, &after, n),
            &expect,
            &format!("connections from CPU {cpu}"),
        );
        assert_eq!(
            after.fallback(),
            0,
            "no connection left to the kernel's hash"
        );
    }
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
fn more_workers_than_cpus_stay_on_their_cpu() {
    netns();
    let cpus = cpus_at_least(2, "each CPU's connections must stay on its own workers");
    let n = cpus.len() * 2;
    let workers = n.to_string();
    let server = Server::start(&["--policy", "cpu", "--workers", &workers]);
    let addr = server.addr;
    for (i, cpu) in cpus.iter().copied().enumerate() {
        let before = server.metrics();
        thread::spawn(move || {
            pin_to_cpu(cpu);
            for k in 0..PER_CPU {
                let payload = pattern(16, k as u64);
                assert_eq!(echo(addr, &payload), payload);
            }
        })
        .join()
        .expect("client thread");
        let after = server.metrics();
        let delta = accepted_delta(&before, &after, n);
        assert_placed_by_program(
            &selected_delta(&before, &after, n),
            &delta,
            &format!("CPU {cpu}: the program chose every one"),
        );
        // Workers i and i + |cpus| are the ones pinned to this CPU.
        let on_cpu = delta[i] + delta[i + cpus.len()];
        assert_eq!(on_cpu, PER_CPU as u64, "CPU {cpu}: {delta:?}");
        assert!(
            delta[i] > 0 && delta[i + cpus.len()] > 0,
            "both workers of CPU {cpu} serve: {delta:?}"
        );
    }
}

/// The CPU of each worker, from the `worker N: slot N, cpu C` lines that
/// `run` prints before `ready`.
fn worker_cpus(server: &Server) -> Vec<usize> {
    let mut cpus = Vec::new();
    for line in &server.banner {
        let Some(rest) = line.strip_prefix("worker ") else {
            continue;
        };
        let cpu = rest
            .rsplit_once("cpu ")
            .and_then(|(_, c)| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("no CPU in {line:?}"));
        cpus.push(cpu);
    }
    cpus
}

/// Worker counts below, at and above the CPU count (deduplicated, at
/// least 1): with 2 CPUs 1, 2 and 3; with 1 CPU 1 and 2.
fn shapes(cpus: usize) -> Vec<usize> {
    let mut w = vec![1, cpus.saturating_sub(1), cpus, cpus + 1];
    w.retain(|&n| n >= 1);
    w.sort_unstable();
    w.dedup();
    w
}

/// The workers the plan gives `cpu`, computed in user space by the
/// library's planner over this machine's topology.
fn planned(placed: &[usize], cpu: usize) -> Vec<usize> {
    let live: Vec<LiveSlot> = placed
        .iter()
        .enumerate()
        .map(|(slot, &cpu)| LiveSlot {
            slot: slot as u32,
            cpu: cpu as u32,
        })
        .collect();
    let plan = plan(&Policy::new(PolicyKind::Cpu), &live).expect("a cpu plan");
    let row = plan.config.cpu_rows[cpu];
    (row.start..row.start + row.len)
        .map(|i| usize::from(plan.config.cpu_slots[usize::from(i)]))
        .collect()
}

/// `--policy cpu` with fewer workers than CPUs (issue 11: with
/// `--workers 1` on 2 CPUs half the connections fell back to the kernel's
/// hash), as many and more: every CPU has a defined worker, the program
/// places every connection (fallback 0), a CPU with workers of its own
/// keeps its connections on them, and a CPU without one sends all of its
/// connections to the one worker the plan, predicted in user space, gives
/// it.
#[test]
fn every_cpu_has_a_worker_whatever_the_worker_count() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let w_arg = workers.to_string();
        let server = Server::start(&["--policy", "cpu", "--workers", &w_arg]);
        let placed = worker_cpus(&server);
        assert_eq!(placed.len(), workers, "{:?}", server.banner);
        let addr = server.addr;
        let order: Vec<usize> = cpus.iter().chain(cpus.iter().rev()).copied().collect();
        for cpu in order {
            let before = server.metrics();
            thread::spawn(move || {
                pin_to_cpu(cpu);
                for i in 0..PER_CPU / 5 {
                    let payload = pattern(16, (cpu * 1000 + i) as u64);
                    assert_eq!(echo(addr, &payload), payload, "echo on CPU {cpu}");
                }
            })
            .join()
            .expect("client thread");
            let after = server.metrics();
            let delta = accepted_delta(&before, &after, workers);
            let what = format!("{workers} workers on CPUs {placed:?}, client on CPU {cpu}");
            assert_eq!(
                after.fallback(),
                0,
                "{what}: no connection left to the kernel's hash"
            );
            assert_placed_by_program(
                &selected_delta(&before, &after, workers),
                &delta,
                &format!("{what}: the program placed every connection"),
            );
            assert_eq!(delta.iter().sum::<u64>(), (PER_CPU / 5) as u64, "{what}");
            let own: Vec<usize> = (0..workers).filter(|&w| placed[w] == cpu).collect();
            let serving: Vec<usize> = (0..workers).filter(|&w| delta[w] > 0).collect();
            let predicted = planned(&placed, cpu);
            if own.is_empty() {
                assert_eq!(
                    serving.len(),
                    1,
                    "{what}: a CPU without a worker has one defined worker: {delta:?}"
                );
                assert_eq!(serving, predicted, "{what}: the worker the plan gives it");
            } else {
                assert_eq!(
                    predicted, own,
                    "{what}: the plan keeps the CPU's own workers"
                );
                assert!(
                    serving.iter().all(|w| own.contains(w)),
                    "{what}: served by the CPU's own workers {own:?}: {delta:?}"
                );
            }
        }
        let (status, stderr) = server.stop();
        assert!(status.success(), "{stderr}");
    }
}

/// The NUMA nodes of this machine that hold CPUs this process may use, each
/// as the list of those CPUs (from `/sys/devices/system/node/node*/cpulist`);
/// one node of every usable CPU when sysfs has no nodes.
fn numa_nodes() -> Vec<Vec<usize>> {
    let usable = cpus();
    let mut nodes = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
        return vec![usable];
    };
    let mut paths: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.strip_prefix("node")
                    .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    paths.sort();
    for p in paths {
        let Ok(list) = std::fs::read_to_string(p.join("cpulist")) else {
            continue;
        };
        let cpus: Vec<usize> = reuseport::topology::parse_cpu_list(&list)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c as usize)
            .filter(|c| usable.contains(c))
            .collect();
        if !cpus.is_empty() {
            nodes.push(cpus);
        }
    }
    if nodes.is_empty() {
        nodes.push(usable);
    }
    nodes
}

/// Issue 12, big machines: under `--policy cpu` a CPU without a worker of
/// its own goes to a worker of its own NUMA node (and cache domain), not to
/// any worker. The server may run on one CPU of each node only (its
/// affinity, inherited from this thread), so it starts one worker there per
/// node; then every CPU of every node connects, and each connection must be
/// selected by the program for, and accepted by, the worker of its node.
/// The NUMA cell of `cargo xtask vm-test` (two nodes of four vCPUs) sets
/// `REUSEPORT_EXPECT_NUMA=1`: there it fails unless it finds at least two
/// nodes of two or more CPUs. Elsewhere (`cargo test` on a one-node host)
/// the same steps run over the nodes there are: every CPU of the one node
/// must reach its one worker, which proves less.
#[test]
fn cpus_without_a_worker_go_to_a_worker_of_their_numa_node() {
    netns();
    let nodes = numa_nodes();
    if std::env::var_os("REUSEPORT_EXPECT_NUMA").is_some() {
        assert!(
            nodes.iter().filter(|n| n.len() >= 2).count() >= 2,
            "this test needs a NUMA machine: at least 2 NUMA nodes with 2 or more usable CPUs \
             each (the NUMA cell: cargo xtask vm-test --kernel 6.1-numa); found {nodes:?}"
        );
    }
    let first: Vec<usize> = nodes.iter().map(|n| n[0]).collect();
    // A child inherits the affinity of the thread that forks it: restrict
    // this thread to the nodes' first CPUs while the server starts, so its
    // workers are placed on those CPUs only, then restore it.
    let saved = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let mut set = nix::sched::CpuSet::new();
    for &c in &first {
        set.set(c).expect("cpu in range");
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("affinity");
    let workers = nodes.len().to_string();
    let started = Server::try_start(&["--policy", "cpu", "--workers", &workers]);
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &saved).expect("affinity");
    let server = started.unwrap_or_else(|e| panic!("server: {e:?}"));
    let placed = worker_cpus(&server);
    let mut sorted = placed.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, first,
        "one worker on the first CPU of each node: {:?}",
        server.banner
    );
    // The worker of each node.
    let worker_of: Vec<usize> = first
        .iter()
        .map(|c| placed.iter().position(|p| p == c).expect("placed"))
        .collect();
    let n = nodes.len();
    let addr = server.addr;
    let per = PER_CPU / 5;
    let mut served = vec![vec![0u64; n]; n];
    for (node, cpus) in nodes.iter().enumerate() {
        for &cpu in cpus {
            let before = server.metrics();
            thread::spawn(move || {
                pin_to_cpu(cpu);
                for i in 0..per {
                    let payload = pattern(16, (cpu * 1000 + i) as u64);
                    assert_eq!(echo(addr, &payload), payload, "echo on CPU {cpu}");
                }
            })
            .join()
            .expect("client thread");
            let after = server.metrics();
            let delta = accepted_delta(&before, &after, n);
            let what = format!("client on CPU {cpu} of node {node}, workers on CPUs {placed:?}");
            let mut expect = vec![0; n];
            expect[worker_of[node]] = per as u64;
            assert_eq!(delta, expect, "{what}: accepted per worker");
            assert_eq!(
                selected_delta(&before, &after, n),
                expect,
                "{what}: the program's selections per slot"
            );
            assert_eq!(
                after.fallback(),
                0,
                "{what}: no connection left to the kernel's hash"
            );
            for (other, &w) in worker_of.iter().enumerate() {
                served[node][other] += delta[w];
            }
        }
    }
    for (node, row) in served.iter().enumerate() {
        println!(
            "numa: node {node} (CPUs {:?}): connections served by the worker of each node {row:?}",
            nodes[node]
        );
    }
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");
}
