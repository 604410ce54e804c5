//! SIGTERM/SIGINT: stop accepting, let open connections finish, detach,
//! exit 0 with the port free and no program left in the kernel.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use reuseport_tests::{bpf_program_exists, bpf_programs_of, eventually, netns, pattern, Server};

fn roundtrip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).unwrap();
    let mut got = vec![0; data.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn open_connections_finish_then_the_port_is_free_and_the_program_gone() {
    netns();
    let server = Server::start(&["--policy", "cpu", "--drain-timeout", "20s"]);
    let addr = server.addr;
    let programs = bpf_programs_of(server.pid());
    assert_eq!(programs.len(), 1);
    let mut open: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            roundtrip(&mut s, &pattern(1000, i));
            s
        })
        .collect();

    server.signal(Signal::SIGTERM);
    // New connections are refused once the listeners are closed...
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            TcpStream::connect(addr),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused
        )),
        "new connections are refused after SIGTERM"
    );
    // ...while the open ones are still served to the end.
    for (i, s) in open.iter_mut().enumerate() {
        roundtrip(s, &pattern(100_000, 10 + i as u64));
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    let started = Instant::now();
    let (status, stderr) = server.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exits once the last connection closed"
    );
    assert!(stderr.contains("detached the steering program"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    TcpListener::bind(addr).expect("the port is free after exit");
    assert!(
        eventually(Duration::from_secs(5), || !bpf_program_exists(programs[0])),
        "the program is gone from the kernel"
    );
}

#[test]
fn a_connection_that_never_ends_is_closed_at_the_drain_deadline() {
    netns();
    let server = Server::start(&["--policy", "cpu", "--drain-timeout", "1s"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    roundtrip(&mut s, b"hello");
    server.signal(Signal::SIGINT);
    let started = Instant::now();
    let (status, stderr) = server.wait(Duration::from_secs(10));
    assert!(status.success(), "{stderr}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(stderr.contains("drain deadline"), "{stderr}");
    // The client sees its connection end: end of stream or a reset at once,
    // not the read timeout of a connection left open.
    let mut rest = Vec::new();
    let read = Instant::now();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection did not end: {e} after {:?}", read.elapsed()),
    }
    assert!(rest.is_empty(), "nothing more came: {rest:?}");
    assert!(
        read.elapsed() < Duration::from_secs(5),
        "ended at once, not at the read timeout"
    );
    // And nothing can be sent on it any more.
    let sent = s.write_all(b"still there?").and_then(|()| {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"?")
    });
    assert!(
        sent.is_err(),
        "the server side is closed: a write is refused"
    );
}
