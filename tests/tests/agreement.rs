//! Property: the program and the user-space reference agree. For random
//! seeds, worker counts, keys and client addresses, the worker a crafted
//! connection reaches is the one `reuseport_common::hash` predicts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;
use reuseport_common::{hash::hash_addrs, key};
use reuseport_tests::{netns, tcp_once, Server};

fn client() -> impl Strategy<Value = SocketAddr> {
    // 127.x.y.z with z not 0 or 255, and a fixed port in the unprivileged
    // range (connections close with a reset, so a port can come again).
    (1u8..255, any::<u8>(), 1u8..255, 20_000u16..60_000)
        .prop_map(|(a, b, c, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, a, b, c)), port))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn the_program_picks_the_worker_user_space_predicts(
        seed in any::<u32>(),
        workers in 1usize..=4,
        four_tuple in any::<bool>(),
        clients in proptest::collection::vec(client(), 6),
    ) {
        netns();
        let (kind, name) = if four_tuple { (key::FOUR_TUPLE, "four-tuple") } else { (key::SRC_IP, "src-ip") };
        let seed_arg = seed.to_string();
        let workers_arg = workers.to_string();
        let server = Server::start(&["--policy", "hash", "--hash-key", name, "--seed", &seed_arg, "--workers", &workers_arg]);
        for src in clients {
            let (w, local) = server.served_by(workers, || tcp_once(src, server.addr, b"agree"));
            let predicted = hash_addrs(kind, seed, local, server.addr).unwrap() % workers as u32;
            prop_assert_eq!(w as u32, predicted, "{} from {} with seed {}", name, local, seed);
        }
    }
}
