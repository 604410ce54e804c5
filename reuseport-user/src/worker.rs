//! Thread-per-core workers: worker `i` is an OS thread pinned to its CPU,
//! running a current-thread tokio runtime that serves the listener of slot
//! `i` and nothing else, so a connection stays on the CPU that accepted it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    thread,
    time::Duration,
};

use log::{debug, error, info, warn};
use tokio::{net::TcpStream, sync::Semaphore, task::LocalSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::error::{Error, Result};
pub use crate::maps::WorkerStats;

/// Per-connection and per-worker limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections one worker serves at once; beyond it the worker stops
    /// accepting until one closes (new connections wait in the kernel's
    /// accept queue).
    pub max_connections: usize,
    /// A connection that neither sends nor accepts data for this long is closed.
    pub idle_timeout: Duration,
    /// Size of a connection's buffer: the most bytes read before they are
    /// written back (allocated when data first arrives).
    pub buffer_size: usize,
    /// How long open connections may take to finish after shutdown begins.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8_192,
            idle_timeout: Duration::from_secs(60),
            buffer_size: 64 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Identity of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Worker number, equal to its slot in the socket map.
    pub worker: u32,
    /// The CPU it is pinned to.
    pub cpu: usize,
}

/// What a handler is given with each connection.
#[derive(Clone, Debug)]
pub struct Conn {
    /// The worker serving it.
    pub worker: WorkerInfo,
    /// The client's address.
    pub peer: SocketAddr,
    /// The worker's counters.
    pub stats: WorkerStats,
    /// The limits in force.
    pub limits: Arc<Limits>,
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    /// Who it is.
    pub info: WorkerInfo,
    /// Its counters.
    pub stats: WorkerStats,
    thread: thread::JoinHandle<()>,
}

impl WorkerHandle {
    /// Whether the worker's thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the worker to finish (after shutdown was requested).
    pub fn join(self) -> Result<()> {
        self.thread.join().map_err(|_| {
            Error::io(
                format!("worker {}", self.info.worker),
                io::Error::other("the worker thread panicked"),
            )
        })
    }
}

/// Starts a worker thread serving `listener` with `handler` until
/// `shutdown` is cancelled, then lets its open connections finish within
/// `limits.drain_timeout`.
///
/// `handler` runs on the worker's own thread; its futures need not be `Send`.
#[allow(clippy::too_many_arguments)] // each is a distinct part of a worker
pub fn spawn_tcp<H, F>(
    info: WorkerInfo,
    listener: std::net::TcpListener,
    stats: WorkerStats,
    limits: Arc<Limits>,
    handler: H,
    shutdown: CancellationToken,
    on_fault: OnFault,
) -> Result<WorkerHandle>
where
    H: Fn(TcpStream, Conn) -> F + Send + 'static,
    F: Future<Output = io::Result<()>> + 'static,
{
    let thread_stats = stats.clone();
    spawn_pinned(info, stats, on_fault, move || {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::io("registering a listener", e))?;
        Ok(accept_loop(
            info,
            listener,
            limits,
            thread_stats,
            handler,
            shutdown,
        ))
    })
}

/// Starts a worker thread that echoes every datagram of `socket` back to
/// its sender until `shutdown` is cancelled.
pub fn spawn_udp_echo(
    info: WorkerInfo,
    socket: std::net::UdpSocket,
    stats: WorkerStats,
    shutdown: CancellationToken,
    on_fault: OnFault,
) -> Result<WorkerHandle> {
    let echo = |_: &mut [u8], len: usize, _: SocketAddr| Some(len);
    spawn_udp(info, socket, stats, echo, shutdown, on_fault)
}

/// What a UDP worker does with each datagram: the request is
/// `buf[..len]`; the handler writes its reply into `buf` (the request's
/// bytes, in place, for an echo) and returns its length, or `None` to send
/// nothing. `buf` holds the largest datagram.
pub trait DatagramHandler: Send + 'static {
    /// Handles one datagram from `peer`.
    fn handle(&mut self, buf: &mut [u8], len: usize, peer: SocketAddr) -> Option<usize>;
}

