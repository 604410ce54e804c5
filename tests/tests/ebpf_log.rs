//! The program's per-selection log records: present when their level is
//! switched on, absent (and pruned from the program) otherwise.

use reuseport_tests::{echo, eventually, netns, Server};
use std::{process::Command, time::Duration};

fn serve(rust_log: &str) -> Server {
    let mut cmd = Command::new(reuseport_tests::binary());
    cmd.args([
        "run",
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--policy",
        "cpu",
        "--bpf-stats",
    ])
    .env("RUST_LOG", rust_log);
    Server::spawn(&mut cmd).expect("server")
}

#[test]
fn selections_are_logged_only_at_trace_level() {
    netns();
    let quiet = serve("info");
    let loud = serve("info,reuseport_ebpf=trace");
    for i in 0..20u8 {
        assert_eq!(echo(quiet.addr, &[i]), [i]);
        assert_eq!(echo(loud.addr, &[i]), [i]);
    }
    assert!(
        eventually(Duration::from_secs(5), || loud
            .stderr()
            .matches("selected slot")
            .count()
            == 20),
        "one record per selection at trace level:\n{}",
        loud.stderr()
    );
    let m = loud.metrics();
    for slot in 0..m
        .0
        .keys()
        .filter(|k| k.starts_with("reuseport_bpf_selected_total"))
        .count()
    {
        let logged = loud
            .stderr()
            .matches(&format!("selected slot {slot}\n"))
            .count() as u64;
        assert_eq!(
            logged,
            m.selected(slot),
            "slot {slot}: records match the counter"
        );
    }
    assert_eq!(
        quiet.stderr().matches("selected slot").count(),
        0,
        "{}",
        quiet.stderr()
    );

    // Pruned means free: by the kernel's run-time statistics, a run of the
    // quiet program costs a small part of a run of the logging one (about
    // 1/80 here; the bound leaves room for a noisy machine).
    let per_run = |s: &Server| {
        let m = s.metrics();
        let runs = m.get("reuseport_bpf_runs_total", &[]).unwrap_or(0.0);
        let secs = m.get("reuseport_bpf_run_seconds_total", &[]).unwrap_or(0.0);
        assert!(runs >= 20.0, "the kernel counted the runs: {runs}");
        secs / runs
    };
    let (q, l) = (per_run(&quiet), per_run(&loud));
    println!(
        "per run: {:.0} ns without the records, {:.0} ns with them",
        q * 1e9,
        l * 1e9
    );
    assert!(q * 5.0 < l, "quiet {q:e} s per run, loud {l:e} s per run");
}
