//! What a selection costs: the program's run time per run, from the
//! kernel's BPF statistics (`run_time_ns / run_cnt`; `BPF_PROG_TEST_RUN`
//! does not run `SK_REUSEPORT` programs), under the connection-rate load.
//!
//! Every figure is paired with the floor program's in the same round of
//! interleaved epochs (A B C … floor, A B C … floor, …): a policy's ratio is
//! the median over the rounds of its run time over the floor's in that
//! round, so a noisy round moves both sides of a ratio alike.
//!
//! Two workloads:
//! - `bpf-cost`: every steered policy (each hashing one with the keys that
//!   cost differently), the floor, and the test object's reference
//!   programs, each the floor plus one step of the steering path alone
//!   (one helper call, one atomic add, …): what bounds a policy's cost,
//!   measured rather than asserted.
//! - `bpf-cost-by-workers`: the policies, the floor and `cost_config` (the
//!   floor, but selecting every worker in turn) in groups of 1, 4, 16 and
//!   64 workers: the cost of a selection against the size of the group.

use std::{net::SocketAddr, time::Duration};

use reuseport::{
    error::Result,
    policy::{HashKey, PolicyKind},
    socket::Proto,
};

use super::{
    load::{self, Outcome},
    models::{self, Design, Model, Running},
    row, Bench, Row, Workload,
};

/// The group sizes of `bpf-cost-by-workers`.
pub const WORKER_COUNTS: [usize; 4] = [1, 4, 16, 64];

/// The steered policies as the cost workloads name them: `policy/key` for
/// those that hash (the key decides what a selection reads).
pub fn steered(workers: usize) -> Vec<Model> {
    let mut v = Vec::new();
    for kind in PolicyKind::STEERED {
        let keys: &[(HashKey, &str)] = match kind {
            PolicyKind::Hash => &[
                (HashKey::Flow, "flow"),
                (HashKey::SrcIp, "src-ip"),
                (HashKey::FourTuple, "four-tuple"),
            ],
            PolicyKind::Consistent => {
                &[(HashKey::Flow, "flow"), (HashKey::FourTuple, "four-tuple")]
            }
            _ => &[(HashKey::Flow, "")],
        };
        for &(key, key_name) in keys {
            let name = if key_name.is_empty() {
                kind.name().to_string()
            } else {
                format!("{}/{key_name}", kind.name())
            };
            v.push(Model {
                name,
                design: Design::Reuseport(models::policy(kind, key, workers)),
            });
        }
    }
    v
}

/// The test object's reference programs, each the floor plus one step of
/// the steering path (see `reuseport-ebpf/src/test_programs.rs`): name,
/// the plan it runs over, and the step.
pub const REFERENCES: [(&str, PolicyKind, &str); 10] = [
    (
        "empty",
        PolicyKind::Cpu,
        "a run that selects nothing (no helper call)",
    ),
    (
        "cost_counter",
        PolicyKind::Cpu,
        "+ the per-CPU counter record: one lookup, one add",
    ),
    (
        "cost_config",
        PolicyKind::Cpu,
        "+ the plan: state lookup, generation, the live slot at the flow hash (selected: every worker in turn)",
    ),
    (
        "cost_load_bytes",
        PolicyKind::Cpu,
        "+ one `bpf_skb_load_bytes_relative` (the 4 bytes of the source address)",
    ),
    (
        "cost_atomic",
        PolicyKind::Cpu,
        "+ the shared ticket's atomic fetch-and-add",
    ),
    (
        "cost_murmur",
        PolicyKind::Cpu,
        "+ MurmurHash3 of a four-tuple (no packet read)",
    ),
    (
        "cost_table",
        PolicyKind::Consistent,
        "+ the plan and one Maglev table entry at the flow hash (selected: every worker in turn)",
    ),
    (
        "cost_loads",
        PolicyKind::LeastLoaded,
        "+ the loads of up to 4 live workers (a cache line each, which the workers write) and the atomic add on the least loaded one's",
    ),
    (
        "round_robin_shared",
        PolicyKind::RoundRobin,
        "round robin by the shared ticket, on the same short path as the next one",
    ),
    (
        "round_robin_per_cpu",
        PolicyKind::RoundRobin,
        "round robin by per-CPU tickets instead (not exact: not offered)",
    ),
];

