//! The echo service: bytes come back unchanged, half-close is honoured,
//! and a client that misbehaves does not disturb the others.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::Duration,
};

use reuseport_tests::{echo, eventually, netns, pattern, reset, Server};

#[test]
fn payloads_of_every_size_come_back_byte_for_byte() {
    netns();
    let server = Server::start(&[
        "--policy",
        "hash",
        "--hash-key",
        "four-tuple",
        "--workers",
        "2",
    ]);
    let addr = server.addr;
    let sizes = [
        1usize,
        2,
        100,
        1460,
        65_535,
        65_536,
        65_537,
        1 << 20,
        (3 << 20) + 7,
    ];
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let size = sizes[i % sizes.len()];
            thread::spawn(move || {
                let payload = pattern(size, i as u64 + 1);
                let got = echo(addr, &payload);
                assert_eq!(got.len(), payload.len(), "client {i}: length");
                assert!(got == payload, "client {i}: {size} bytes differ");
                size as u64
            })
        })
        .collect();
    let sent: u64 = clients.into_iter().map(|c| c.join().expect("client")).sum();
    let m = server.metrics();
    let echoed: f64 = (0..2)
        .filter_map(|w| {
            m.get(
                "reuseport_worker_bytes_total",
                &[("worker", &w.to_string())],
            )
        })
        .sum();
    assert_eq!(echoed as u64, sent, "bytes_total counts every echoed byte");
}

#[test]
fn half_close_still_gets_the_whole_echo() {
    netns();
    let server = Server::start(&["--policy", "cpu"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    let payload = pattern(256 * 1024, 9);
    let mut w = s.try_clone().unwrap();
    let p = payload.clone();
    let sender = thread::spawn(move || {
        w.write_all(&p).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // Read slowly after our side is closed: the server must keep echoing.
    thread::sleep(Duration::from_millis(300));
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    sender.join().unwrap();
    assert!(
        got == payload,
        "got {} of {} bytes back",
        got.len(),
        payload.len()
    );
    // And the server closed its side after the echo: read_to_end saw EOF.
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
}

#[test]
fn a_client_reset_mid_stream_does_not_disturb_the_others() {
    netns();
    let server = Server::start(&["--policy", "cpu", "--workers", "1"]);
    let addr = server.addr;
    // Long streams sharing the one worker with the client that resets.
    let streams: Vec<_> = (0..6)
        .map(|i| {
            thread::spawn(move || {
                let payload = pattern(2 << 20, 100 + i);
                echo(addr, &payload) == payload
            })
        })
        .collect();
    for round in 0..20 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&pattern(100_000, round)).unwrap();
        reset(s);
    }
    for (i, s) in streams.into_iter().enumerate() {
        assert!(s.join().unwrap(), "stream {i} was disturbed");
    }
    let payload = pattern(1000, 5);
    assert_eq!(
        echo(addr, &payload),
        payload,
        "new connections are still served"
    );
    assert!(
        eventually(Duration::from_secs(5), || server
            .metrics()
            .count("reuseport_worker_active_connections", &[("worker", "0")])
            == 0),
        "every connection, the reset ones too, is closed on the server"
    );
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    netns();
    let server = Server::start(&["--policy", "cpu", "--idle-timeout", "500ms"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // Silent from now on: the server closes after the idle timeout.
    let mut rest = Vec::new();
    let started = std::time::Instant::now();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early: {:?}",
        started.elapsed()
    );
}
