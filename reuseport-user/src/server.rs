//! The echo server of `reuseport run`: a group, its workers, the metrics
//! endpoint, and an orderly shutdown on SIGINT/SIGTERM.

use std::{io::Write as _, net::SocketAddr, sync::Arc};

use log::info;
use reuseport_common::MAX_WORKERS;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    echo,
    error::{Error, Result},
    group::GroupBuilder,
    metrics,
    socket::Proto,
    worker::{self, Limits, WorkerInfo},
};

/// Runs an echo group until SIGINT or SIGTERM, then shuts it down in order:
/// stop accepting, detach the program and close the listeners, let open
/// connections finish within `limits.drain_timeout`, return.
///
/// The listeners close before the drain, not after: connections accepted
/// by then are served to the end, while new ones are refused at once
/// instead of queueing on a socket that nobody will accept from.
pub fn run_echo(
    builder: GroupBuilder,
    limits: Limits,
    metrics_addr: Option<SocketAddr>,
    bpf_stats: bool,
) -> Result<()> {
    let metrics_listener = metrics_addr.map(metrics::bind).transpose()?;
    let group = builder.build()?;
    // Held for as long as the group runs: statistics stop when it closes.
    let _stats = match (bpf_stats, group.steering()) {
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

    let shutdown = CancellationToken::new();
    let limits = Arc::new(limits);
    let mut workers = Vec::new();
    for m in group.members() {
        let info = WorkerInfo {
            worker: m.slot,
            cpu: m.cpu,
        };
        let stats = group.worker_stats(m.slot);
        workers.push(match group.proto() {
            Proto::Tcp => worker::spawn_tcp(
                info,
                m.tcp_listener()?,
                stats,
                limits.clone(),
                echo::echo,
                shutdown.clone(),
            )?,
            Proto::Udp => worker::spawn_udp_echo(info, m.udp_socket()?, stats, shutdown.clone())?,
        });
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the control runtime", e))?;
    let signalled = rt.block_on(async {
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("installing a SIGINT handler", e))?;
        if let Some(l) = metrics_listener {
            let addr = l.local_addr().map_err(|e| Error::io("getsockname", e))?;
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| Error::io("registering the metrics listener", e))?;
            let registry = Arc::new(metrics::registry(metrics::Sources {
                workers: workers.iter().map(|w| (w.info, w.stats.clone())).collect(),
                steering: group.steering(),
                slots: (group.members().len() as u32).min(MAX_WORKERS),
            }));
            tokio::spawn(metrics::serve(l, registry, shutdown.clone()));
            let _ = writeln!(out, "metrics on http://{addr}/metrics");
        }
        let _ = writeln!(
            out,
            "ready: serving {} {} with {} workers",
            group.proto(),
            group.local_addr(),
            group.members().len()
        );
        let _ = out.flush();
        drop(out);
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        Ok::<_, Error>(name)
    })?;

    info!("{signalled}: shutting down (stop accepting, detach, drain open connections)");
    shutdown.cancel();
    group.close()?;
    let mut result = Ok(());
    for w in workers {
        if let Err(e) = w.join() {
            result = Err(e);
        }
    }
    info!("shut down cleanly");
    result
}