/// The steps of the steering path each policy takes beyond the floor, as
/// reference programs measure them alone: next to a policy's excess over
/// the floor, their sum shows what bounds it.
pub const STEPS: [(&str, &[&str]); 9] = [
    ("cpu", &["cost_counter", "cost_config"]),
    (
        "round-robin",
        &["cost_counter", "cost_config", "cost_atomic"],
    ),
    ("weighted", &["cost_counter", "cost_config", "cost_atomic"]),
    ("hash/flow", &["cost_counter", "cost_config"]),
    (
        "hash/src-ip",
        &[
            "cost_counter",
            "cost_config",
            "cost_load_bytes",
            "cost_murmur",
        ],
    ),
    (
        "hash/four-tuple",
        &[
            "cost_counter",
            "cost_config",
            "cost_load_bytes",
            "cost_murmur",
        ],
    ),
    ("consistent/flow", &["cost_counter", "cost_table"]),
    (
        "consistent/four-tuple",
        &[
            "cost_counter",
            "cost_table",
            "cost_load_bytes",
            "cost_murmur",
        ],
    ),
    (
        "least-loaded",
        &["cost_counter", "cost_config", "cost_loads"],
    ),
];

/// The reference programs as models.
pub fn references() -> Vec<Model> {
    REFERENCES
        .iter()
        .map(|&(program, kind, _)| Model {
            name: program.to_string(),
            design: Design::Reference {
                program,
                policy: models::policy(kind, HashKey::Flow, 0),
            },
        })
        .collect()
}

/// `cost_config`: the floor plus the plan's live slot at the flow hash,
/// which it selects. Unlike the floor it selects every worker in turn, as
/// the policies do: next to them in a large group it shows what selecting
/// among many sockets costs the kernel, whatever the policy.
fn select_by_flow_hash() -> Model {
    references()
        .into_iter()
        .find(|m| m.name == "cost_config")
        .expect("cost_config is a reference program")
}

/// The models of `bpf-cost`, in their order in the tables.
fn cost_models(workers: usize) -> Vec<Model> {
    let mut v = steered(workers);
    v.push(models::floor());
    v.extend(references());
    v
}

/// `models` without those `--only` leaves out; the floor stays, as every
/// ratio needs it.
fn kept(bench: &Bench, models: Vec<Model>) -> Vec<Model> {
    models
        .into_iter()
        .filter(|m| bench.only.is_empty() || m.name == "floor" || bench.only.contains(&m.name))
        .collect()
}

/// Epochs the two workloads take (for the progress bar).
pub fn epochs(rounds: usize, by_workers: bool) -> u64 {
    let per_group = steered(1).len() + 2;
    let mut n = rounds * (per_group - 1 + references().len());
    if by_workers {
        n += rounds * per_group * WORKER_COUNTS.len();
    }
    n as u64
}

/// One model's run time per selection in each round, and its load.
struct Measured {
    per_round: Vec<Option<f64>>,
    outcome: Outcome,
}

