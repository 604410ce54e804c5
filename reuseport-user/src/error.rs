//! Errors a caller of the library may want to tell apart.
//!
//! Each variant's message is one line that says what went wrong and what to
//! do; the verifier's log, which is many lines, is carried separately in
//! [`Error::Verifier`] for the caller to print below that line.

use std::{io, net::SocketAddr};

use crate::proto::Proto;

/// Everything that can go wrong building, steering or running a group.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A group was built without an address.
    #[error("the group has no address: give one with GroupBuilder::addr")]
    NoAddress,

    /// The process lacks the capabilities to load or steer with BPF.
    #[error("{action} needs CAP_BPF and CAP_NET_ADMIN (or root); this process lacks {missing}")]
    NoPrivilege {
        /// What was being attempted.
        action: &'static str,
        /// The capabilities that are missing, e.g. `CAP_BPF`.
        missing: String,
    },

    /// The address is taken by a socket that cannot share it with us.
    #[error(
        "{proto} {addr} is in use by a socket without SO_REUSEPORT or of another user (EADDRINUSE)"
    )]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
        /// TCP or UDP.
        proto: Proto,
    },

    /// Another reuseport group of this user already serves the address; our
    /// sockets would silently join it and take over its steering.
    #[error(
        "{proto} {addr} is already served by another reuseport group of this user ({count} socket(s)); stop it first"
    )]
    GroupExists {
        /// The address asked for.
        addr: SocketAddr,
        /// TCP or UDP.
        proto: Proto,
        /// How many sockets that group has.
        count: usize,
    },

    /// The running kernel lacks something the program needs (found by
    /// probing it at load time).
    #[error("this kernel (Linux {found}) is too old for {feature}: it lacks {missing}")]
    KernelTooOld {
        /// The running kernel's release.
        found: String,
        /// Each missing feature with the release that brought it.
        missing: String,
        /// What needs it.
        feature: &'static str,
    },

    /// The kernel's verifier refused the program.
    #[error("the kernel's verifier rejected BPF program `{program}` ({source}); its log follows")]
    Verifier {
        /// Name of the program.
        program: String,
        /// The error of `BPF_PROG_LOAD`.
        source: io::Error,
        /// The verifier's log.
        log: String,
    },

    /// A worker count outside what the socket map holds.
    #[error("a group takes between 1 and {max} workers, not {requested}")]
    WorkerCount {
        /// The count asked for.
        requested: usize,
        /// The socket map's size.
        max: u32,
    },

    /// A CPU the group's owner may not run on.
    #[error("CPU {cpu}: the group's owner may only run on CPUs {usable}")]
    NoSuchCpu {
        /// The CPU asked for.
        cpu: usize,
        /// The owner's usable CPUs, comma-separated.
        usable: String,
    },

    /// A group name that cannot be a directory name under bpffs.
    #[error("bad group name `{name}`: use letters, digits, _ and - (at most 100)")]
    BadGroupName {
        /// The name given.
        name: String,
    },

    /// A group of that name is running.
    #[error("group {name} is already running (pid {pid}); stop it or pick another name")]
    GroupRunning {
        /// The group.
        name: String,
        /// Its owner.
        pid: u32,
    },

    /// No group is pinned in this network namespace.
    #[error(
        "no reuseport group is running in this network namespace (nothing is pinned in {dir})"
    )]
    NoGroups {
        /// The namespace's pin directory.
        dir: std::path::PathBuf,
    },

    /// Every group pinned in this network namespace is dead.
    #[error("no reuseport group is running in this network namespace; dead: {dead} (removing their pins cleans them up)")]
    NoLiveGroup {
        /// The dead groups, comma-separated.
        dead: String,
    },

    /// The group's owner is gone (it crashed, or was killed): nothing
    /// steers the group, and its pins stay until removed.
    #[error("group {name} is dead: its owner (pid {pid}) is gone; remove its pins, or start a group on {proto} {addr} to replace it")]
    OwnerGone {
        /// The group.
        name: String,
        /// Its owner, as it was.
        pid: u32,
        /// TCP or UDP.
        proto: Proto,
        /// Its address.
        addr: SocketAddr,
    },

    /// The group's owner runs, but its pid means another process here.
    #[error("group {name}'s owner (pid {pid} in its own pid namespace) is not visible from this pid namespace: joining, adopting and adding workers must run in the owner's pid namespace")]
    OtherPidNamespace {
        /// The group.
        name: String,
        /// The owner's pid, in its own pid namespace.
        pid: u32,
    },

    /// Pins of a build that did not keep groups per network namespace.
    #[error("group {name} was pinned by an older build of reuseport (at {dir}, not per network namespace): this build cannot steer or take it over; stop it with the build that started it")]
    LegacyPins {
        /// The group.
        name: String,
        /// Where its pins are.
        dir: std::path::PathBuf,
    },

    /// SIGINT or SIGTERM arrived before the group served: everything made
    /// so far was undone.
    #[error("stopped by {signal} during start-up ({step}); removed what it had set up")]
    Interrupted {
        /// The signal's name.
        signal: &'static str,
        /// The last step of the start-up reached.
        step: &'static str,
    },

    /// Several groups run and none was named.
    #[error("several groups are running ({names}): name one")]
    WhichGroup {
        /// The groups.
        names: String,
    },

    /// The named group does not exist.
    #[error("no group named {name} is running (nothing pinned at {dir})")]
    NoSuchGroup {
        /// The name given.
        name: String,
        /// Where its pins would be.
        dir: std::path::PathBuf,
    },

    /// The group runs without a program, so its policy cannot change.
    #[error("group {name} was started with the kernel policy, without a program: restart it with another policy to switch live")]
    NoProgram {
        /// The group.
        name: String,
    },

    /// Every slot of the socket map is taken.
    #[error("the group has no free slot: all {max} are taken")]
    NoFreeSlot {
        /// Slots in a group.
        max: u32,
    },

    /// The group's pins cannot be opened by this process.
    #[error("cannot open group {name}'s pinned maps: permission denied (they belong to uid {owner}; only the group's owner may join or steer it)")]
    NotOwner {
        /// The group.
        name: String,
        /// Owner of the pins.
        owner: u32,
    },

    /// The group's pinned maps were created by a build with another layout
    /// (a version recorded beside them): this build cannot read them correctly.
    #[error("group {name} was created by an incompatible build ({theirs}, this build {ours}): stop it, or take it over, with a build of its layout; nothing was changed")]
    IncompatibleLayout {
        /// The group.
        name: String,
        /// Its layout, in words (`layout 2`, or an older one without a version).
        theirs: String,
        /// This build's [`reuseport_common::LAYOUT_VERSION`].
        ours: u32,
    },

    /// A worker that is not serving cannot be drained.
    #[error("worker {slot} is not serving (it is {state})")]
    NotServing {
        /// The slot.
        slot: u32,
        /// Its state.
        state: &'static str,
    },

    /// Draining the last serving worker would leave nothing to serve.
    #[error("worker {slot} is the last one serving: stop the group instead")]
    LastWorker {
        /// The slot.
        slot: u32,
    },

    /// A request to the group's owner was not carried out.
    #[error("{what}")]
    OwnerDidNot {
        /// What did not happen, and where to look.
        what: String,
    },

    /// A socket of another process could not be adopted.
    #[error("{what}")]
    Adopt {
        /// Why, in a sentence.
        what: String,
    },

    /// A policy that cannot be built from the given settings.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),

    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },

    /// An aya (BPF object, map or program) operation failed.
    #[error("{context}: {source}")]
    Bpf {
        /// What was being done.
        context: String,
        /// The error from aya.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// An [`Error::Io`] with `context`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::Bpf`] with `context`.
    pub fn bpf(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Bpf {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's messages name no command or flag of the `reuseport`
    /// program (it rewords them: `in_flags` in reuseport-cli).
    #[test]
    fn messages_about_dead_or_foreign_groups_name_no_command() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let errors = [
            Error::NoLiveGroup {
                dead: "a, b".into(),
            },
            Error::OwnerGone {
                name: "a".into(),
                pid: 7,
                proto: Proto::Tcp,
                addr,
            },
            Error::OtherPidNamespace {
                name: "a".into(),
                pid: 7,
            },
            Error::LegacyPins {
                name: "a".into(),
                dir: "/sys/fs/bpf/reuseport/a".into(),
            },
            Error::IncompatibleLayout {
                name: "a".into(),
                theirs: "layout 9".into(),
                ours: 2,
            },
        ];
        for e in errors {
            let m = e.to_string();
            assert!(m.contains("group a") || m.contains("dead: a, b"), "{m}");
            for word in ["`reuseport", "reuseport run", "--", "cleanup", "add-worker"] {
                assert!(!m.contains(word), "{m} names `{word}`");
            }
        }
    }
}
