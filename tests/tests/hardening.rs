//! What the server survives: datagrams the kernel drops after steering them
//! (their load must not stay behind), and clients of the metrics endpoint
//! that connect and never ask.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use reuseport::metrics::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS as MAX_METRICS_CONNECTIONS};
use reuseport_tests::{
    accepted_delta, echo, eventually, netns, pattern, udp_exchange_on, udp_socket, Metrics, Server,
};

/// Each worker's `load` (what least-loaded compares).
fn loads(m: &Metrics, workers: usize) -> Vec<u64> {
    (0..workers)
        .map(|w| m.count("reuseport_worker_load", &[("worker", &w.to_string())]))
        .collect()
}

#[test]
fn load_of_datagrams_dropped_at_a_full_receive_buffer_is_settled() {
    netns();
    // Datagrams placed one by one (no flow table, which would keep each
    // client socket's datagrams, one flow, on one worker).
    let server = Server::start(&[
        "--proto",
        "udp",
        "--policy",
        "least-loaded",
        "--workers",
        "2",
        "--flow-table-size",
        "0",
    ]);
    let client = udp_socket("127.0.0.1:0".parse().unwrap());
    for i in 0..20 {
        let p = pattern(16, i);
        assert_eq!(udp_exchange_on(&client, server.addr, &p), p);
    }
    // A worker takes a datagram's load away just after it has replied.
    assert!(
        eventually(Duration::from_secs(2), || loads(&server.metrics(), 2)
            == [0, 0]),
        "idle workers carry no load"
    );
    let before = server.metrics();

    // A stopped process reads nothing, but the program still steers (it
    // runs in the sender's context) and counts every datagram in its
    // slot's load: each worker's receive buffer (4 MiB asked, about 130
    // datagrams of 60 KB) fills, and the kernel drops the rest
    // (__udp_enqueue_schedule_skb() in net/ipv4/udp.c) after the load was
    // counted. The burst comes from a socket closed before the server
    // reads it, so that the echoes are not dropped at the client (which
    // would count in the namespace's RcvbufErrors too).
    const BURST: u64 = 1000;
    server.signal(Signal::SIGSTOP);
    assert!(
        eventually(Duration::from_secs(5), || all_stopped(server.pid())),
        "the server stopped"
    );
    let burst = udp_socket("127.0.0.1:0".parse().unwrap());
    let payload = pattern(60_000, 7);
    for _ in 0..BURST {
        burst.send_to(&payload, server.addr).expect("send");
    }
    drop(burst);
    server.signal(Signal::SIGCONT);

    let after_burst = server.metrics();
    let dropped = after_burst.count("reuseport_udp_receive_buffer_errors_total", &[])
        - before.count("reuseport_udp_receive_buffer_errors_total", &[]);
    assert!(
        dropped >= BURST / 2,
        "the burst overflowed the receive buffers: {dropped} of {BURST} dropped"
    );
    let selected =
        after_burst.selected(0) + after_burst.selected(1) - before.selected(0) - before.selected(1);
    assert_eq!(selected, BURST, "the program steered every datagram");
    // The workers' audit waits for an excess seen twice, a second apart:
    // right after the burst, the dropped datagrams' load is still there.
    let left = loads(&after_burst, 2);
    assert!(
        left.iter().sum::<u64>() > 0,
        "the drops left load behind at first: {left:?}"
    );

    let mut last = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            last = loads(&server.metrics(), 2);
            last == [0, 0]
        }),
        "the load of the dropped datagrams was settled; still {last:?} (dropped {dropped})"
    );
    let m = server.metrics();
    assert_eq!(
        m.accepted(0) + m.accepted(1) - before.accepted(0) - before.accepted(1),
        BURST - dropped,
        "every datagram that was queued was answered"
    );

    // Both workers idle again: least-loaded shares new datagrams between
    // them (ties are broken at random), instead of starving one.
    let before = server.metrics();
    for i in 0..200 {
        let p = pattern(16, 1_000 + i);
        assert_eq!(udp_exchange_on(&client, server.addr, &p), p);
    }
    let after = server.metrics();
    let delta = accepted_delta(&before, &after, 2);
    assert_eq!(delta.iter().sum::<u64>(), 200);
    assert!(
        delta.iter().all(|&d| d >= 50),
        "new datagrams are spread again: {delta:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), || loads(&server.metrics(), 2)
            == [0, 0]),
        "and their load is taken away as they are answered"
    );
}

