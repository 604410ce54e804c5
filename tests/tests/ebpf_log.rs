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
}
