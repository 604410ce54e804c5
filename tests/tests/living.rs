//! A living group: workers added and drained, other processes joining,
//! listeners closing with connections queued, rolling restarts, and other
//! users kept out. Nothing a client does may fail along the way.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use nix::sys::signal::Signal;
use reuseport_tests::{
    binary, cpus_at_least, eventually, netns, pattern, pin_to_cpu, reuseport, tcp_once,
    DropPureAcks, Load, Metrics, Server,
};

fn state_of(server: &Server, slot: u32) -> String {
    let (_, out, _) = server.ctl(&["status"]);
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 8 && f[0] == slot.to_string())
        .map(|f| f[2].to_string())
        .unwrap_or_else(|| "absent".into())
}

fn accepted(m: &Metrics, worker: u32) -> u64 {
    m.get(
        "reuseport_worker_accepted_total",
        &[("worker", &worker.to_string())],
    )
    .unwrap_or(0.0) as u64
}

fn assert_clean(load: Load, what: &str) -> u64 {
    let (ok, failures) = load.stop();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} connections failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "{what}: the load ran ({ok} connections)");
    ok
}

#[test]
fn workers_added_and_drained_under_load_lose_nothing() {
    netns();
    let server = Server::start(&[
        "--policy",
        "round-robin",
        "--workers",
        "2",
        "--drain-timeout",
        "20s",
    ]);
    // A long-lived connection on worker 0, to see a drain wait for it.
    let mut held = TcpStream::connect(server.addr).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.write_all(b"first").unwrap();
    let mut buf = [0u8; 5];
    held.read_exact(&mut buf).unwrap();
    let held_on: u32 = if server.metrics().active(0) == 1 {
        0
    } else {
        1
    };

    let load = Load::start(server.addr, 4);
    thread::sleep(Duration::from_millis(300));

    let (code, out, err) = server.ctl(&["add-worker", "--cpu", "0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("group {}: worker 2 added on CPU 0", server.group)
    );
    assert!(
        eventually(Duration::from_secs(5), || accepted(&server.metrics(), 2)
            > 20),
        "the new worker takes its share at once"
    );

    let (code, _, err) = server.ctl(&["drain", &held_on.to_string()]);
    assert_eq!(code, 0, "{err}");
    // It still has the held connection: draining, not gone, and no new work.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(state_of(&server, held_on), "draining");
    let frozen = server.metrics();
    thread::sleep(Duration::from_millis(500));
    let now = server.metrics();
    assert_eq!(
        accepted(&now, held_on),
        accepted(&frozen, held_on),
        "a draining worker gets no new connections"
    );
    assert_eq!(
        now.empty_slot(),
        frozen.empty_slot(),
        "the policy left it out (its slot is not even picked)"
    );
    // Its open connection is still served to the end; then it closes.
    held.write_all(b"still").unwrap();
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || state_of(&server, held_on)
            == "gone"),
        "drained and closed"
    );

    // Drain the added worker too; the last one then refuses to go.
    let (code, _, err) = server.ctl(&["drain", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(eventually(Duration::from_secs(5), || state_of(&server, 2) == "gone"));
    let last = 1 - held_on;
    let (code, _, err) = server.ctl(&["drain", &last.to_string()]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!("error: worker {last} is the last one serving: stop the group instead")
    );
    let (code, _, err) = server.ctl(&["drain", "2"]);
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "error: worker 2 is not serving (it is gone)");

    thread::sleep(Duration::from_millis(300));
    assert_clean(load, "add and drain under load");
    let m = server.metrics();
    assert_eq!(m.fallback(), 0);
}

/// For each of `clients` addresses, the worker that serves it.
fn placement(server: &Server, workers: usize, clients: u32) -> Vec<usize> {
    (1..=clients)
        .map(|i| {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x7f30_0000 + i)), 0);
            server
                .served_by(workers, || tcp_once(src, server.addr, b"key"))
                .0
        })
        .collect()
}

