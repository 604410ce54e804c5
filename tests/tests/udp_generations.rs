//! UDP flows keep their worker: through a `ctl drain` and through a
//! `run --takeover`, the datagrams of a flow already served go on reaching
//! the same worker (of the same process) until the flow is idle, while new
//! flows go to the serving workers (the new generation's); then the old
//! worker leaves by itself. The flow table's counters (hit, miss, full)
//! prove the program did it. The `kernel` policy is run the same way for
//! comparison: its flows move, and how many is printed.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use reuseport_tests::{netns, pattern, udp_socket, Metrics, Server};

/// Who answered a datagram: the serving process and its worker's slot.
type Worker = (u32, usize);

/// `/metrics` of a process that may have exited (then: none).
fn try_scrape(addr: SocketAddr) -> Option<Metrics> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect();
    Some(Metrics(series))
}

/// Every worker's datagrams received, by slot.
fn received(m: &Metrics) -> BTreeMap<usize, u64> {
    m.0.iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("reuseport_worker_accepted_total{worker=\"")?;
            let slot = rest.split('"').next()?.parse().ok()?;
            Some((slot, *v as u64))
        })
        .collect()
}

fn flow_counter(m: &Metrics, which: &str) -> u64 {
    m.count(&format!("reuseport_bpf_flow_{which}_total"), &[])
}

/// The processes serving the group: who answered a datagram is the one
/// worker, among all of theirs, whose count of datagrams moved by one.
struct Processes(Vec<(u32, SocketAddr)>);

impl Processes {
    fn of(servers: &[&Server]) -> Processes {
        Processes(
            servers
                .iter()
                .map(|s| (s.pid(), s.metrics_addr.expect("metrics")))
                .collect(),
        )
    }

    fn counts(&self) -> BTreeMap<Worker, u64> {
        let mut all = BTreeMap::new();
        for &(pid, addr) in &self.0 {
            if let Some(m) = try_scrape(addr) {
                for (slot, n) in received(&m) {
                    all.insert((pid, slot), n);
                }
            }
        }
        all
    }

    /// Sends one datagram of flow `s` to `server` and returns who echoed it
    /// (checking the echo), or an error if it was lost or unattributable.
    fn exchange(&self, s: &UdpSocket, server: SocketAddr, seq: u64) -> Result<Worker, String> {
        let before = self.counts();
        let payload = pattern(48, seq);
        s.send_to(&payload, server)
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf).map_err(|e| format!("no echo: {e}"))?;
        if from != server || buf[..n] != payload[..] {
            return Err(format!("a wrong echo from {from}"));
        }
        let after = self.counts();
        let moved: Vec<Worker> = after
            .iter()
            .filter(|(w, n)| before.get(w).copied().unwrap_or(0) != **n)
            .map(|(w, _)| *w)
            .collect();
        match moved[..] {
            [w] => Ok(w),
            _ => Err(format!("answered by {moved:?}")),
        }
    }
}

