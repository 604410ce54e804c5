//! Steering policies as the user names them, and the plan (configuration
//! record and table) each one becomes in the program's maps.
//!
//! A policy has the same name here, in the CLI, in the eBPF program, in the
//! metrics and in the README.

use std::{fmt, str::FromStr};

use crate::proto::Proto;

use reuseport_common::{
    key, policy as id,
    table::{
        cpu_plan, maglev_size, maglev_table, maglev_update, weighted_table, CpuTopology, TableError,
    },
    Config, MAX_WORKERS, TABLE_CAPACITY,
};

use crate::topology::Topology;

/// How new connections (or datagrams) are spread over the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyKind {
    /// To the worker pinned to the CPU that received the SYN/datagram.
    Cpu,
    /// By our seeded hash of a key ([`HashKey`]), modulo the live workers.
    Hash,
    /// Each worker in turn.
    RoundRobin,
    /// To the worker with the fewest open connections.
    LeastLoaded,
    /// In proportion to per-worker weights ([`Policy::weights`]).
    Weighted,
    /// By a Maglev table indexed by the key's hash: few keys move when a
    /// worker comes or goes.
    Consistent,
    /// No program: the kernel's own reuseport hash (the baseline).
    Kernel,
}

impl PolicyKind {
    /// The policy's name, as in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Cpu => "cpu",
            PolicyKind::Hash => "hash",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::Weighted => "weighted",
            PolicyKind::Consistent => "consistent",
            PolicyKind::Kernel => "kernel",
        }
    }

    /// The id the program knows the policy by ([`id::NONE`] for `kernel`).
    pub fn id(self) -> u32 {
        match self {
            PolicyKind::Cpu => id::CPU,
            PolicyKind::Hash => id::HASH,
            PolicyKind::RoundRobin => id::ROUND_ROBIN,
            PolicyKind::LeastLoaded => id::LEAST_LOADED,
            PolicyKind::Weighted => id::WEIGHTED,
            PolicyKind::Consistent => id::CONSISTENT,
            PolicyKind::Kernel => id::NONE,
        }
    }

    /// The policies the program carries out (every one but `kernel`).
    pub const STEERED: [PolicyKind; 6] = [
        PolicyKind::Cpu,
        PolicyKind::Hash,
        PolicyKind::RoundRobin,
        PolicyKind::LeastLoaded,
        PolicyKind::Weighted,
        PolicyKind::Consistent,
    ];

    /// Every policy, the program's and `kernel`.
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Cpu,
        PolicyKind::Hash,
        PolicyKind::RoundRobin,
        PolicyKind::LeastLoaded,
        PolicyKind::Weighted,
        PolicyKind::Consistent,
        PolicyKind::Kernel,
    ];

    /// The policy with program id `id`, if any.
    pub fn from_id(id: u32) -> Option<PolicyKind> {
        Self::STEERED.into_iter().find(|p| p.id() == id)
    }

    /// Whether the policy reads its [`HashKey`].
    pub fn hashes(self) -> bool {
        matches!(self, PolicyKind::Hash | PolicyKind::Consistent)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = ParseError;

    /// Parses a policy's name (`cpu`, `round-robin`, ...; see
    /// [`PolicyKind::name`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ParseError {
                message: format!(
                    "unknown policy `{s}`: use one of {}",
                    Self::ALL.map(PolicyKind::name).join(", ")
                ),
            })
    }
}

/// A policy name or hash key that does not parse; its message says what
/// would.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    message: String,
}

impl ParseError {
    pub(crate) fn new(message: String) -> Self {
        ParseError { message }
    }
}

