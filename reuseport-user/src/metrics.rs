//! Prometheus metrics at `/metrics`.
//!
//! The names below are a public interface: dashboards and alerts depend on
//! them, so they do not change. Values are read when scraped (the workers'
//! atomics and the program's per-CPU counters), so serving metrics costs
//! the data path nothing.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{body::Bytes, header, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use reuseport_common::{group_flag, worker_state, WorkerRecord};

use crate::{
    balance::balance,
    error::{Error, Result},
    group::lock,
    maps::{BpfCounters, WorkerRegion},
    steering::Steering,
    worker::{accept_retry, ErrorPacing},
};

/// Everything the metrics endpoint reports.
#[derive(Clone, Debug)]
pub struct Sources {
    /// Every slot's worker record (this process's workers and those of
    /// processes that joined the group).
    pub region: Arc<WorkerRegion>,
    /// The loaded object (or the group's maps), if any.
    pub steering: Option<Arc<Mutex<Steering>>>,
}

impl Sources {
    /// The slots to report: those with a worker now or counts from before.
    fn slots(&self) -> Vec<(u32, WorkerRecord)> {
        self.region
            .snapshot()
            .into_iter()
            .enumerate()
            .filter(|(_, r)| r.state != worker_state::EMPTY || r.accepted > 0)
            .map(|(s, r)| (s as u32, r))
            .collect()
    }
}

#[derive(Debug)]
struct GroupCollector {
    sources: Sources,
    /// Accepted counts at the previous scrape, for the balance gauges.
    previous: Mutex<Vec<u64>>,
}

