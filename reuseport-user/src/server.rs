//! The echo server of `reuseport run` and `reuseport join`: a group, its
//! workers, the metrics endpoint, a supervisor that carries out what
//! `reuseport ctl` asks of the group, and an orderly shutdown.

use std::{collections::BTreeMap, io::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use log::{error, info, warn};
use reuseport_common::worker_state;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    echo,
    error::{Error, Result},
    group::{Group, GroupBuilder, Role},
    metrics,
    socket::Proto,
    worker::{self, Limits, WorkerHandle, WorkerInfo},
};

/// How often the supervisor looks at the group's worker records.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// Options of a serving process.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Per-connection and per-worker limits.
    pub limits: Limits,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Turn on the kernel's BPF run-time statistics while serving.
    pub bpf_stats: bool,
}

/// Creates a group (or takes one over) and serves echo on it until SIGINT
/// or SIGTERM (or, if it is taken over in turn, until it has drained).
pub fn run_echo(builder: GroupBuilder, options: ServeOptions) -> Result<()> {
    let metrics_listener = options.metrics_addr.map(metrics::bind).transpose()?;
    let group = builder.build()?;
    serve(group, options, metrics_listener)
}

/// Joins the running group `name` with `workers` workers of this process
/// and serves echo until SIGINT or SIGTERM.
pub fn join_echo(
    name: &str,
    workers: usize,
    cpus: Option<Vec<usize>>,
    backlog: i32,
    options: ServeOptions,
) -> Result<()> {
    let metrics_listener = options.metrics_addr.map(metrics::bind).transpose()?;
    let group = Group::join(name, workers, cpus, backlog)?;
    serve(group, options, metrics_listener)
}

struct Running {
    handle: WorkerHandle,
    stop: CancellationToken,
    draining: bool,
}

struct Server {
    group: Group,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    workers: BTreeMap<u32, Running>,
}

impl Server {
    fn start_worker(&mut self, slot: u32) -> Result<()> {
        let member = self
            .group
            .members()
            .iter()
            .find(|m| m.slot == slot)
            .ok_or_else(|| {
                Error::io(
                    format!("worker {slot}"),
                    std::io::Error::other("no such member"),
                )
            })?;
        let info = WorkerInfo {
            worker: slot,
            cpu: member.cpu,
        };
        let stats = self.group.worker_stats(slot);
        let stop = self.shutdown.child_token();
        let handle = match self.group.proto() {
            Proto::Tcp => worker::spawn_tcp(
                info,
                member.tcp_listener()?,
                stats,
                self.limits.clone(),
                echo::echo,
                stop.clone(),
            )?,
            Proto::Udp => worker::spawn_udp_echo(info, member.udp_socket()?, stats, stop.clone())?,
        };
        self.workers.insert(
            slot,
            Running {
                handle,
                stop,
                draining: false,
            },
        );
        Ok(())
    }