/// What the `hash` and `consistent` policies hash
/// (bytes in `reuseport_common::hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HashKey {
    /// The client's address: every connection of one client reaches one worker.
    SrcIp,
    /// Client and server address and port.
    FourTuple,
    /// The kernel's own hash of the 4-tuple: the cheapest key, but salted
    /// per boot, so the worker cannot be predicted outside the kernel.
    Flow,
    /// `len` bytes (1 to 16) at `offset` of the UDP payload.
    Payload {
        /// Offset into the payload.
        offset: u16,
        /// Length in bytes.
        len: u8,
    },
    /// UDP: a [`cookie`](crate::cookie) the server minted, at `offset` of
    /// the payload, sends the datagram to the socket that minted it,
    /// whatever the policy; a datagram without a valid one is a new flow,
    /// placed by the policy (hashing policies use the kernel's flow hash).
    Cookie {
        /// Offset of the cookie in the payload.
        offset: u16,
    },
    /// UDP: QUIC. Short headers and Handshake packets go by the cookie at
    /// the start of the destination connection ID (which the server chose);
    /// Initial and 0-RTT packets are placed by the policy (hashing policies
    /// hash the first 8 bytes of the destination connection ID, so a
    /// handshake stays on one worker).
    Quic,
}

impl HashKey {
    fn id(self) -> u32 {
        match self {
            HashKey::SrcIp => key::SRC_IP,
            HashKey::FourTuple => key::FOUR_TUPLE,
            HashKey::Flow => key::FLOW,
            HashKey::Payload { .. } => key::PAYLOAD,
            HashKey::Cookie { .. } => key::COOKIE,
            HashKey::Quic => key::QUIC,
        }
    }

    /// Whether the key steers by a cookie before any policy runs (and so
    /// matters under every policy, not only the hashing ones).
    pub fn carries_cookies(self) -> bool {
        matches!(self, HashKey::Cookie { .. } | HashKey::Quic)
    }

    /// Whether the key reads the payload (so needs a UDP group).
    pub fn reads_payload(self) -> bool {
        matches!(
            self,
            HashKey::Payload { .. } | HashKey::Cookie { .. } | HashKey::Quic
        )
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::SrcIp => f.write_str("src-ip"),
            HashKey::FourTuple => f.write_str("four-tuple"),
            HashKey::Flow => f.write_str("flow"),
            HashKey::Payload { offset, len } => write!(f, "payload:{offset}:{len}"),
            HashKey::Cookie { offset } => write!(f, "cookie:{offset}"),
            HashKey::Quic => f.write_str("quic"),
        }
    }
}

impl FromStr for HashKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "src-ip" => Ok(HashKey::SrcIp),
            "four-tuple" => Ok(HashKey::FourTuple),
            "flow" => Ok(HashKey::Flow),
            "quic" => Ok(HashKey::Quic),
            _ => {
                let bad = || {
                    ParseError {
                    message: format!(
                        "unknown hash key `{s}`: use src-ip, four-tuple, flow, payload:OFFSET:LEN (LEN 1 to 16), cookie:OFFSET or quic"
                    ),
                }
                };
                if let Some(offset) = s.strip_prefix("cookie:") {
                    let offset: u16 = offset.parse().map_err(|_| bad())?;
                    return Ok(HashKey::Cookie { offset });
                }
                let rest = s.strip_prefix("payload:").ok_or_else(bad)?;
                let (offset, len) = rest.split_once(':').ok_or_else(bad)?;
                let offset: u16 = offset.parse().map_err(|_| bad())?;
                let len: u8 = len.parse().map_err(|_| bad())?;
                if !(1..=16).contains(&len) {
                    return Err(bad());
                }
                Ok(HashKey::Payload { offset, len })
            }
        }
    }
}

/// A complete policy setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Which policy.
    pub kind: PolicyKind,
    /// The key of the hashing policies.
    pub key: HashKey,
    /// Seed of the key hash.
    pub seed: u32,
    /// `weighted`: one weight per worker slot, in slot order.
    pub weights: Vec<u32>,
}