impl Collector for GroupCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let slots = self.sources.slots();
        let per_worker = |encoder: &mut DescriptorEncoder,
                          name: &str,
                          help: &str,
                          kind: MetricType,
                          value: &dyn Fn(&WorkerRecord) -> u64|
         -> std::fmt::Result {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (slot, r) in &slots {
                let labels = [("worker", slot.to_string()), ("cpu", r.cpu.to_string())];
                let metric = family.encode_family(&labels)?;
                let v = value(r);
                match kind {
                    MetricType::Gauge => ConstGauge::new(v as i64).encode(metric)?,
                    _ => ConstCounter::new(v).encode(metric)?,
                }
            }
            Ok(())
        };
        per_worker(
            &mut encoder,
            "reuseport_worker_accepted",
            "Connections (TCP) or datagrams (UDP) the worker accepted.",
            MetricType::Counter,
            &|r| r.accepted,
        )?;
        per_worker(
            &mut encoder,
            "reuseport_worker_active_connections",
            "Connections the worker has open now.",
            MetricType::Gauge,
            &|r| r.active,
        )?;
        per_worker(
            &mut encoder,
            "reuseport_worker_bytes",
            "Bytes the worker echoed.",
            MetricType::Counter,
            &|r| r.bytes,
        )?;
        per_worker(
            &mut encoder,
            "reuseport_worker_load",
            "Work steered to the worker and not finished (what least-loaded compares).",
            MetricType::Gauge,
            &|r| r.load,
        )?;
        per_worker(
            &mut encoder,
            "reuseport_worker_queued",
            "Connections waiting in the worker's accept queue (sampled every second).",
            MetricType::Gauge,
            &|r| u64::from(r.queued),
        )?;
        per_worker(
            &mut encoder,
            "reuseport_worker_at_limit",
            "Times the worker reached its connection limit and stopped accepting.",
            MetricType::Counter,
            &|r| r.at_limit,
        )?;
        self.encode_balance(&mut encoder)?;
        let counters = match &self.sources.steering {
            Some(s) => match lock(s).maps().counters() {
                Ok(c) => c,
                Err(e) => {
                    warn!("metrics: {e}");
                    return Ok(());
                }
            },
            None => BpfCounters::zero(),
        };
        let mut family = encoder.encode_descriptor(
            "reuseport_bpf_selected",
            "Connections or datagrams the steering program sent to the slot.",
            None,
            MetricType::Counter,
        )?;
        for (slot, _) in &slots {
            let labels = [("slot", slot.to_string())];
            let v = counters.selected.get(*slot as usize).copied().unwrap_or(0);
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        let single: [(&str, &str, u64); 14] = [
            (
                "reuseport_bpf_fallback",
                "Program runs that left the choice to the kernel's reuseport hash.",
                counters.fallback,
            ),
            (
                "reuseport_bpf_dropped",
                "Program runs that dropped the SYN or datagram.",
                counters.dropped,
            ),
            (
                "reuseport_bpf_empty_slot",
                "Picks that found their slot empty and moved to the next live slot.",
                counters.empty_slot,
            ),
            (
                "reuseport_bpf_key_unreadable",
                "Packets whose hash key could not be read (the kernel's flow hash was used).",
                counters.key_unreadable,
            ),
            (
                "reuseport_bpf_short_payload",
                "Datagrams too short for the payload hash key.",
                counters.short_payload,
            ),
            (
                "reuseport_bpf_migrated",
                "Connections moved from a closing listener to a live one.",
                counters.migrated,
            ),
            // The per-stage counters of cookie, flow-table and QUIC
            // steering (UDP), as udpgrm exports its own.
            (
                "reuseport_bpf_cookie_ok",
                "Datagrams a valid cookie steered to the socket that minted it.",
                counters.cookie_ok,
            ),
            (
                "reuseport_bpf_cookie_bad",
                "Datagrams whose cookie failed its check (new flows): placed by the policy.",
                counters.cookie_bad,
            ),
            (
                "reuseport_bpf_cookie_old",
                "Datagrams with a valid cookie of a socket that is gone or replaced: placed by the policy.",
                counters.cookie_old,
            ),
            (
                "reuseport_bpf_flow_hit",
                "Datagrams the flow table sent to their flow's socket.",
                counters.flow_hit,
            ),
            (
                "reuseport_bpf_flow_miss",
                "Datagrams of flows the flow table did not know: placed by the policy.",
                counters.flow_miss,
            ),
            (
                "reuseport_bpf_flow_full",
                "New flows recorded in a full flow table (each evicted the least recently used flow), or not recorded.",
                counters.flow_full,
            ),
            (
                "reuseport_bpf_quic_initial",
                "QUIC Initial and 0-RTT packets placed by the policy (on a hash of their connection ID).",
                counters.quic_initial,
            ),
            (
                "reuseport_bpf_quic_unreadable",
                "Datagrams without a readable QUIC header (short, malformed, version negotiation): placed by the policy.",
                counters.quic_unreadable,
            ),
        ];
        for (name, help, v) in single {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let drops = crate::sys::drop_counters();
        for (name, key, help) in [
            (
                "reuseport_listen_overflows",
                "TcpExt:ListenOverflows",
                "Connections the kernel could not queue because an accept queue was full (whole network namespace).",
            ),
            (
                "reuseport_listen_drops",
                "TcpExt:ListenDrops",
                "Connection requests the kernel dropped at a listener (whole network namespace).",
            ),
            (
                "reuseport_udp_receive_buffer_errors",
                "Udp:RcvbufErrors",
                "Datagrams dropped because a socket's receive buffer was full (whole network namespace).",
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(drops.get(key).copied().unwrap_or(0)).encode(m)?;
        }
        let stats = self
            .sources
            .steering
            .as_ref()
            .map(|s| lock(s))
            .filter(|s| s.has_program())
            .map(|s| s.run_stats());
        if let Some(Ok((time, runs))) = stats {
            let m = encoder.encode_descriptor(
                "reuseport_bpf_runs",
                "Runs of the steering program counted by the kernel (only while BPF statistics are on).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(runs).encode(m)?;
            let m = encoder.encode_descriptor(
                "reuseport_bpf_run_seconds",
                "Time spent in the steering program (only while BPF statistics are on).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(time.as_secs_f64()).encode(m)?;
        }
        Ok(())
    }
}

impl GroupCollector {
    /// The policy in force, and the balance of the connections accepted
    /// since the previous scrape.
    fn encode_balance(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        // A joined process has no program of its own but steers by the
        // owner's: the group's record says whether one is attached.
        let policy = match &self.sources.steering {
            Some(s) => {
                let s = lock(s);
                let steered = s.has_program()
                    || s.maps()
                        .group_info()
                        .is_ok_and(|g| g.flags & group_flag::PROGRAM != 0);
                if steered {
                    s.maps()
                        .config()
                        .map(|c| crate::policy::policy_of(&c).kind.name())
                        .unwrap_or("unknown")
                } else {
                    "kernel"
                }
            }
            None => "kernel",
        };
        let mut family = encoder.encode_descriptor(
            "reuseport_policy",
            "The steering policy in force (value 1, name in the label).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1).encode(family.encode_family(&[("policy", policy)])?)?;

        // One snapshot, so that the counts and the states agree.
        let records = self.sources.region.snapshot();
        let now: Vec<u64> = records.iter().map(|r| r.accepted).collect();
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let serving: Vec<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == worker_state::SERVING)
            .map(|(s, _)| s)
            .collect();
        let delta: Vec<u64> = serving
            .iter()
            .map(|&s| now[s].saturating_sub(previous.get(s).copied().unwrap_or(0)))
            .collect();
        *previous = now;
        let b = balance(&delta);
        for (name, help, value) in [
            (
                "reuseport_balance_max_over_mean",
                "Busiest worker's accepted connections over the mean, since the previous scrape (1 is perfect).",
                b.map(|b| b.max_over_mean),
            ),
            (
                "reuseport_balance_cv",
                "Coefficient of variation of accepted connections per worker since the previous scrape (0 is perfect).",
                b.map(|b| b.cv),
            ),
            (
                "reuseport_balance_jain_index",
                "Jain's fairness index of accepted connections per worker since the previous scrape (1 is perfect).",
                b.map(|b| b.jain),
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value.unwrap_or(f64::NAN)).encode(m)?;
        }
        Ok(())
    }
}

/// The registry with every metric of a group.
pub fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GroupCollector {
        sources,
        previous: Mutex::new(Vec::new()),
    }));
    registry
}