impl<F> DatagramHandler for F
where
    F: FnMut(&mut [u8], usize, SocketAddr) -> Option<usize> + Send + 'static,
{
    fn handle(&mut self, buf: &mut [u8], len: usize, peer: SocketAddr) -> Option<usize> {
        self(buf, len, peer)
    }
}

/// Starts a worker thread that answers every datagram of `socket` with
/// `handler` until `shutdown` is cancelled. Replies go out from the address
/// each datagram was sent to, even on a wildcard socket.
pub fn spawn_udp<H: DatagramHandler>(
    info: WorkerInfo,
    socket: std::net::UdpSocket,
    stats: WorkerStats,
    handler: H,
    shutdown: CancellationToken,
    on_fault: OnFault,
) -> Result<WorkerHandle> {
    let thread_stats = stats.clone();
    let local = socket
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let pktinfo = crate::datagram::enable_pktinfo(std::os::fd::AsFd::as_fd(&socket), local)
        .map_err(|e| Error::io("setsockopt IP_PKTINFO", e))?;
    spawn_pinned(info, stats, on_fault, move || {
        let socket = tokio::net::UdpSocket::from_std(socket)
            .map_err(|e| Error::io("registering a UDP socket", e))?;
        Ok(udp_loop(
            info,
            socket,
            pktinfo,
            thread_stats,
            handler,
            shutdown,
        ))
    })
}

/// Runs `make`'s future on a new thread pinned to `info.cpu`, on a
/// current-thread runtime of its own. `make` runs on that thread inside the
/// runtime; its error is returned here.
fn spawn_pinned<M, F>(
    info: WorkerInfo,
    stats: WorkerStats,
    on_fault: OnFault,
    make: M,
) -> Result<WorkerHandle>
where
    M: FnOnce() -> Result<F> + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = thread::Builder::new()
        .name(format!("worker-{}", info.worker))
        .spawn(move || {
            let setup = || -> Result<(tokio::runtime::Runtime, F)> {
                crate::sys::pin_current_thread(info.cpu)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("starting a worker runtime", e))?;
                let fut = {
                    let _guard = rt.enter();
                    make()?
                };
                Ok((rt, fut))
            };
            match setup() {
                Ok((rt, fut)) => {
                    let _ = ready_tx.send(Ok(()));
                    // A panic in a connection's task is caught by tokio and
                    // ends that task only; one that reaches here (in the
                    // accept loop, or in a handler before its future) ends
                    // the worker: report it so nothing is steered to it.
                    let run = std::panic::AssertUnwindSafe(|| LocalSet::new().block_on(&rt, fut));
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        error!("worker {} died: {}", info.worker, panic_text(&panic));
                        on_fault();
                        std::panic::resume_unwind(panic);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::io("spawning a worker thread", e))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(WorkerHandle {
            info,
            stats,
            thread,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::io(
            format!("worker {}", info.worker),
            io::Error::other("the worker thread died while starting"),
        )),
    }
}

/// What to do, on the worker's own thread, when the worker dies of a panic
/// (before the panic ends the thread): typically, take its socket out of
/// the socket map at once.
pub type OnFault = Box<dyn FnOnce() + Send + 'static>;

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Largest UDP payload (IPv6: 65535 minus the 8-byte UDP header; IPv4's
/// limit, 65507, is lower).
pub const MAX_DATAGRAM: usize = 65_527;

async fn udp_loop<H: DatagramHandler>(
    info: WorkerInfo,
    socket: tokio::net::UdpSocket,
    pktinfo: bool,
    stats: WorkerStats,
    mut handler: H,
    shutdown: CancellationToken,
) {
    // One buffer per worker, of the largest datagram, so nothing is cut.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (n, peer, dst) = tokio::select! {
            r = crate::datagram::recv(&socket, &mut buf, pktinfo) => match r {
                Ok(v) => v,
                Err(e) => {
                    // An error queued by an earlier datagram (e.g. an ICMP
                    // error) concerns that one only.
                    debug!("worker {}: receive failed: {e}", info.worker);
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(reply) = handler.handle(&mut buf, n, peer) {
            let reply = reply.min(buf.len());
            match crate::datagram::reply(&socket, &buf[..reply], peer, dst).await {
                Ok(_) => {
                    stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => debug!("worker {}: reply to {peer} failed: {e}", info.worker),
            }
        }
        stats.finish_one();
    }
}

/// Ends a connection's accounting when its task ends, however it ends
/// (including a panic in the handler): one fewer active connection, and
/// one less unit of the slot's load.
struct ActiveGuard(WorkerStats);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.finish_one();
    }
}

/// Keeps the slot's load (what `least-loaded` compares) true to what the
/// worker can see, its open connections plus its accept queue, checked
/// every second:
/// - work steered here that never arrived (a handshake that did not
///   complete, a syncookie ACK that ran the program twice) leaves an
///   excess; an excess seen twice in a row is taken away (once could be a
///   handshake still under way);
/// - connections opened while another policy was in force were never
///   counted (the program counts only under `least-loaded`); a shortfall
///   is made up at once.
///
/// Both are atomic adjustments, not stores, so the program's concurrent
/// additions are kept.
struct LoadAudit {
    last_excess: u64,
}

impl LoadAudit {
    fn check(&mut self, stats: &WorkerStats, queued: u64) {
        stats
            .queued
            .store(queued.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
        let seen = stats.active.load(Ordering::Relaxed) + queued;
        let load = stats.load.load(Ordering::Relaxed);
        if load < seen {
            stats.load.fetch_add(seen - load, Ordering::Relaxed);
            self.last_excess = 0;
            return;
        }
        let excess = load - seen;
        let settled = excess.min(self.last_excess);
        self.last_excess = excess;
        if settled > 0 {
            let _ = stats
                .load
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(settled))
                });
            debug!(
                "load of this slot corrected by {settled} (work steered here that never arrived)"
            );
        }
    }
}