impl Policy {
    /// A policy of `kind` with the default key (`src-ip`), seed 0, no weights.
    pub fn new(kind: PolicyKind) -> Self {
        Policy {
            kind,
            key: HashKey::SrcIp,
            seed: 0,
            weights: Vec::new(),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if self.kind.hashes() {
            write!(f, " (key {}, seed {})", self.key, self.seed)?;
        } else if self.key.carries_cookies() && self.kind != PolicyKind::Kernel {
            write!(f, " (key {})", self.key)?;
        }
        if self.kind == PolicyKind::Weighted {
            let w: Vec<String> = self.weights.iter().map(u32::to_string).collect();
            write!(f, " (weights {})", w.join(","))?;
        }
        Ok(())
    }
}

/// Why a policy cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The group runs without a program, so there is nothing to switch.
    #[error("this group was started with the kernel policy, without a program: restart it with another policy to switch live")]
    Kernel,
    /// The weights do not match the workers.
    #[error("{given} weights for {workers} workers: give one per worker")]
    WeightCount {
        /// Weights given.
        given: usize,
        /// Workers in the group.
        workers: usize,
    },
    /// Switching to `weighted` without weights, when a worker has none yet.
    #[error("worker {slot} has no weight yet: give weights, one per worker")]
    NoWeight {
        /// The worker's slot.
        slot: u32,
    },
    /// A payload, cookie or QUIC key on a TCP group: a SYN carries no
    /// payload.
    #[error("hash key {0} needs a UDP group: a TCP SYN carries no payload")]
    PayloadKeyOnTcp(HashKey),
    /// The table could not be built.
    #[error("cannot build the policy table: {0}")]
    Table(TableError),
}

/// A live worker as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSlot {
    /// The worker's slot in the socket map.
    pub slot: u32,
    /// The CPU it is pinned to.
    pub cpu: u32,
}

/// What the loader writes for a policy: the configuration record and the
/// table (empty for the policies without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The configuration record.
    pub config: Config,
    /// The first `config.table_len` entries of the table.
    pub table: Vec<u32>,
}

/// Turns a policy and the live slots into a [`Plan`], from scratch.
///
/// `live` must be sorted by slot. `weights` of a `weighted` policy are indexed
/// by slot; a slot with no weight given gets none of the traffic. The `cpu`
/// policy is planned over this machine's CPUs ([`Topology::host`]).
pub fn plan(policy: &Policy, live: &[LiveSlot]) -> Result<Plan, PolicyError> {
    plan_with(policy, live, None, Topology::host().view())
}

/// [`plan`] on a given CPU topology (for the `cpu` policy): what a group on
/// a machine of that shape would get.
#[cfg(test)]
pub fn plan_on(
    policy: &Policy,
    live: &[LiveSlot],
    topology: CpuTopology<'_>,
) -> Result<Plan, PolicyError> {
    plan_with(policy, live, None, topology)
}

/// Like [`plan`], for a running group whose plan in force is `current`:
/// when both are `consistent`, the Maglev table is updated rather than
/// rebuilt, so that only the keys of workers that came or went move
/// ([`maglev_update`]).
pub fn replan(policy: &Policy, live: &[LiveSlot], current: &Plan) -> Result<Plan, PolicyError> {
    plan_with(policy, live, Some(current), Topology::host().view())
}

/// The policy a configuration record describes: the decoding half of the
/// codec whose encoding half is [`plan`] (the only two places that know
/// how a [`Policy`] sits in a [`Config`]).
pub fn policy_of(config: &Config) -> Policy {
    let kind = PolicyKind::from_id(config.policy).unwrap_or(PolicyKind::Kernel);
    let key = match config.key {
        key::FOUR_TUPLE => HashKey::FourTuple,
        key::FLOW => HashKey::Flow,
        key::PAYLOAD => HashKey::Payload {
            offset: config.payload_offset as u16,
            len: config.payload_len as u8,
        },
        key::COOKIE => HashKey::Cookie {
            offset: config.payload_offset as u16,
        },
        key::QUIC => HashKey::Quic,
        _ => HashKey::SrcIp,
    };
    let used = config
        .weights
        .iter()
        .rposition(|&w| w != 0)
        .map_or(0, |i| i + 1);
    Policy {
        kind,
        key,
        seed: config.seed,
        weights: config.weights[..used].to_vec(),
    }
}