    /// Carries out what the worker records ask for. Returns why to stop,
    /// if this process has no more work.
    fn supervise(&mut self) -> Result<Option<String>> {
        let me = std::process::id();
        let owner = matches!(self.group.role(), Role::Owner | Role::Successor { .. });
        let retired = owner && self.group.retired();
        let region = self.group.worker_region();
        if retired {
            for &slot in self.workers.keys() {
                let rec = region.slot(slot);
                if rec.state.load(std::sync::atomic::Ordering::Acquire) == worker_state::SERVING {
                    rec.state
                        .store(worker_state::DRAINING, std::sync::atomic::Ordering::Release);
                }
            }
        }
        let records = region.snapshot();
        // Drains asked for (`ctl drain`, or a successor took over): stop
        // accepting and close the listener, whose queue then moves to the
        // live members; open connections finish.
        for (slot, run) in self.workers.iter_mut() {
            if records[*slot as usize].state == worker_state::DRAINING && !run.draining {
                run.draining = true;
                run.stop.cancel();
                self.group.remove_member(*slot);
                info!("worker {slot}: draining (no new connections; closes after its open ones)");
            }
        }
        // Workers that have finished.
        let finished: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(s, _)| *s)
            .collect();
        for slot in finished {
            let Some(run) = self.workers.remove(&slot) else {
                continue;
            };
            let drained = run.draining;
            let joined = run.handle.join();
            if drained {
                self.group.release_slot(slot);
                info!("worker {slot}: drained and closed");
            } else {
                // It stopped without being asked: take its slot out of the
                // policy so nothing is steered to it.
                self.group.retire_slot(slot)?;
                self.group.remove_member(slot);
                self.group.release_slot(slot);
                error!("worker {slot} stopped unexpectedly ({joined:?}); its slot is out of the policy");
            }
        }
        if owner && !retired {
            // Workers `ctl add-worker` asked this process for.
            for (slot, r) in records.iter().enumerate() {
                let slot = slot as u32;
                if r.state == worker_state::STARTING
                    && r.pid == me
                    && !self.workers.contains_key(&slot)
                {
                    let cpu = r.cpu as usize;
                    let started = self
                        .group
                        .add_member(slot, cpu)
                        .map(|_| ())
                        .and_then(|()| self.start_worker(slot));
                    if let Err(e) = started {
                        error!("could not add worker {slot} on CPU {cpu}: {e}");
                        self.group.retire_slot(slot)?;
                        self.group.remove_member(slot);
                        self.group.release_slot(slot);
                    }
                }
            }
            for (slot, pid) in self.group.reap_dead_workers()? {
                warn!("worker {slot} of pid {pid} is gone with its process: its slot is out of the policy");
            }
        }
        if let Role::Successor { old_pid, .. } = self.group.role().clone() {
            if crate::control::process_start_time(old_pid).is_none() {
                self.group.finish_takeover(Duration::ZERO)?;
            }
        }
        if self.workers.is_empty() {
            return Ok(Some(match (retired, self.group.role()) {
                (true, _) => "taken over, and every worker drained".to_string(),
                _ => "every worker drained".to_string(),
            }));
        }
        Ok(None)
    }
}

fn serve(
    group: Group,
    options: ServeOptions,
    metrics_listener: Option<std::net::TcpListener>,
) -> Result<()> {
    // Held for as long as the group runs: statistics stop when it closes.
    let _stats = match (options.bpf_stats, group.steering()) {
        (true, Some(s)) if crate::group::lock(&s).has_program() => {
            Some(crate::steering::enable_run_stats()?)
        }
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "policy {}", group.policy()?);
    if let (Some(name), Some(dir)) = (group.name(), group.pin_dir()) {
        let _ = writeln!(out, "group {name} (maps pinned in {})", dir.display());
    }
    for m in group.members() {
        let _ = writeln!(out, "worker {}: slot {}, cpu {}", m.slot, m.slot, m.cpu);
    }
    let slots: Vec<u32> = group.members().iter().map(|m| m.slot).collect();
    let mut server = Server {
        group,
        limits: Arc::new(options.limits),
        shutdown: CancellationToken::new(),
        workers: BTreeMap::new(),
    };
    for slot in slots {
        server.start_worker(slot)?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the control runtime", e))?;
    let reason = rt.block_on(async {
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("installing a SIGINT handler", e))?;
        if let Some(l) = metrics_listener {
            let addr = l.local_addr().map_err(|e| Error::io("getsockname", e))?;
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| Error::io("registering the metrics listener", e))?;
            let registry = Arc::new(metrics::registry(metrics::Sources {
                region: server.group.worker_region(),
                steering: server.group.steering(),
            }));
            tokio::spawn(metrics::serve(l, registry, server.shutdown.clone()));
            let _ = writeln!(out, "metrics on http://{addr}/metrics");
        }
        let _ = writeln!(
            out,
            "ready: serving {} {} with {} workers",
            server.group.proto(),
            server.group.local_addr(),
            server.workers.len()
        );
        let _ = out.flush();
        drop(out);
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<_, Error>("SIGTERM".to_string()),
                _ = int.recv() => return Ok("SIGINT".to_string()),
                _ = tick.tick() => {
                    if let Some(reason) = server.supervise()? {
                        return Ok(reason);
                    }
                }
            }
        }
    })?;

    info!("{reason}: shutting down");
    server.shutdown.cancel();
    let Server { group, workers, .. } = server;
    group.close()?;
    let mut result = Ok(());
    for (_, run) in workers {
        if let Err(e) = run.handle.join() {
            result = Err(e);
        }
    }
    info!("shut down cleanly");
    result
}
