//! Every steered policy with fewer workers than CPUs, as many, and more
//! (with 2 CPUs: 1, 2 and 3 workers), from clients on every CPU. The
//! expected placement is derived from the CPU and worker counts and, where
//! the policy is deterministic, predicted connection by connection in user
//! space: `cpu` by the library's planner, `hash` and `consistent` by
//! `reuseport_common::hash` and `reuseport_common::table`, `weighted` by
//! its fixed sequence.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use reuseport::policy::{plan, LiveSlot, Policy, PolicyKind};
use reuseport_common::{
    hash::hash_addrs,
    key,
    table::{maglev_size, maglev_table, weighted_table},
    LEAST_LOADED_CHOICES,
};
use reuseport_tests::{
    accepted_delta, connect_from, cpus, echo_on, eventually, netns, pattern, pin_to_cpu,
    selected_delta, Metrics, Server,
};

/// Worker counts below, at and above the CPU count, at least 1.
fn shapes(cpus: usize) -> Vec<usize> {
    let mut w = vec![cpus.saturating_sub(1), cpus, cpus + 1];
    w.retain(|&n| n >= 1);
    w.dedup();
    w
}

/// The client address of connection `i` (distinct per connection, so the
/// hashing policies see many keys).
fn client(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f40_0000 + i as u32 + 1))
}

/// Connection `i` of a run goes from CPU `cpus[i * cpus.len() / total]`:
/// the CPUs take their turns in order, one batch each.
struct Run {
    /// Per CPU: accepted per worker during its batch.
    per_cpu: Vec<Vec<u64>>,
    /// Accepted per worker over the run.
    total: Vec<u64>,
    /// The client address of each connection, in order.
    clients: Vec<SocketAddr>,
}

/// Runs `total` echo connections, one at a time, batch by batch from each
/// CPU, and checks what holds under every policy: each one echoed, placed
/// by the program (selections equal accepts), none left to the kernel.
fn run(server: &Server, workers: usize, cpus: &[usize], total: usize, what: &str) -> Run {
    let addr = server.addr;
    let mut per_cpu = Vec::new();
    let mut clients = Vec::new();
    let start = server.metrics();
    for (b, &cpu) in cpus.iter().enumerate() {
        let range = b * total / cpus.len()..(b + 1) * total / cpus.len();
        let before = server.metrics();
        let used: Vec<SocketAddr> = thread::spawn(move || {
            pin_to_cpu(cpu);
            range
                .map(|i| {
                    let s = connect_from(SocketAddr::new(client(i), 0), addr);
                    let local = s.local_addr().expect("local address");
                    let p = pattern(16, i as u64);
                    assert_eq!(echo_on(s, &p), p);
                    local
                })
                .collect()
        })
        .join()
        .expect("client thread");
        clients.extend(used);
        let after = server.metrics();
        let delta = accepted_delta(&before, &after, workers);
        assert_eq!(
            selected_delta(&before, &after, workers),
            delta,
            "{what}, CPU {cpu}: the program placed every connection"
        );
        per_cpu.push(delta);
    }
    let end = server.metrics();
    assert_eq!(end.fallback(), 0, "{what}: none left to the kernel's hash");
    let total_delta = accepted_delta(&start, &end, workers);
    assert_eq!(total_delta.iter().sum::<u64>(), total as u64, "{what}");
    Run {
        per_cpu,
        total: total_delta,
        clients,
    }
}

fn counts(workers: usize, served: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut c = vec![0; workers];
    for w in served {
        c[w] += 1;
    }
    c
}

fn start(policy: &[&str], workers: usize) -> Server {
    let w = workers.to_string();
    let mut args = vec!["--workers", w.as_str(), "--policy"];
    args.extend(policy);
    Server::start(&args)
}

#[test]
fn cpu_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let server = start(&["cpu"], workers);
        let what = format!("cpu, {workers} workers on {} CPUs", cpus.len());
        let r = run(&server, workers, &cpus, 10 * cpus.len(), &what);
        // Worker w runs on usable CPU w mod |cpus|; the plan gives each CPU
        // its own workers or one worker near it.
        let live: Vec<LiveSlot> = (0..workers)
            .map(|w| LiveSlot {
                slot: w as u32,
                cpu: cpus[w % cpus.len()] as u32,
            })
            .collect();
        let p = plan(&Policy::new(PolicyKind::Cpu), &live).unwrap();
        for (b, &cpu) in cpus.iter().enumerate() {
            let row = p.config.cpu_rows[cpu];
            let planned: Vec<usize> = (row.start..row.start + row.len)
                .map(|i| usize::from(p.config.cpu_slots[usize::from(i)]))
                .collect();
            let delta = &r.per_cpu[b];
            for (w, n) in delta.iter().enumerate() {
                assert!(
                    *n == 0 || planned.contains(&w),
                    "{what}: CPU {cpu} reached worker {w}, the plan says {planned:?}: {delta:?}"
                );
            }
        }
    }
}