/// Runs connection-rate epochs over `models`, interleaved, with the BPF
/// statistics on (only now: they add two clock reads to every run).
fn measure(bench: &Bench, label: &str, models: &[Running]) -> Result<Vec<Measured>> {
    let shape = bench.shape();
    let stats = reuseport::steering::enable_run_stats()?;
    let mut m: Vec<Measured> = models
        .iter()
        .map(|_| Measured {
            per_round: Vec::new(),
            outcome: Outcome::empty(),
        })
        .collect();
    for _ in 0..bench.settings.rounds {
        for (i, model) in models.iter().enumerate() {
            bench.step(&format!("{label}: {}", model.model.name));
            let (t0, c0) = model.bpf_stats().unwrap_or_default();
            let o = load::connection_rate(model.addr, &shape, bench.settings.epoch());
            let (t1, c1) = model.bpf_stats().unwrap_or_default();
            let (t, c) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
            m[i].per_round
                .push((c > 0).then(|| t.as_nanos() as f64 / c as f64));
            m[i].outcome.merge(&o);
        }
    }
    drop(stats);
    Ok(m)
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Rows: each model's median run time, and the median over the rounds of
/// its run time over the floor's in the same round.
fn rows(models: &[Running], measured: &[Measured], workers: Option<usize>) -> Vec<Row> {
    let floor = models
        .iter()
        .position(|m| m.model.name == "floor")
        .map(|i| &measured[i].per_round);
    models
        .iter()
        .zip(measured)
        .map(|(m, x)| {
            let mut r = row(m, &x.outcome);
            r.bpf_ns = median(x.per_round.iter().flatten().copied().collect());
            r.bpf_ratio = floor.and_then(|f| {
                median(
                    x.per_round
                        .iter()
                        .zip(f)
                        .filter_map(|(a, b)| match (a, b) {
                            (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
                            _ => None,
                        })
                        .collect(),
                )
            });
            r.workers = workers;
            r
        })
        .collect()
}

fn start(models: &[Model], base_port: u16, cpus: &[usize], workers: usize) -> Result<Vec<Running>> {
    let mut running = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], base_port + i as u16));
        match models::start_workers(m, addr, Proto::Tcp, cpus, workers) {
            Ok(r) => running.push(r),
            Err(e) => {
                stop(running);
                return Err(e);
            }
        }
    }
    // Let every worker reach its accept loop before the first epoch.
    std::thread::sleep(Duration::from_millis(100));
    Ok(running)
}

fn stop(models: Vec<Running>) {
    for m in models {
        m.stop();
    }
}

/// `bpf-cost`: every policy, the floor and the reference programs, in
/// groups of one worker per CPU.
pub fn bpf_cost(bench: &Bench, base_port: u16) -> Result<Workload> {
    let models = start(
        &kept(bench, cost_models(bench.cpus.len())),
        base_port,
        &bench.cpus,
        bench.cpus.len(),
    )?;
    let measured = measure(bench, "BPF cost", &models);
    let rows = measured.map(|m| rows(&models, &m, Some(bench.cpus.len())));
    stop(models);
    Ok(Workload {
        name: "bpf-cost".into(),
        unit: "conn/s".into(),
        about: "the program's run time per selection (kernel BPF statistics, on only during these epochs; median of the rounds), and over the floor program's in the same round (median of the ratios); the reference programs (empty, cost_*, round_robin_per_cpu) are the floor plus one step of the steering path".into(),
        rows: rows?,
    })
}

/// `bpf-cost-by-workers`: the policies and the floor in groups of
/// [`WORKER_COUNTS`] workers.
pub fn by_workers(bench: &Bench, base_port: u16) -> Result<Workload> {
    let mut all = Vec::new();
    for (k, &n) in WORKER_COUNTS.iter().enumerate() {
        let mut models = steered(n);
        models.push(models::floor());
        models.push(select_by_flow_hash());
        let models = kept(bench, models);
        let running = start(&models, base_port + 100 * k as u16, &bench.cpus, n)?;
        let measured = measure(bench, &format!("BPF cost, {n} workers"), &running);
        let rows = measured.map(|m| rows(&running, &m, Some(n)));
        stop(running);
        all.extend(rows?);
    }
    Ok(Workload {
        name: "bpf-cost-by-workers".into(),
        unit: "conn/s".into(),
        about: format!(
            "as bpf-cost, in groups of {} workers (spread over the CPUs): the cost of a selection against the size of the group",
            WORKER_COUNTS.map(|n| n.to_string()).join(", ")
        ),
        rows: all,
    })
}