/// The registry in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the collector reports its own errors.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        warn!("metrics: encoding failed: {e}");
    }
    out
}

/// Most metrics connections open at once. Each holds a descriptor of the
/// process, which its workers need far more: a client that opens
/// connections and never closes them must not use them up.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a metrics client may take to send a request's headers: from
/// connecting to its first byte, from there to the end of the headers, and
/// between requests on a connection kept alive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a metrics connection lives, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Connections that have not sent a byte yet, oldest first: the ones
/// closed to make room when [`MAX_CONNECTIONS`] are open.
type Waiting = Arc<Mutex<BTreeMap<u64, CancellationToken>>>;

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
///
/// At most [`MAX_CONNECTIONS`] are open at once. At the limit, a new
/// connection takes the place of the one that has waited longest without
/// sending a byte (a scraper sends its request as soon as it connects;
/// a client that does not is the likelier to be idle), or is closed at
/// once if every open one is being served.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting: Waiting = Arc::default();
    let mut next_id = 0u64;
    let mut errors = ErrorPacing::new("metrics: accept");
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => {
                    errors.succeeded();
                    v
                }
                Err(e) => {
                    errors.failed(&e, accept_retry(&e)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(permit) = admit(&permits, &waiting).await else {
            debug!("metrics: {MAX_CONNECTIONS} connections are being served; closing the one from {peer}");
            continue;
        };
        let id = next_id;
        next_id += 1;
        let evicted = CancellationToken::new();
        lock_waiting(&waiting).insert(id, evicted.clone());
        let (registry, waiting) = (registry.clone(), waiting.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // A peek, not `readable()`: tokio takes a new socket for
            // readable before anything arrived.
            let mut first = [0u8; 1];
            let first = tokio::select! {
                r = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)) => r,
                _ = evicted.cancelled() => Ok(Ok(0)),
            };
            lock_waiting(&waiting).remove(&id);
            if evicted.is_cancelled() {
                debug!("metrics: closing {peer}, which sent nothing, to make room");
                return;
            }
            match first {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!("metrics: connection from {peer}: {e}");
                    return;
                }
                Err(_) => {
                    debug!("metrics: {peer} sent nothing in {HEADER_READ_TIMEOUT:?}; closing");
                    return;
                }
            }
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry)) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics: connection from {peer}: {e}"),
                Err(_) => debug!("metrics: closing {peer} after {CONNECTION_LIFETIME:?}"),
            }
        });
    }
}

/// A place for a new connection: a free one, or that of the connection
/// that has waited longest without sending a byte, closed for it. `None`
/// when every open connection is being served.
async fn admit(permits: &Arc<Semaphore>, waiting: &Waiting) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    let (_, oldest) = lock_waiting(waiting).pop_first()?;
    oldest.cancel();
    // Its task gives its place back as soon as it runs.
    tokio::time::timeout(Duration::from_secs(1), permits.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

fn lock_waiting(waiting: &Waiting) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
    // The map stays consistent whatever a panicking holder did.
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let mut builder = Response::builder();
    let body = if req.uri().path() == "/metrics" {
        builder = builder.header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        );
        render(registry)
    } else {
        builder = builder.status(StatusCode::NOT_FOUND);
        "not found: metrics are at /metrics\n".to_string()
    };
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Binds the metrics listener (before the group starts, so a taken port
/// fails early).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("binding the metrics address {addr}"), e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("setting O_NONBLOCK", e))?;
    Ok(l)
}
