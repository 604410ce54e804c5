//! IPv6 groups, and dual-stack groups that serve IPv4 clients too.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::Command,
    thread,
};

use reuseport_common::{hash::hash_addrs, key};
use reuseport_tests::{
    accepted_delta, assert_placed_by_program, connect_from, cpus_at_least, echo_on, netns, pattern,
    pin_to_cpu, reset, selected_delta, udp_exchange, Server,
};

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One request from `src` to `server` over `proto`, checked byte for byte.
fn exchange(proto: Proto, src: SocketAddr, server: SocketAddr, payload: &[u8]) {
    match proto {
        Proto::Tcp => {
            let s = connect_from(src, server);
            assert_eq!(echo_on(s.try_clone().unwrap(), payload), payload);
            reset(s);
        }
        Proto::Udp => assert_eq!(udp_exchange(src, server, payload), payload),
    }
}

fn served_by(server: &Server, proto: Proto, src: SocketAddr, workers: usize) -> usize {
    server
        .served_by(workers, || exchange(proto, src, server.addr, b"v6"))
        .0
}

fn start(proto: Proto, addr: &str, args: &[&str]) -> Server {
    let mut full = vec!["--proto", proto.name(), "--addr", addr];
    full.extend(args);
    Server::start(&full)
}

/// Client addresses fd00::1.. on lo (a fresh namespace only has ::1).
fn v6_clients(n: u16) -> Vec<IpAddr> {
    (1..=n)
        .map(|i| {
            let a = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i);
            let st = Command::new("ip")
                .args([
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ])
                .status()
                .unwrap();
            assert!(st.success());
            IpAddr::V6(a)
        })
        .collect()
}

const V6_ANY_PORT: &str = "[::1]:0";

#[test]
fn cpu_steering_over_ipv6() {
    netns();
    for proto in [Proto::Tcp, Proto::Udp] {
        let cpus = cpus_at_least(2, "each CPU's traffic must reach a different worker");
        // Each datagram by the policy: without a flow table, which would
        // keep a client port the OS hands out again within the flow
        // timeout on the worker that served it first.
        let server = start(
            proto,
            V6_ANY_PORT,
            &["--policy", "cpu", "--flow-table-size", "0"],
        );
        let n = cpus.len();
        for (worker, cpu) in cpus.into_iter().enumerate() {
            let before = server.metrics();
            let addr = server.addr;
            thread::spawn(move || {
                pin_to_cpu(cpu);
                for i in 0..50 {
                    exchange(proto, "[::1]:0".parse().unwrap(), addr, &pattern(20, i));
                }
            })
            .join()
            .unwrap();
            let mut expect = vec![0; n];
            expect[worker] = 50;
            let after = server.metrics();
            assert_eq!(
                accepted_delta(&before, &after, n),
                expect,
                "{proto:?} from CPU {cpu}"
            );
            assert_placed_by_program(
                &selected_delta(&before, &after, n),
                &expect,
                &format!("{proto:?} from CPU {cpu}: chosen by the program"),
            );
        }
    }
}

#[test]
fn hash_over_ipv6_puts_each_client_on_its_predicted_worker() {
    netns();
    let clients = v6_clients(24);
    for proto in [Proto::Tcp, Proto::Udp] {
        let server = start(
            proto,
            V6_ANY_PORT,
            &["--policy", "hash", "--workers", "3", "--seed", "5"],
        );
        let mut used = [0; 3];
        for ip in &clients {
            let src = SocketAddr::new(*ip, 0);
            let w = served_by(&server, proto, src, 3);
            let predicted = hash_addrs(key::SRC_IP, 5, src, server.addr).unwrap() % 3;
            assert_eq!(w, predicted as usize, "{proto:?} client {ip}");
            used[w] += 1;
        }
        assert!(used.iter().all(|&n| n > 0), "{proto:?}: {used:?}");
    }
}

#[test]
fn round_robin_over_ipv6() {
    netns();
    for proto in [Proto::Tcp, Proto::Udp] {
        let server = start(
            proto,
            V6_ANY_PORT,
            // Each datagram by the policy (see cpu_steering_over_ipv6).
            &[
                "--policy",
                "round-robin",
                "--workers",
                "3",
                "--flow-table-size",
                "0",
            ],
        );
        let seq: Vec<usize> = (0..12)
            .map(|_| served_by(&server, proto, "[::1]:0".parse().unwrap(), 3))
            .collect();
        for pair in seq.windows(2) {
            assert_eq!(pair[1], (pair[0] + 1) % 3, "{proto:?}: {seq:?}");
        }
    }
}

#[test]
fn a_dual_stack_group_keys_ipv4_clients_by_their_mapped_address() {
    netns();
    let clients = v6_clients(8);
    for proto in [Proto::Tcp, Proto::Udp] {
        let server = start(
            proto,
            "[::]:0",
            &["--policy", "hash", "--workers", "4", "--seed", "9"],
        );
        let port = server.addr.port();
        for i in 1..=24u8 {
            // An IPv4 client reaching the [::] group: the program reads an
            // IPv4 header and keys it as ::ffff:127.0.3.i.
            let src: SocketAddr = format!("127.0.3.{i}:0").parse().unwrap();
            let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let before = server.metrics();
            exchange(proto, src, dst, b"v4 in v6");
            let delta = accepted_delta(&before, &server.metrics(), 4);
            let w = delta.iter().position(|&d| d == 1).expect("served");
            let predicted = hash_addrs(key::SRC_IP, 9, src, dst).unwrap() % 4;
            assert_eq!(w, predicted as usize, "{proto:?} IPv4 client {src}");
        }
        for ip in &clients {
            let src = SocketAddr::new(*ip, 0);
            let dst = SocketAddr::new("::1".parse().unwrap(), port);
            let before = server.metrics();
            exchange(proto, src, dst, b"v6");
            let delta = accepted_delta(&before, &server.metrics(), 4);
            let w = delta.iter().position(|&d| d == 1).expect("served");
            let predicted = hash_addrs(key::SRC_IP, 9, src, dst).unwrap() % 4;
            assert_eq!(w, predicted as usize, "{proto:?} IPv6 client {src}");
        }
    }
}
