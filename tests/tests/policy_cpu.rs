//! `--policy cpu`: a connection is served by the worker pinned to the CPU
//! that received its SYN.

use std::thread;

use reuseport_tests::{
    accepted_delta, cpus, echo, netns, pattern, pin_to_cpu, selected_delta, Server,
};

const PER_CPU: usize = 100;

#[test]
fn every_connection_reaches_the_worker_of_its_cpu() {
    netns();
    let cpus = cpus();
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
        assert_eq!(
            selected_delta(&before, &after, n),
            expect,
            "connections from CPU {cpu}: the program's selections per slot"
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
    let cpus = cpus();
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
        assert_eq!(
            selected_delta(&before, &after, n),
            delta,
            "the program chose every one"
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
