//! `reuseport`: a kernel-assisted connection balancer.
//!
//! A group of `SO_REUSEPORT` sockets shares one address; an eBPF program of
//! type `BPF_PROG_TYPE_SK_REUSEPORT`, attached to the group, picks the socket
//! (and so the worker) for every new connection or datagram by a policy.
//! Workers are OS threads pinned to CPUs, each running its own
//! current-thread tokio runtime on its own socket.
//!
//! The library is a stack; each layer uses only those below it (no module
//! imports one above it, so there is no import cycle):
//!
//! ```text
//! cli, stats, bench     the binary's front (it uses the public API only)
//! server                serving a group: supervision, drain, shutdown
//! metrics               Prometheus metrics of a served group
//! group                 sockets + program + pins: build, join, close,
//!   (group::takeover)     takeover with other processes' members
//! control               a running group seen through its pins
//! steering              loading and attaching the program
//! echo                  the echo service
//! worker                the thread-per-core workers
//! maps                  typed handles on the pinned maps (the ABI)
//! layout                the maps' layout version, checked before use
//! slots, pins, signals, the slot state machine, where pins live and
//!   socket, sys         whose they are, start-up signals, sockets, the system
//! error                 the errors a caller tells apart
//! policy                policies and their plan (Config <-> Policy codec)
//! proto, balance,       leaves
//!   datagram
//! ```
//!
//! - [`group`]: the sockets and the program attached to them
//! - [`policy`]: the policies and what they become in the program's maps
//! - [`steering`]: loading, attaching and configuring the program
//! - [`worker`]: the thread-per-core workers; [`echo`]: the echo service
//! - [`maps`]: the program's maps; [`control`]: a running group seen
//!   from any process through its pinned maps (`reuseport ctl`, `stats`);
//!   [`pins`]: where those pins live (per network namespace) and whether
//!   their owner runs; [`layout`]: which build's layout they have
//! - [`signals`]: SIGINT/SIGTERM during start-up undo what was made
//! - [`metrics`]: Prometheus metrics; [`server`]: serving a group with a
//!   handler, supervised (`reuseport run` serves the [`echo`] handler)
//! - [`topology`]: the CPU topology the `cpu` policy plans over
//! - [`bench`](mod@bench): `reuseport bench`
//!
//! # Serving a steered group with your own handler
//!
//! ```no_run
//! use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server};
//! use tokio::io::AsyncWriteExt;
//!
//! fn main() -> reuseport::Result<()> {
//!     // One worker per CPU, each on its own socket of the group; the
//!     // program sends each connection to the worker of the CPU it came in on.
//!     let group = Group::builder()
//!         .addr("0.0.0.0:8080".parse().unwrap())
//!         .policy(Policy::new(PolicyKind::Cpu))
//!         .build()?;
//!     let handle = group.handle();
//!     let server = Server::start_tcp(
//!         group,
//!         |mut stream: tokio::net::TcpStream, conn: Conn| async move {
//!             let hello = format!("hello from worker {}\n", conn.worker.worker);
//!             stream.write_all(hello.as_bytes()).await
//!         },
//!         ServeOptions::default(),
//!     )?;
//!     // Later, from any thread: another policy, without a restart.
//!     handle.set_policy(&Policy::new(PolicyKind::RoundRobin))?;
//!     println!("{:?}", handle.counters()?.selected);
//!     // Stop accepting, detach, drain, unpin.
//!     server.shutdown()?;
//!     Ok(())
//! }
//! ```
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
//!             let _ = reuseport::sys::pin_current_thread(cpu);
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

pub mod balance;
pub mod bench;
pub mod cli;
pub mod control;
pub mod datagram;
pub mod echo;
pub mod error;
pub mod features;
pub mod group;
pub mod layout;
pub mod maps;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod proto;
pub mod server;
pub mod signals;
pub mod slots;
pub mod socket;
pub mod stats;
pub mod steering;
pub mod sys;
pub mod topology;
pub mod worker;

pub use error::{Error, Result};
pub use group::{Group, GroupBuilder, GroupHandle, Member};
pub use policy::{HashKey, Policy, PolicyKind};
pub use server::{ServeOptions, Server};
pub use socket::Proto;
pub use worker::{Conn, Limits};