async fn accept_loop<H, F>(
    info: WorkerInfo,
    listener: tokio::net::TcpListener,
    limits: Arc<Limits>,
    stats: WorkerStats,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(TcpStream, Conn) -> F + 'static,
    F: Future<Output = io::Result<()>> + 'static,
{
    let handler = Rc::new(handler);
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let listener = Rc::new(listener);
    // The audit runs beside the accept loop, so that it goes on while the
    // worker waits at its connection limit.
    let audit = {
        let (listener, stats, shutdown) = (listener.clone(), stats.clone(), shutdown.clone());
        tokio::task::spawn_local(async move {
            let mut audit = LoadAudit { last_excess: 0 };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => audit.check(&stats, crate::sys::accept_queue_len(&*listener).unwrap_or(0)),
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
    loop {
        // At the connection limit, stop accepting: new connections wait in
        // the kernel's queue instead of being accepted and starved.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                stats.at_limit.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                // Errors of one connection (it was reset while queued) or a
                // passing shortage of descriptors: log and carry on.
                warn!("worker {}: accept failed: {e}", info.worker);
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(stats.clone());
        let conn = Conn {
            worker: info,
            peer,
            stats: stats.clone(),
            limits: limits.clone(),
        };
        let handler = handler.clone();
        tracker.spawn_local(async move {
            let _guard = guard;
            let _permit = permit;
            if let Err(e) = handler(stream, conn).await {
                debug!("worker {}: connection from {peer}: {e}", info.worker);
            }
        });
    }
    // Stop accepting: this handle of the listener closes now (the audit's
    // with it); the group closes the socket itself.
    audit.abort();
    let _ = audit.await;
    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!("worker {}: draining {open} open connection(s)", info.worker);
    }
    if tokio::time::timeout(limits.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        error!(
            "worker {}: {} connection(s) still open after the {:?} drain deadline; closing them",
            info.worker,
            tracker.len(),
            limits.drain_timeout
        );
    }
}