/// `n` client sockets, each a flow of its own.
fn flows(n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|_| {
            let s = udp_socket("127.0.0.1:0".parse().unwrap());
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
        .collect()
}

/// Each flow's worker, from one datagram each; panics on a lost echo.
fn serve_all(p: &Processes, server: SocketAddr, flows: &[UdpSocket], seq: u64) -> Vec<Worker> {
    flows
        .iter()
        .enumerate()
        .map(|(i, s)| {
            p.exchange(s, server, seq + i as u64)
                .unwrap_or_else(|e| panic!("flow {i}: {e}"))
        })
        .collect()
}

/// How many flows were answered by another worker than `before` says (or
/// not at all), for the comparison runs.
fn moved(p: &Processes, server: SocketAddr, flows: &[UdpSocket], before: &[Worker]) -> usize {
    flows
        .iter()
        .zip(before)
        .enumerate()
        .filter(|(i, (s, w))| p.exchange(s, server, 9_000 + *i as u64).ok() != Some(**w))
        .count()
}

/// The slot with the most flows in `workers` (the one to drain).
fn busiest(workers: &[Worker]) -> usize {
    let mut per: BTreeMap<usize, usize> = BTreeMap::new();
    for w in workers {
        *per.entry(w.1).or_default() += 1;
    }
    per.into_iter().max_by_key(|&(_, n)| n).unwrap().0
}

fn eventually_in_stderr(server: &Server, text: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if server.stderr().contains(text) {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn udp_flows_keep_their_worker_through_a_drain_while_new_flows_go_to_the_others() {
    netns();
    let server = Server::start(&[
        "--proto",
        "udp",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--flow-timeout",
        "2s",
        "--drain-timeout",
        "60s",
    ]);
    let addr = server.addr;
    let p = Processes::of(&[&server]);
    let old = flows(8);
    let placed = serve_all(&p, addr, &old, 0);
    let drained = busiest(&placed);
    let on_drained = placed.iter().filter(|w| w.1 == drained).count();
    assert!(
        on_drained > 0 && on_drained < old.len(),
        "round robin spread the flows over both workers: {placed:?}"
    );
    let m0 = server.metrics();
    let (code, out, err) = server.ctl(&["drain", &drained.to_string()]);
    assert_eq!(code, 0, "ctl drain: {out}{err}");

    // Well within the flow timeout between two datagrams of a flow.
    let rounds = 4;
    let mut quiet = Instant::now();
    for round in 0..rounds {
        let now = serve_all(&p, addr, &old, 100 * (round + 1));
        quiet = Instant::now();
        assert_eq!(now, placed, "round {round}: every flow kept its worker");
        thread::sleep(Duration::from_millis(300));
    }
    let new = flows(6);
    let new_workers = serve_all(&p, addr, &new, 1_000);
    assert!(
        new_workers.iter().all(|w| w.1 != drained),
        "new flows go to the serving worker, not to the draining {drained}: {new_workers:?}"
    );
    let m1 = server.metrics();
    let hits = flow_counter(&m1, "hit") - flow_counter(&m0, "hit");
    let misses = flow_counter(&m1, "miss") - flow_counter(&m0, "miss");
    assert!(
        hits >= rounds * old.len() as u64,
        "the flow table sent the old flows' datagrams: {hits} hits"
    );
    assert!(
        misses >= new.len() as u64,
        "new flows miss and go by the policy: {misses} misses"
    );
    assert_eq!(
        m1.selected(drained) - m0.selected(drained),
        rounds * on_drained as u64,
        "the program selected the draining worker for its flows only"
    );
    assert_eq!(flow_counter(&m1, "full"), 0, "a large table is never full");

    // The draining worker's flows went quiet: it closes after the flow
    // timeout, long before the drain timeout.
    assert!(
        eventually_in_stderr(
            &server,
            &format!("worker {drained}: its flows are idle: closing"),
            Duration::from_secs(15)
        ),
        "the drained worker closes once its flows are idle:\n{}",
        server.stderr()
    );
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(1_000) && took < Duration::from_secs(15),
        "closed {took:?} after its flows went quiet (flow timeout 2s)"
    );
    // Idle, its flows are new flows now, served by the live worker.
    let after = serve_all(&p, addr, &old, 2_000);
    assert!(after.iter().all(|w| w.1 != drained), "{after:?}");
    println!(
        "drain: {on_drained} of {} flows kept worker {drained} through the drain ({hits} flow-table hits); it closed {took:?} after they went quiet",
        old.len()
    );
}

#[test]
fn under_the_kernel_policy_a_drain_moves_the_drained_workers_flows() {
    netns();
    let server = Server::start(&["--proto", "udp", "--workers", "2", "--policy", "kernel"]);
    let addr = server.addr;
    let p = Processes::of(&[&server]);
    let old = flows(8);
    let placed = serve_all(&p, addr, &old, 0);
    let drained = busiest(&placed);
    let on_drained = placed.iter().filter(|w| w.1 == drained).count();
    let (code, out, err) = server.ctl(&["drain", &drained.to_string()]);
    assert_eq!(code, 0, "ctl drain: {out}{err}");
    assert!(eventually_in_stderr(
        &server,
        &format!("worker {drained}: drained and closed"),
        Duration::from_secs(10)
    ));
    let n = moved(&p, addr, &old, &placed);
    println!(
        "kernel policy: {n} of {} flows changed worker (or were lost) across a drain ({on_drained} were on the drained worker)",
        old.len()
    );
    assert!(
        n >= on_drained,
        "the drained worker's flows cannot stay: its socket closed"
    );
}

#[test]
fn udp_flows_keep_their_process_and_worker_through_a_takeover() {
    netns();
    let first = Server::start(&[
        "--proto",
        "udp",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--flow-timeout",
        "3s",
        "--drain-timeout",
        "60s",
    ]);
    let addr = first.addr;
    let old = flows(8);
    let placed = serve_all(&Processes::of(&[&first]), addr, &old, 0);
    let next = Server::start(&[
        "--takeover",
        &first.group,
        "--workers",
        "2",
        "--flow-timeout",
        "3s",
    ]);
    let p = Processes::of(&[&first, &next]);
    let m0 = next.metrics();
    let rounds = 4;
    let mut quiet = Instant::now();
    for round in 0..rounds {
        let now = serve_all(&p, addr, &old, 100 * (round + 1));
        quiet = Instant::now();
        assert_eq!(
            now, placed,
            "round {round}: every flow kept its process and worker"
        );
        thread::sleep(Duration::from_millis(300));
    }
    let new = flows(6);
    let new_workers = serve_all(&p, addr, &new, 1_000);
    assert!(
        new_workers.iter().all(|w| w.0 == next.pid()),
        "new flows go to the new generation (pid {}): {new_workers:?}",
        next.pid()
    );
    let m1 = next.metrics();
    let hits = flow_counter(&m1, "hit") - flow_counter(&m0, "hit");
    assert!(
        hits >= rounds * old.len() as u64,
        "the new generation's program sent the old flows to the old sockets: {hits} hits"
    );
    for slot in placed.iter().map(|w| w.1) {
        assert!(
            m1.selected(slot) > m0.selected(slot),
            "the new program selected the old worker {slot}"
        );
    }
    // The old flows went quiet: the old process leaves by itself, after
    // the flow timeout and long before its drain timeout.
    let (status, stderr) = first.wait(Duration::from_secs(30));
    let took = quiet.elapsed();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("its flows are idle"), "{stderr}");
    assert!(
        took >= Duration::from_millis(2_000) && took < Duration::from_secs(20),
        "the old process left {took:?} after its flows went quiet (flow timeout 3s)"
    );
    let p = Processes::of(&[&next]);
    let after = serve_all(&p, addr, &old, 2_000);
    assert!(after.iter().all(|w| w.0 == next.pid()), "{after:?}");
    println!(
        "takeover: {} of {} flows kept their old worker through it ({hits} flow-table hits in the new program); the old process left {took:?} after they went quiet",
        old.len(),
        old.len()
    );
}

#[test]
fn under_the_kernel_policy_a_takeover_moves_every_flow() {
    netns();
    let first = Server::start(&["--proto", "udp", "--workers", "2", "--policy", "kernel"]);
    let addr = first.addr;
    let old = flows(8);
    let placed = serve_all(&Processes::of(&[&first]), addr, &old, 0);
    let next = Server::start(&[
        "--takeover",
        &first.group,
        "--workers",
        "2",
        "--policy",
        "kernel",
    ]);
    let p = Processes::of(&[&first, &next]);
    let (status, _) = first.wait(Duration::from_secs(30));
    assert!(status.success());
    let n = moved(&p, addr, &old, &placed);
    println!(
        "kernel policy: {n} of {} flows changed worker (or were lost) across a takeover",
        old.len()
    );
    assert_eq!(n, old.len(), "the old process is gone with its sockets");
}

#[test]
fn a_flow_table_smaller_than_the_flows_counts_each_new_flow_that_evicts_one() {
    netns();
    let size = 4;
    let server = Server::start(&[
        "--proto",
        "udp",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--flow-table-size",
        &size.to_string(),
    ]);
    let addr = server.addr;
    let p = Processes::of(&[&server]);
    let m0 = server.metrics();
    let many = flows(12);
    serve_all(&p, addr, &many, 0);
    let m1 = server.metrics();
    let miss = flow_counter(&m1, "miss") - flow_counter(&m0, "miss");
    let full = flow_counter(&m1, "full") - flow_counter(&m0, "full");
    assert_eq!(miss, many.len() as u64, "every new flow misses");
    assert_eq!(
        full,
        (many.len() - size) as u64,
        "past {size} flows, each new one evicts another"
    );
    // The most recent flow is in the table: its next datagram hits.
    let last = many.last().unwrap();
    let w1 = p.exchange(last, addr, 100).unwrap();
    let w2 = p.exchange(last, addr, 101).unwrap();
    let m2 = server.metrics();
    assert_eq!(flow_counter(&m2, "hit") - flow_counter(&m1, "hit"), 2);
    assert_eq!(w1, w2);
    let (code, out, _) = server.ctl(&["status"]);
    assert_eq!(code, 0);
    println!("{out}");
}

#[test]
fn a_drained_worker_whose_flows_never_go_quiet_closes_at_the_drain_timeout() {
    netns();
    let server = Server::start(&[
        "--proto",
        "udp",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--flow-timeout",
        "60s",
        "--drain-timeout",
        "2s",
    ]);
    let addr = server.addr;
    let p = Processes::of(&[&server]);
    let old = flows(4);
    let placed = serve_all(&p, addr, &old, 0);
    let drained = busiest(&placed);
    let (code, out, err) = server.ctl(&["drain", &drained.to_string()]);
    assert_eq!(code, 0, "ctl drain: {out}{err}");
    let start = Instant::now();
    // The drained worker's flows keep talking: it serves them until the
    // deadline, then closes, and they go by the policy to the live worker.
    let (mut kept, mut lost) = (0, 0);
    let mut seq = 100;
    while !server.stderr().contains("the drain timeout passed") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the drained worker closes at its drain timeout:\n{}",
            server.stderr()
        );
        for (i, s) in old.iter().enumerate() {
            seq += 1;
            match p.exchange(s, addr, seq) {
                Ok(w) if w == placed[i] => kept += 1,
                // The close came during this round: the flow went by the
                // policy to the live worker.
                Ok(w) => assert!(
                    start.elapsed() >= Duration::from_millis(1_500),
                    "flow {i} moved to {w:?} {:?} into a 2s drain",
                    start.elapsed()
                ),
                // A datagram queued on the socket as it closes is lost
                // with it: one per flow at most.
                Err(_) => lost += 1,
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_500),
        "served until its deadline (2s): closed after {took:?}"
    );
    assert!(
        kept >= 3 * old.len(),
        "its flows kept their workers until then ({kept} datagrams)"
    );
    assert!(lost <= old.len(), "{lost} datagrams lost at the close");
    assert!(eventually_in_stderr(
        &server,
        &format!("worker {drained}: drained and closed"),
        Duration::from_secs(5)
    ));
    let after = serve_all(&p, addr, &old, 10_000);
    assert!(after.iter().all(|w| w.1 != drained), "{after:?}");
}