/// Refuses a key that reads the payload on a TCP group (a payload key
/// under a hashing policy; a cookie or QUIC key under any policy, since
/// they steer before the policy runs).
pub fn check_key(policy: &Policy, proto: Proto) -> Result<(), PolicyError> {
    let used =
        policy.kind.hashes() || (policy.key.carries_cookies() && policy.kind != PolicyKind::Kernel);
    match (used && policy.key.reads_payload(), proto) {
        (true, Proto::Tcp) => Err(PolicyError::PayloadKeyOnTcp(policy.key)),
        _ => Ok(()),
    }
}

/// Rebuilds the policy in force (`current`) over the workers serving now
/// (`live`), after some came or went. Under `weighted`, a slot without a
/// weight of its own gets none of the traffic. With no live worker left
/// the plan stays as it is (there is nowhere else to steer).
pub fn rebuild(current: &Plan, live: &[LiveSlot]) -> Result<Plan, PolicyError> {
    if live.is_empty() {
        return Ok(current.clone());
    }
    let mut policy = policy_of(&current.config);
    let needed = live.iter().map(|l| l.slot as usize + 1).max().unwrap_or(0);
    if policy.weights.len() < needed {
        policy.weights.resize(needed, 0);
    }
    replan(&policy, live, current)
}

fn plan_with(
    policy: &Policy,
    live: &[LiveSlot],
    current: Option<&Plan>,
    topology: CpuTopology<'_>,
) -> Result<Plan, PolicyError> {
    if live.is_empty() {
        return Err(PolicyError::Table(TableError::NoSlots));
    }
    if live.len() > MAX_WORKERS as usize {
        return Err(PolicyError::Table(TableError::TooManySlots));
    }
    let mut config = Config::EMPTY;
    config.policy = policy.kind.id();
    config.n_live = live.len() as u32;
    for (i, l) in live.iter().enumerate() {
        config.live[i] = l.slot;
    }
    for (slot, w) in policy.weights.iter().enumerate().take(MAX_WORKERS as usize) {
        config.weights[slot] = *w;
    }
    // Kept under every policy, so that `ctl policy` can switch away from a
    // hash policy and back without losing the key and seed.
    config.key = policy.key.id();
    config.seed = policy.seed;
    // The flow table's settings are the group's, not the policy's: kept
    // across switches and rebuilds (set once, when the group is built).
    if let Some(c) = current {
        config.flow_timeout_ms = c.config.flow_timeout_ms;
        config.flow_table_size = c.config.flow_table_size;
    }
    match policy.key {
        HashKey::Payload { offset, len } => {
            config.payload_offset = offset.into();
            config.payload_len = len.into();
        }
        HashKey::Cookie { offset } => {
            config.payload_offset = offset.into();
            config.payload_len = reuseport_common::cookie::LEN as u32;
        }
        _ => {}
    }
    // The group's cookie secret is not the policy's: `Maps` keeps the one
    // in force across every plan it writes.
    let mut table = vec![0u32; TABLE_CAPACITY as usize];
    match policy.kind {
        // With a program attached, "kernel" selects nothing: every run
        // falls back to the kernel's hash (and is counted as a fallback).
        PolicyKind::Kernel => {}
        PolicyKind::Cpu => {
            // The rows live in the configuration record, not the table.
            let pairs: Vec<(u32, u32)> = live.iter().map(|l| (l.slot, l.cpu)).collect();
            config.n_cpus = cpu_plan(
                &pairs,
                topology,
                &mut config.cpu_rows,
                &mut config.cpu_slots,
            )
            .map_err(PolicyError::Table)?;
        }
        PolicyKind::Weighted => {
            let max_slot = live.iter().map(|l| l.slot).max().unwrap_or(0) as usize;
            if policy.weights.len() <= max_slot {
                return Err(PolicyError::WeightCount {
                    given: policy.weights.len(),
                    workers: live.len(),
                });
            }
            let pairs: Vec<(u32, u32)> = live
                .iter()
                .map(|l| {
                    (
                        l.slot,
                        policy.weights.get(l.slot as usize).copied().unwrap_or(0),
                    )
                })
                .collect();
            config.table_len = weighted_table(&pairs, &mut table).map_err(PolicyError::Table)?;
        }
        PolicyKind::Consistent => {
            let slots: Vec<u32> = live.iter().map(|l| l.slot).collect();
            config.table_len = match current.filter(|c| c.config.policy == id::CONSISTENT) {
                Some(c) => maglev_update(&c.table, &slots, &mut table),
                None => maglev_table(&slots, &mut table),
            }
            .map_err(PolicyError::Table)?;
            debug_assert_eq!(config.table_len, maglev_size(slots.len()));
        }
        PolicyKind::Hash | PolicyKind::RoundRobin | PolicyKind::LeastLoaded => {}
    }
    table.truncate(config.table_len as usize);
    Ok(Plan { config, table })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(n: u32) -> Vec<LiveSlot> {
        (0..n)
            .map(|i| LiveSlot {
                slot: i,
                cpu: i % 2,
            })
            .collect()
    }

    #[test]
    fn names_round_trip_through_from_str_and_display() {
        for kind in &PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>().unwrap(), *kind);
            assert_eq!(kind.to_string(), kind.name());
            if *kind != PolicyKind::Kernel {
                assert_eq!(PolicyKind::from_id(kind.id()), Some(*kind));
            }
        }
    }

    #[test]
    fn hash_keys_parse_and_print() {
        for s in [
            "src-ip",
            "four-tuple",
            "flow",
            "payload:0:4",
            "payload:12:16",
            "cookie:0",
            "cookie:12",
            "quic",
        ] {
            assert_eq!(s.parse::<HashKey>().unwrap().to_string(), s);
        }
        for bad in [
            "dst-ip",
            "payload:1",
            "payload:1:0",
            "payload:1:17",
            "payload:x:4",
            "cookie:",
            "cookie:x",
            "cookie:1:2",
            "quic:1",
        ] {
            assert!(bad.parse::<HashKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_plan_maps_each_cpu_to_its_worker() {
        let topo = Topology::flat(2);
        let p = plan_on(&Policy::new(PolicyKind::Cpu), &live(2), topo.view()).unwrap();
        assert_eq!(p.config.policy, id::CPU);
        assert_eq!(p.config.n_cpus, 2);
        assert_eq!(p.config.cpu_slot(0, 7), Some(0));
        assert_eq!(p.config.cpu_slot(1, 7), Some(1));
        assert!(p.table.is_empty(), "the cpu rows are in the record");
    }

    #[test]
    fn cpu_plan_covers_every_cpu_of_the_machine() {
        // One worker on an 8-CPU machine of 2 nodes: every CPU has it.
        let topo = Topology {
            cache: vec![0, 0, 0, 0, 4, 4, 4, 4],
            node: vec![0, 0, 0, 0, 1, 1, 1, 1],
        };
        let one = [LiveSlot { slot: 3, cpu: 0 }];
        let p = plan_on(&Policy::new(PolicyKind::Cpu), &one, topo.view()).unwrap();
        assert_eq!(p.config.n_cpus, 8);
        for cpu in 0..8 {
            assert_eq!(p.config.cpu_slot(cpu, cpu * 77), Some(3), "CPU {cpu}");
        }
        assert_eq!(p.config.cpu_slot(8, 0), None);
        // The host's plan covers every CPU this process can run on.
        let p = plan(&Policy::new(PolicyKind::Cpu), &one).unwrap();
        for cpu in crate::sys::usable_cpus().unwrap() {
            assert_eq!(p.config.cpu_slot(cpu as u32, 0), Some(3), "CPU {cpu}");
        }
    }

    #[test]
    fn plans_hold_the_largest_group() {
        let all: Vec<LiveSlot> = (0..MAX_WORKERS)
            .map(|slot| LiveSlot { slot, cpu: slot })
            .collect();
        let topo = Topology::flat(MAX_WORKERS as usize);
        for kind in PolicyKind::STEERED {
            let mut policy = Policy::new(kind);
            policy.weights = vec![1; MAX_WORKERS as usize];
            let p = plan_on(&policy, &all, topo.view()).unwrap();
            assert_eq!(p.config.n_live, MAX_WORKERS, "{kind}");
            assert_eq!(p.config.live[MAX_WORKERS as usize - 1], MAX_WORKERS - 1);
        }
        let p = plan_on(&Policy::new(PolicyKind::Cpu), &all, topo.view()).unwrap();
        assert_eq!(p.config.cpu_slot(MAX_WORKERS - 1, 0), Some(MAX_WORKERS - 1));
        let too_many: Vec<LiveSlot> = (0..=MAX_WORKERS)
            .map(|slot| LiveSlot { slot, cpu: 0 })
            .collect();
        assert_eq!(
            plan(&Policy::new(PolicyKind::RoundRobin), &too_many),
            Err(PolicyError::Table(TableError::TooManySlots))
        );
    }

    #[test]
    fn hash_plan_carries_key_and_seed() {
        let mut policy = Policy::new(PolicyKind::Hash);
        policy.key = HashKey::FourTuple;
        policy.seed = 7;
        let p = plan(&policy, &live(3)).unwrap();
        assert_eq!(
            (p.config.key, p.config.seed, p.config.n_live),
            (key::FOUR_TUPLE, 7, 3)
        );
        assert_eq!(&p.config.live[..3], &[0, 1, 2]);
        assert!(p.table.is_empty());
    }

    #[test]
    fn cookie_and_quic_keys_round_trip_and_need_udp() {
        for key in [HashKey::Cookie { offset: 3 }, HashKey::Quic] {
            for kind in [PolicyKind::Hash, PolicyKind::RoundRobin, PolicyKind::Cpu] {
                let mut policy = Policy::new(kind);
                policy.key = key;
                let p = plan(&policy, &live(2)).unwrap();
                assert_eq!(policy_of(&p.config), policy, "{key} under {kind}");
                assert!(check_key(&policy, Proto::Udp).is_ok());
                assert_eq!(
                    check_key(&policy, Proto::Tcp),
                    Err(PolicyError::PayloadKeyOnTcp(key)),
                    "{key} under {kind} on TCP"
                );
            }
        }
        let mut policy = Policy::new(PolicyKind::RoundRobin);
        policy.key = HashKey::Payload { offset: 0, len: 4 };
        assert!(
            check_key(&policy, Proto::Tcp).is_ok(),
            "round-robin does not read a payload key"
        );
    }

    #[test]
    fn kernel_policy_plans_no_selection() {
        let p = plan(&Policy::new(PolicyKind::Kernel), &live(2)).unwrap();
        assert_eq!(p.config.policy, id::NONE);
        assert_eq!(p.config.n_live, 2);
    }

    #[test]
    fn weighted_plan_needs_a_weight_per_worker() {
        let mut policy = Policy::new(PolicyKind::Weighted);
        policy.weights = vec![3, 1];
        let p = plan(&policy, &live(2)).unwrap();
        assert_eq!(p.table.len(), 4);
        assert_eq!(&p.config.weights[..3], &[3, 1, 0]);
        policy.weights = vec![3];
        assert_eq!(
            plan(&policy, &live(2)),
            Err(PolicyError::WeightCount {
                given: 1,
                workers: 2
            })
        );
    }
}
