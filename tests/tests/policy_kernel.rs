//! `--policy kernel`: the group serves on the kernel's own hash, with no
//! program loaded, and the program's counters stay at zero.

use std::thread;

use reuseport_tests::{
    accepted_delta, bpf_programs_of, cpus, echo, netns, pattern, pin_to_cpu, Server,
};

#[test]
fn serves_without_a_program_and_the_counters_stay_at_zero() {
    netns();
    let server = Server::start(&["--policy", "kernel", "--workers", "2"]);
    assert!(
        bpf_programs_of(server.pid()).is_empty(),
        "no BPF program is loaded"
    );
    let before = server.metrics();
    let addr = server.addr;
    let cpu = cpus()[0];
    thread::spawn(move || {
        pin_to_cpu(cpu);
        for i in 0..200 {
            let p = pattern(50, i);
            assert_eq!(echo(addr, &p), p);
        }
    })
    .join()
    .unwrap();
    let after = server.metrics();
    let delta = accepted_delta(&before, &after, 2);
    assert_eq!(delta.iter().sum::<u64>(), 200);
    // The kernel hashes the 4-tuple, not the CPU: both workers serve the
    // one pinned client, which the `cpu` policy would never do.
    assert!(
        delta.iter().all(|&d| d > 0),
        "kernel hash spreads: {delta:?}"
    );
    for slot in 0..2 {
        assert_eq!(
            after.selected(slot),
            0,
            "slot {slot}: no selections without a program"
        );
    }
    assert_eq!(after.fallback(), 0);
}

#[test]
fn a_steered_group_does_hold_its_program() {
    // The control for the test above: the same check sees the program.
    netns();
    let server = Server::start(&["--policy", "cpu"]);
    assert_eq!(
        bpf_programs_of(server.pid()).len(),
        1,
        "the steering program is loaded"
    );
}