#[test]
fn consistent_moves_exactly_the_keys_of_a_drained_or_added_worker() {
    netns();
    let server = Server::start(&["--policy", "consistent", "--workers", "4"]);
    let before = placement(&server, 4, 200);
    let (code, _, err) = server.ctl(&["drain", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(eventually(Duration::from_secs(5), || state_of(&server, 2) == "gone"));
    // The policy was rebuilt without it: no pick lands on its empty slot
    // (which the program would only skip).
    let skipped = server.metrics().empty_slot();
    let after = placement(&server, 4, 200);
    assert_eq!(
        server.metrics().empty_slot(),
        skipped,
        "the table left it out"
    );
    for i in 0..before.len() {
        if before[i] == 2 {
            assert_ne!(after[i], 2, "client {i} still on the drained worker");
        } else {
            assert_eq!(
                after[i], before[i],
                "client {i} of a remaining worker moved"
            );
        }
    }
    let moved = (0..before.len()).filter(|&i| before[i] != after[i]).count();

    let (code, out, err) = server.ctl(&["add-worker"]);
    assert_eq!(code, 0, "{err}");
    let added: usize = out.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(added, 2, "the freed slot is reused: {out}");
    let again = placement(&server, 4, 200);
    assert_eq!(server.metrics().empty_slot(), skipped);
    for i in 0..after.len() {
        assert!(
            again[i] == after[i] || again[i] == added,
            "client {i} moved between old workers"
        );
    }
    let joined = (0..after.len()).filter(|&i| again[i] != after[i]).count();
    println!(
        "consistent, live: draining 1 of 4 moved {:.1} % of clients (exactly its own); adding one moved {:.1} %, all to it",
        moved as f64 / 2.0,
        joined as f64 / 2.0
    );
    assert!(joined > 20, "the added worker takes a share: {joined}");
}

#[test]
fn a_second_process_joins_serves_and_leaves() {
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let load = Load::start(server.addr, 3);
    let mut join = reuseport_tests::reuseport_command();
    join.args([
        "join",
        "--group",
        &server.group,
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let joined = Server::spawn(&mut join).expect("join starts");
    assert!(
        joined.banner.iter().any(|l| l == "worker 2: slot 2, cpu 0"),
        "{:?}",
        joined.banner
    );
    assert!(
        // A bound, not a speed: under emulation (the VM cells) the load's
        // connections come slowly.
        eventually(Duration::from_secs(30), || accepted(&joined.metrics(), 2)
            > 30),
        "the joined process serves its share (its own counters)"
    );
    assert_eq!(
        joined.metrics().policy(),
        "round-robin",
        "a joined process reports the owner's policy"
    );
    let (_, status, _) = server.ctl(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.trim_start().starts_with("2 ") && l.contains("serving")),
        "{status}"
    );
    let (code, err) = joined.stop();
    assert!(code.success(), "{err}");
    assert!(eventually(Duration::from_secs(5), || state_of(&server, 2) == "gone"));
    let frozen = accepted(&server.metrics(), 2);
    let skipped = server.metrics().empty_slot();
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        server.metrics().empty_slot(),
        skipped,
        "the policy was rebuilt without the departed slot"
    );
    assert_eq!(
        accepted(&server.metrics(), 2),
        frozen,
        "nothing goes to the departed slot"
    );
    assert_clean(load, "join and leave under load");
    assert_eq!(server.metrics().fallback(), 0);
}

/// Connections queued in a listener's accept queue and half-open ones
/// (the kernel's migrate_reuseport selftest): the listener closes, and
/// every one of them is still accepted and echoed by a live worker.
#[test]
fn queued_and_half_open_connections_move_when_a_listener_closes() {
    netns();
    let cpus = cpus_at_least(
        2,
        "worker 1's queue fills from its own CPU under the cpu policy",
    );
    let server = Server::start(&[
        "--policy",
        "cpu",
        "--workers",
        "2",
        "--max-connections",
        "1",
    ]);
    let addr = server.addr;
    let cpu1 = cpus[1];
    // Worker 1 takes one connection and is then at its limit: the next
    // connections from its CPU complete their handshake and wait in its
    // accept queue.
    let (held, queued) = thread::spawn(move || {
        pin_to_cpu(cpu1);
        let mut held = TcpStream::connect(addr).unwrap();
        held.write_all(b"x").unwrap();
        let mut b = [0u8];
        held.read_exact(&mut b).unwrap();
        let queued: Vec<TcpStream> = (0..8u8)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&[i; 10]).unwrap();
                s
            })
            .collect();
        (held, queued)
    })
    .join()
    .unwrap();
    // And handshakes whose last ACK never arrives stay half-open.
    let drop_acks = DropPureAcks::to_port(addr.port());
    let half_open: Vec<TcpStream> = thread::spawn(move || {
        pin_to_cpu(cpu1);
        (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect()
    })
    .join()
    .unwrap();
    let before = server.metrics();
    assert_eq!(before.accepted(1), 1);

    let (code, _, err) = server.ctl(&["drain", "1"]);
    assert_eq!(code, 0, "{err}");
    // Worker 1's listener closes: its queue moves to worker 0.
    for (i, mut s) in queued.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 10];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("queued connection {i}: {e}"));
        assert_eq!(got, [i as u8; 10]);
    }
    // The half-open ones complete with their first data, on worker 0.
    for (i, mut s) in half_open.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let p = pattern(20, i as u64);
        s.write_all(&p).unwrap();
        let mut got = vec![0u8; 20];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("half-open connection {i}: {e}"));
        assert_eq!(got, p);
    }
    drop(drop_acks);
    let after = server.metrics();
    assert_eq!(
        after.accepted(0) - before.accepted(0),
        12,
        "worker 0 took all 12"
    );
    assert_eq!(after.accepted(1), 1, "worker 1 accepted nothing more");
    let migrated = after.count("reuseport_bpf_migrated_total", &[]);
    assert!(
        migrated >= 12,
        "the program placed each moved connection: {migrated}"
    );
    drop(held);
}