/// Whether every thread of process `pid` is stopped (`T` in
/// `/proc/PID/task/TID/stat`): `kill(2)` returns before they are.
fn all_stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            })
            .is_some_and(|state| state == "T")
    })
}

/// This process's open descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// `GET /metrics` with deadlines, so that a server that does not answer
/// fails the test instead of hanging it. The status line and the body.
fn get_metrics(addr: SocketAddr) -> Result<(String, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut text = Vec::new();
    s.read_to_end(&mut text)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

/// Whether the server has closed `s` (end of stream or reset), without
/// waiting.
fn closed_by_server(s: &TcpStream) -> bool {
    s.set_nonblocking(true).expect("O_NONBLOCK");
    let mut b = [0u8; 1];
    let closed = match (&*s).read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).expect("blocking");
    closed
}

#[test]
fn idle_metrics_clients_cannot_take_the_endpoint_or_the_descriptors() {
    netns();
    let server = Server::start(&["--workers", "2"]);
    let metrics = server.metrics_addr.expect("metrics address");
    let fds_before = open_fds(server.pid());

    // 200 clients that connect and never send a byte.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(metrics).expect("connect to the metrics port"))
        .collect();
    // The server takes them all off its accept queue at once, keeping at
    // most MAX_METRICS_CONNECTIONS of them.
    let mut open = 0;
    assert!(
        eventually(Duration::from_secs(3), || {
            open = idle.iter().filter(|s| !closed_by_server(s)).count();
            open <= MAX_METRICS_CONNECTIONS
        }),
        "{open} idle connections are still open"
    );
    let extra = open_fds(server.pid()).saturating_sub(fds_before);
    assert!(
        extra <= MAX_METRICS_CONNECTIONS + 1,
        "the idle clients hold {extra} of the server's descriptors"
    );

    // A scrape is still answered at once (3 s allow for a busy machine;
    // refused, it would wait out a 5 s header timeout): it takes the place of the
    // longest-waiting idle client.
    let asked = Instant::now();
    let (status, body) = get_metrics(metrics).expect("a scrape while idle clients wait");
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("reuseport_worker_accepted_total"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the scrape took {:?}",
        asked.elapsed()
    );
    // And the workers serve as before.
    let p = pattern(1_000, 3);
    assert_eq!(echo(server.addr, &p), p);

    // After the header read timeout, every idle client has been closed.
    assert!(
        eventually(HEADER_READ_TIMEOUT + Duration::from_secs(3), || {
            open = idle.iter().filter(|s| !closed_by_server(s)).count();
            open == 0
        }),
        "{open} idle connections outlived the header read timeout"
    );
    let (status, _) = get_metrics(metrics).expect("a scrape afterwards");
    assert!(status.contains(" 200 "), "{status}");
}

/// Seconds until the server closes `s`, which sends nothing more.
fn time_to_close(mut s: TcpStream) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("waiting for the server to close: {e}"),
    }
    start.elapsed()
}

#[test]
fn a_metrics_client_that_does_not_finish_its_headers_is_closed_after_the_timeout() {
    netns();
    let server = Server::start(&["--workers", "1"]);
    let metrics = server.metrics_addr.expect("metrics address");
    // One says nothing; one starts a request and stops half-way through
    // its headers (slowloris).
    let silent = TcpStream::connect(metrics).expect("connect");
    let mut partial = TcpStream::connect(metrics).expect("connect");
    partial
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    let silent = thread::spawn(move || time_to_close(silent));
    let partial = thread::spawn(move || time_to_close(partial));
    for (who, took) in [
        ("silent", silent.join().unwrap()),
        ("partial", partial.join().unwrap()),
    ] {
        assert!(
            took >= HEADER_READ_TIMEOUT - Duration::from_millis(500)
                && took <= HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "the {who} client was closed after {took:?}, not after the {HEADER_READ_TIMEOUT:?} header read timeout"
        );
    }
    // A client that asks in time is answered, and may ask again on the
    // same connection.
    let mut s = TcpStream::connect(metrics).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("response");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}
