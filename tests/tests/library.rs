//! The library: a group built through the API, served with a handler of
//! our own, its policy switched through a handle, shut down in order.

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server};
use reuseport_tests::{bpf_program_exists, echo, eventually, netns, pin_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers with the request in upper case, after the client's EOF.
async fn shout(mut stream: tokio::net::TcpStream, _: Conn) -> std::io::Result<()> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await?;
    stream.write_all(&got.to_ascii_uppercase()).await?;
    stream.shutdown().await
}

fn program_ids() -> Vec<u32> {
    reuseport_tests::bpf_programs_of(std::process::id())
}

#[test]
fn a_group_built_served_switched_and_shut_down_through_the_api() {
    netns();
    let loaded_before = program_ids();
    let group = Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .policy(Policy::new(PolicyKind::Cpu))
        .name(reuseport_tests::unique_group())
        .build()
        .unwrap();
    let addr = group.local_addr();
    let name = group.name().unwrap().to_string();
    assert!(pin_dir(&name).exists(), "pinned for ctl");
    assert_eq!(
        group.members().iter().map(|m| m.slot).collect::<Vec<_>>(),
        [0, 1]
    );
    let handle = group.handle();
    let ours: Vec<u32> = program_ids()
        .into_iter()
        .filter(|id| !loaded_before.contains(id))
        .collect();
    assert!(!ours.is_empty(), "the program is loaded");

    let server = Server::start_tcp(group, shout, ServeOptions::default()).unwrap();
    assert_eq!(echo(addr, b"quiet please"), b"QUIET PLEASE");

    handle
        .set_policy(&Policy::new(PolicyKind::RoundRobin))
        .unwrap();
    assert_eq!(handle.policy().unwrap().kind, PolicyKind::RoundRobin);
    let before = handle.counters().unwrap();
    for _ in 0..10 {
        assert_eq!(echo(addr, b"x"), b"X");
    }
    let after = handle.counters().unwrap();
    assert_eq!(
        after.selected[0] - before.selected[0],
        5,
        "round robin through the handle"
    );
    assert_eq!(after.selected[1] - before.selected[1], 5);
    let records = handle.workers();
    assert_eq!(records[0].accepted + records[1].accepted, 11);

    server.shutdown().unwrap();
    // The handle kept the object (maps and program) alive, detached; once
    // it goes, nothing of the group remains.
    drop(handle);
    TcpListener::bind(addr).expect("the port is free");
    assert!(!pin_dir(&name).exists(), "unpinned");
    assert!(
        eventually(Duration::from_secs(5), || ours
            .iter()
            .all(|&id| !bpf_program_exists(id))),
        "nothing stays loaded"
    );
}

#[test]
fn the_listeners_serve_threads_of_our_own_and_close_releases_the_port() {
    netns();
    let group = Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .workers(2)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .pin(false)
        .build()
        .unwrap();
    let addr: SocketAddr = group.local_addr();
    // Our own blocking workers: answer each connection with its slot.
    let threads: Vec<_> = group
        .members()
        .iter()
        .map(|m| {
            let (listener, slot) = (m.tcp_listener().unwrap(), m.slot);
            listener.set_nonblocking(false).unwrap();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    let (mut s, _) = listener.accept().unwrap();
                    std::io::Write::write_all(&mut s, format!("slot {slot}").as_bytes()).unwrap();
                }
            })
        })
        .collect();
    let handle = group.handle();
    let mut answers = Vec::new();
    for _ in 0..6 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut a = String::new();
        std::io::Read::read_to_string(&mut s, &mut a).unwrap();
        answers.push(a);
    }
    answers.sort();
    assert_eq!(
        answers,
        ["slot 0", "slot 0", "slot 0", "slot 1", "slot 1", "slot 1"]
    );
    let c = handle.counters().unwrap();
    assert_eq!(c.selected[..2], [3, 3], "the program chose every one");
    assert_eq!(c.fallback, 0);
    for t in threads {
        t.join().unwrap();
    }
    group.close().unwrap();
    TcpListener::bind(addr).expect("the port is free after close");
}

/// A server dropped inside an async runtime does not hold the runtime's
/// thread for the drain: the drop returns at once, and the shutdown goes on
/// in the background, in order, until the last connection ends.
#[test]
fn a_server_dropped_inside_a_runtime_shuts_down_without_blocking_it() {
    netns();
    let group = Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .workers(1)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .name(reuseport_tests::unique_group())
        .build()
        .unwrap();
    let addr = group.local_addr();
    let name = group.name().unwrap().to_string();
    let handle = group.handle();
    let drain = Duration::from_secs(120);
    let mut options = ServeOptions::default();
    options.limits.drain_timeout = drain;
    let server = Server::start_tcp(group, shout, options).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (took, mut held) = rt.block_on(async move {
        // A connection that stays open: the drain waits for it.
        let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
        held.write_all(b"still here").await.unwrap();
        // Accepted by the worker: the drain waits for it (one still in the
        // accept queue would be reset when the only listener closes).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while handle.workers()[0].active == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker accepted the connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = std::time::Instant::now();
        drop(server);
        (start.elapsed(), held)
    });
    assert!(
        took < drain / 4,
        "the drop waited {took:?} (drain timeout {drain:?})"
    );
    // The open connection is served to its end after the drop. (The pins
    // may already be gone: the shutdown closes the group, then waits for
    // its workers' open connections.)
    rt.block_on(async {
        held.shutdown().await.unwrap();
        let mut answer = Vec::new();
        held.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"STILL HERE");
    });
    assert!(
        eventually(Duration::from_secs(20), || !pin_dir(&name).exists()),
        "the background shutdown removed the pins"
    );
}