#[test]
fn rolling_restarts_under_load_lose_no_connection() {
    netns();
    let first = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let group = first.group.clone();
    let addr = first.addr;
    let load = Load::start(addr, 4);
    thread::sleep(Duration::from_millis(400));
    let mut current = first;
    for generation in 1..=3 {
        let next = Server::try_start(&["--takeover", &group, "--workers", "2"])
            .unwrap_or_else(|f| panic!("generation {generation}: {}", f.stderr));
        assert_eq!(next.addr, addr);
        let old_pid = current.pid();
        let (status, stderr) = current.wait(Duration::from_secs(30));
        assert!(
            status.success(),
            "generation {} exits cleanly: {stderr}",
            generation - 1
        );
        assert!(stderr.contains("taken over"), "{stderr}");
        assert!(
            eventually(Duration::from_secs(5), || next
                .stderr()
                .contains(&format!("took over group {group} from pid {old_pid}"))),
            "{}",
            next.stderr()
        );
        thread::sleep(Duration::from_millis(300));
        current = next;
        current.group = group.clone();
    }
    let ok = assert_clean(load, "three rolling restarts");
    println!("rolling restarts: {ok} connections, none failed");
    assert!(
        ok >= 3_000,
        "several thousand connections across the restarts: {ok}"
    );
    let (code, out, err) = reuseport(&["ctl", "--group", &group, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("pid {}", current.pid())), "{out}");
    let (status, _) = current.stop();
    assert!(status.success());
}

