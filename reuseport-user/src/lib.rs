//! `reuseport`: a kernel-assisted connection balancer.
//!
//! A group of `SO_REUSEPORT` sockets shares one address; an eBPF program of
//! type `BPF_PROG_TYPE_SK_REUSEPORT`, attached to the group, picks the socket
//! (and so the worker) for every new connection or datagram by a policy.
//! Workers are OS threads pinned to CPUs, each running its own
//! current-thread tokio runtime on its own socket.
//!
//! The public surface is what this page lists: the types at the crate's
//! root ([`Group`] and its builder and handle, [`Policy`], [`Server`] and
//! its options, the handler's [`Conn`] and [`WorkerInfo`], [`Control`] for
//! a running group seen from another process (and [`Control::cleanup`] for
//! dead ones), [`SlotState`], [`Error`]), and the modules [`server`]
//! (signals), [`echo`] (the echo service) and [`cookie`] (cookies a UDP
//! server mints to keep its flows on their worker). The modules behind them
//! are internal: private, unless the `internals` feature is on, which only
//! the `reuseport-cli` crate's benchmark and this workspace's tests turn on
//! (it makes them reachable, still hidden from the documentation, and
//! promises nothing: they may change in any release). They form a stack;
//! each layer uses only
//! those below it:
//!
//! ```text
//! server                serving a group: supervision, drain, shutdown
//! metrics               Prometheus metrics of a served group
//! group                 sockets + program + pins: build, join, close,
//!   (group::takeover)     takeover with other processes' members
//! control               a running group seen through its pins
//! steering              loading and attaching the program
//! objects               the eBPF objects (production; test, by feature)
//! echo                  the echo service
//! worker                the thread-per-core workers
//! maps                  typed handles on the pinned maps (the ABI)
//! layout                the maps' layout version, checked before use
//! slots, pins, signals, the slot state machine, where pins live and
//!   socket, sys,        whose they are, start-up signals, sockets, the system,
//!   features              what the kernel's BPF offers
//! error                 the errors a caller tells apart
//! policy                policies and their plan (Config <-> Policy codec)
//! topology              the CPUs' caches and NUMA nodes, for the cpu plan
//! proto, balance,       leaves
//!   datagram
//! ```
//!
//! The `reuseport` command line and the `reuseport-bench` benchmark live in
//! the crate `reuseport-cli`, on top of this library.
//!
//! # Serving a steered group with your own handler
//!
//! From inside your own runtime: one handler per worker, made on the
//! worker's thread (it need not be `Send`), and an orderly shutdown that
//! does not block the runtime.
//!
//! ```no_run
//! use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server, WorkerInfo};
//! use tokio::io::AsyncWriteExt;
//!
//! #[tokio::main]
//! async fn main() -> reuseport::Result<()> {
//!     // One worker per CPU, each on its own socket of the group; the
//!     // program sends each connection to the worker of the CPU it came in on.
//!     let group = Group::builder()
//!         .addr("0.0.0.0:8080".parse().unwrap())
//!         .policy(Policy::new("cpu".parse::<PolicyKind>().unwrap()))
//!         .build()?;
//!     let handle = group.handle();
//!     let server = Server::start_tcp_with(
//!         group,
//!         |me: &WorkerInfo| {
//!             // This worker's own state, on its own thread.
//!             let served = std::rc::Rc::new(std::cell::Cell::new(0u64));
//!             let me = *me;
//!             move |mut stream: tokio::net::TcpStream, _conn: Conn| {
//!                 served.set(served.get() + 1);
//!                 let hello = format!("hello #{} from worker {}\n", served.get(), me.worker);
//!                 async move { stream.write_all(hello.as_bytes()).await }
//!             }
//!         },
//!         ServeOptions::default(),
//!     )?;
//!     // Any time, from any thread: another policy, without a restart.
//!     handle.set_policy(&Policy::new(PolicyKind::RoundRobin))?;
//!     println!("{:?}", handle.counters()?.selected);
//!     // Until SIGINT or SIGTERM; then stop accepting, detach, drain, unpin.
//!     server
//!         .run(async {
//!             let _ = reuseport::server::signalled().await;
//!         })
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! Without a runtime of your own, [`Server::start_tcp`] with one shared
//! handler, and [`Server::shutdown`] or
//! [`server::serve_until_signalled`], which block.
//!
//! A UDP server of your own per worker (a QUIC endpoint, say) takes its
//! worker's socket, cookie [`Minter`](cookie::Minter) and drain signal
//! from [`Server::start_udp_with`]; `examples/quic_echo.rs` runs quinn that
//! way.
//!
//! Nothing process- or system-wide changes unless asked: see
//! [`ServeOptions::raise_fd_limit`], [`GroupBuilder::mount_bpffs`] and
//! [`GroupBuilder::tcp_migrate_req`].
//!
//! # Running your own workers on the group's listeners
//!
//! ```no_run
//! use reuseport::{Group, Policy, PolicyKind};
//!
//! fn main() -> reuseport::Result<()> {
//!     let group = Group::builder()
//!         .addr("127.0.0.1:9000".parse().unwrap())
//!         .policy(Policy::new(PolicyKind::RoundRobin))
//!         .build()?;
//!     let mut threads = Vec::new();
//!     for member in group.members() {
//!         // A std listener (or `tokio_tcp_listener()` inside a runtime).
//!         let (listener, cpu) = (member.tcp_listener()?, member.cpu);
//!         threads.push(std::thread::spawn(move || {
//!             let _ = reuseport::pin_current_thread(cpu);
//!             listener.set_nonblocking(false).ok();
//!             for stream in listener.incoming().take(100) {
//!                 drop(stream);
//!             }
//!         }));
//!     }
//!     for t in threads {
//!         let _ = t.join();
//!     }
//!     // In order: your workers stopped accepting; now take the group's
//!     // sockets out of the policy, detach the program, close, unpin.
//!     group.close()
//! }
//! ```
#![deny(missing_docs)]

/// Declares internal modules: private, unless the `internals` feature (for
/// this workspace's benchmark and tests only, with no stability promise)
/// makes them reachable, still hidden from the documentation.
macro_rules! internal {
    ($($module:ident),* $(,)?) => {
        $(
            #[cfg(feature = "internals")]
            #[doc(hidden)]
            pub mod $module;
            #[cfg(not(feature = "internals"))]
            mod $module;
        )*
    };
}

internal!(
    balance, control, error, features, group, maps, metrics, objects, pins, policy, socket,
    steering, sys, topology, worker,
);
pub mod cookie;
mod datagram;
pub mod echo;
mod layout;
mod proto;
pub mod server;
mod signals;
mod slots;

pub use balance::{balance, Balance};
pub use control::{Control, Removed, SlotStatus, Status};
pub use echo::EchoOptions;
pub use error::{Error, Result};
pub use group::{Group, GroupBuilder, GroupHandle, Member, Role, DEFAULT_BACKLOG};
pub use maps::BpfCounters;
pub use policy::{HashKey, ParseError, Policy, PolicyError, PolicyKind};
pub use proto::Proto;
pub use reuseport_common::WorkerRecord;
pub use server::{FlowCounter, OpenFlow, ServeOptions, Server, UdpWorker};
pub use slots::SlotState;
pub use sys::pin_current_thread;
pub use worker::{Conn, DatagramHandler, Limits, WorkerInfo};