#[test]
fn hash_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let server = start(&["hash", "--seed", "11"], workers);
        let what = format!("hash, {workers} workers on {} CPUs", cpus.len());
        let r = run(&server, workers, &cpus, 12 * cpus.len(), &what);
        let predicted = counts(
            workers,
            r.clients.iter().map(|&c| {
                (hash_addrs(key::SRC_IP, 11, c, server.addr).unwrap() % workers as u32) as usize
            }),
        );
        assert_eq!(
            r.total, predicted,
            "{what}: the workers user space predicts"
        );
    }
}

#[test]
fn consistent_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let server = start(&["consistent", "--seed", "5"], workers);
        let what = format!("consistent, {workers} workers on {} CPUs", cpus.len());
        let r = run(&server, workers, &cpus, 12 * cpus.len(), &what);
        let slots: Vec<u32> = (0..workers as u32).collect();
        let mut table = vec![0u32; maglev_size(workers) as usize];
        let m = maglev_table(&slots, &mut table).unwrap();
        let predicted = counts(
            workers,
            r.clients.iter().map(|&c| {
                let h = hash_addrs(key::SRC_IP, 5, c, server.addr).unwrap();
                table[(h % m) as usize] as usize
            }),
        );
        assert_eq!(
            r.total, predicted,
            "{what}: the workers user space predicts"
        );
    }
}

#[test]
fn round_robin_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let server = start(&["round-robin"], workers);
        let what = format!("round-robin, {workers} workers on {} CPUs", cpus.len());
        // Whole rounds: every worker exactly as often.
        let rounds = 3 * cpus.len();
        let r = run(&server, workers, &cpus, rounds * workers, &what);
        assert_eq!(r.total, vec![rounds as u64; workers], "{what}");
    }
}

#[test]
fn weighted_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        // Weights 1, 2, 3, ...: a cycle of w(w+1)/2 tickets.
        let weights: Vec<u32> = (1..=workers as u32).collect();
        let arg = weights
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let server = start(&["weighted", "--weights", &arg], workers);
        let what = format!("weighted {arg}, {workers} workers on {} CPUs", cpus.len());
        let pairs: Vec<(u32, u32)> = weights
            .iter()
            .enumerate()
            .map(|(s, &w)| (s as u32, w))
            .collect();
        let mut table = vec![0u32; 64];
        let cycle = weighted_table(&pairs, &mut table).unwrap() as usize;
        // Whole cycles, so the counts are exact whatever ticket came first.
        let cycles = (24 * cpus.len()).div_ceil(cycle);
        let r = run(&server, workers, &cpus, cycles * cycle, &what);
        let expect: Vec<u64> = weights.iter().map(|&w| w as u64 * cycles as u64).collect();
        assert_eq!(r.total, expect, "{what}");
    }
}

#[test]
fn least_loaded_under_every_shape() {
    netns();
    let cpus = cpus();
    for workers in shapes(cpus.len()) {
        let server = start(&["least-loaded"], workers);
        let what = format!("least-loaded, {workers} workers on {} CPUs", cpus.len());
        run(&server, workers, &cpus, 8 * cpus.len(), &what);
        // Connections held open, one at a time: each goes to a worker with
        // the fewest open, so they end spread evenly (exactly, while the
        // program compares every worker).
        assert!(eventually(Duration::from_secs(5), || {
            let m = server.metrics();
            (0..workers).all(|w| m.active(w) == 0)
        }));
        let held: Vec<TcpStream> = (0..2 * workers)
            .map(|i| {
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&[i as u8]).unwrap();
                let mut b = [0u8];
                s.read_exact(&mut b).unwrap();
                s
            })
            .collect();
        let m: Metrics = server.metrics();
        let open: Vec<u64> = (0..workers).map(|w| m.active(w)).collect();
        assert_eq!(open.iter().sum::<u64>(), 2 * workers as u64, "{what}");
        let (min, max) = (*open.iter().min().unwrap(), *open.iter().max().unwrap());
        if workers as u32 <= LEAST_LOADED_CHOICES {
            assert_eq!(open, vec![2; workers], "{what}: two open each");
        } else {
            assert!(max - min <= 2, "{what}: open per worker {open:?}");
        }
        drop(held);
    }
}