#[test]
fn another_user_cannot_join_or_steer_the_group() {
    netns();
    let server = Server::start(&["--policy", "cpu"]);
    // `nobody`, even with the BPF capabilities, is not the group's owner.
    let as_nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args([
                "--inh-caps=+bpf,+net_admin",
                "--ambient-caps=+bpf,+net_admin",
            ])
            .arg(binary())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = as_nobody(&["join", "--group", &server.group]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        format!(
            "error: cannot open group {}'s pinned maps: permission denied (they belong to uid 0; only the group's owner may join or steer it)",
            server.group
        )
    );
    let (code, err) = as_nobody(&["ctl", "--group", &server.group, "policy", "round-robin"]);
    assert_eq!(code, 1);
    assert!(err.contains("permission denied"), "{err}");
    // And the kernel keeps it off the port: a socket of another user cannot
    // join the reuseport group (EADDRINUSE).
    let addr = server.addr.to_string();
    let (code, err) = as_nobody(&["run", "--addr", &addr, "--policy", "kernel"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().next().unwrap(),
        format!("error: tcp {addr} is in use by a socket without SO_REUSEPORT or of another user (EADDRINUSE)")
    );
    assert_eq!(server.metrics().policy(), "cpu");
}

/// UDP has no listener to protect the port: a socket with SO_REUSEADDR may
/// bind an address that other SO_REUSEADDR sockets hold, whoever owns them.
/// So the group's UDP members must not set it, or any local user could bind
/// the group's port and read its datagrams, and any socket of ours bound to
/// port 0 could be given the group's port and answer its own datagrams.
#[test]
fn no_other_socket_can_bind_a_udp_groups_port() {
    netns();
    let server = Server::start(&[
        "--proto",
        "udp",
        "--policy",
        "round-robin",
        "--workers",
        "3",
    ]);
    let bind = |user: Option<&str>, reuseaddr: bool| {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, {})\n\
             try:\n    s.bind(('{}', {}))\n    print('bound')\n\
             except OSError as e:\n    print(e.errno)\n",
            u8::from(reuseaddr),
            server.addr.ip(),
            server.addr.port()
        );
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([&format!("--reuid={u}"), "--regid=nogroup", "--clear-groups"])
                    .arg(reuseport_tests::system_python());
                c
            }
            None => Command::new(reuseport_tests::system_python()),
        };
        let out = cmd.args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let eaddrinuse = libc::EADDRINUSE.to_string();
    assert_eq!(
        bind(Some("nobody"), true),
        eaddrinuse,
        "another user, SO_REUSEADDR"
    );
    assert_eq!(bind(Some("nobody"), false), eaddrinuse, "another user");
    assert_eq!(
        bind(None, true),
        eaddrinuse,
        "the owner's user, SO_REUSEADDR"
    );
    // And every datagram still reaches a worker, chosen by the program.
    let before = server.metrics();
    for i in 0..20 {
        let payload = pattern(32, i);
        assert_eq!(
            reuseport_tests::udp_exchange("127.0.0.1:0".parse().unwrap(), server.addr, &payload),
            payload
        );
    }
    let after = server.metrics();
    let accepted: u64 = (0..3)
        .map(|w| accepted(&after, w) - accepted(&before, w))
        .sum();
    assert_eq!(accepted, 20, "every datagram was served by a worker");
}

#[test]
fn a_group_without_a_program_turns_on_listener_migration_while_it_runs() {
    netns();
    let read = || {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read(), "0", "a fresh namespace starts at 0");
    let server = Server::start(&["--policy", "kernel"]);
    assert_eq!(read(), "1");
    assert!(
        server
            .stderr()
            .contains("set net.ipv4.tcp_migrate_req to 1 (was 0)"),
        "{}",
        server.stderr()
    );
    server.signal(Signal::SIGTERM);
    let (status, stderr) = server.wait(Duration::from_secs(10));
    assert!(status.success());
    assert!(
        stderr.contains("restored net.ipv4.tcp_migrate_req to 0"),
        "{stderr}"
    );
    assert_eq!(read(), "0");
}

/// The owner stops while another process's workers serve the group: they
/// go on serving, steered by the program under the policy in force (not
/// the kernel's hash), and no client sees a failure on the way.
#[test]
fn the_owner_leaves_and_a_joined_process_serves_on_under_the_policy() {
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let mut join = reuseport_tests::reuseport_command();
    join.args([
        "join",
        "--group",
        &server.group,
        "--workers",
        "2",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let joined = Server::spawn(&mut join).expect("join starts");
    let load = Load::start(server.addr, 3);
    assert!(
        eventually(Duration::from_secs(5), || accepted(&joined.metrics(), 3)
            > 30),
        "the joined process serves its share"
    );
    let (code, err) = server.stop();
    assert!(code.success(), "{err}");
    assert!(
        err.contains("worker(s) of other processes go on serving"),
        "{err}"
    );
    let before = joined.metrics();
    thread::sleep(Duration::from_secs(1));
    let after = joined.metrics();
    let moved = reuseport_tests::selected_delta(&before, &after, 4);
    assert_eq!(
        moved[..2],
        [0, 0],
        "nothing is steered to the owner's slots"
    );
    assert!(moved[2] > 10 && moved[3] > 10, "{moved:?}");
    // The counters are read slot by slot while the load runs: a connection
    // selected between two reads shows in one scrape only.
    assert!(
        moved[2].abs_diff(moved[3]) <= 2,
        "still round-robin between the joined workers: {moved:?}"
    );
    assert_eq!(after.fallback(), 0, "the program chose every connection");
    assert_clean(load, "the owner leaves under load");
    let (code, err) = joined.stop();
    assert!(code.success(), "{err}");
}
