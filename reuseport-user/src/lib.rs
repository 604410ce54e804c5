//! `reuseport`: a kernel-assisted connection balancer.
//!
//! A group of `SO_REUSEPORT` sockets shares one address; an eBPF program of
//! type `BPF_PROG_TYPE_SK_REUSEPORT`, attached to the group, picks the socket
//! (and so the worker) for every new connection or datagram by a policy.
//! Workers are OS threads pinned to CPUs, each running its own
//! current-thread tokio runtime on its own socket.
//!
//! - [`group`]: the sockets and the program attached to them
//! - [`policy`]: the policies and what they become in the program's maps
//! - [`steering`]: loading, attaching and configuring the program
//! - [`worker`]: the thread-per-core workers; [`echo`]: the echo service
//! - [`maps`]: the program's maps; [`control`]: a running group seen
//!   from any process through its pinned maps (`reuseport ctl`, `stats`)
//! - [`metrics`]: Prometheus metrics; [`server`]: `reuseport run`
#![deny(missing_docs)]

pub mod balance;
pub mod bench;
pub mod cli;
pub mod control;
pub mod datagram;
pub mod echo;
pub mod error;
pub mod group;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod socket;
pub mod stats;
pub mod steering;
pub mod sys;
pub mod worker;

pub use error::{Error, Result};
pub use group::Group;
pub use policy::{HashKey, Policy, PolicyKind};
pub use socket::Proto;
