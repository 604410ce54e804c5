//! Thread-per-core workers: worker `i` is an OS thread pinned to its CPU,
//! running a current-thread tokio runtime that serves the listener of slot
//! `i` and nothing else, so a connection stays on the CPU that accepted it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    thread,
    time::{Duration, Instant},
};

use log::{debug, error, info, warn};
use tokio::{net::TcpStream, sync::Semaphore, task::LocalSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::error::{Error, Result};
pub use crate::maps::WorkerStats;

/// Per-worker limits, for every handler. (The echo service's own settings,
/// idle timeout and buffer size, are in [`crate::echo::EchoOptions`].)
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Limits {
    /// Most connections one worker serves at once; beyond it the worker stops
    /// accepting until one closes (new connections wait in the kernel's
    /// accept queue).
    pub max_connections: usize,
    /// How long open connections may take to finish after shutdown begins.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8_192,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Identity of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Worker number, equal to its slot in the socket map.
    pub worker: u32,
    /// The CPU it is pinned to.
    pub cpu: usize,
}

impl WorkerInfo {
    /// Worker `worker` (its slot), pinned to `cpu`.
    pub fn new(worker: u32, cpu: usize) -> Self {
        WorkerInfo { worker, cpu }
    }
}

/// What a handler is given with each connection: who serves it and whom,
/// and read-only views of the worker's counters and limits.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Conn {
    /// The worker serving it.
    pub worker: WorkerInfo,
    /// The client's address.
    pub peer: SocketAddr,
    pub(crate) stats: WorkerStats,
    pub(crate) limits: Arc<Limits>,
}

impl Conn {
    /// A copy of the serving worker's record now: its state, connections
    /// accepted and open, bytes served, load.
    pub fn worker_record(&self) -> reuseport_common::WorkerRecord {
        self.stats.snapshot()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds `n` to the bytes the worker has served (its `bytes` counter in
    /// `reuseport stats` and the metrics); the only count a handler keeps.
    pub fn add_bytes(&self, n: u64) {
        self.stats.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    /// Who it is.
    pub info: WorkerInfo,
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
#[cfg(feature = "internals")]
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
    spawn_tcp_with(
        info,
        listener,
        stats,
        limits,
        move || handler,
        shutdown,
        on_fault,
    )
}

/// Like [`spawn_tcp`], with the handler made by `make` on the worker's own
/// thread: it need not be `Send`, and lives and dies there.
pub fn spawn_tcp_with<M, H, F>(
    info: WorkerInfo,
    listener: std::net::TcpListener,
    stats: WorkerStats,
    limits: Arc<Limits>,
    make: M,
    shutdown: CancellationToken,
    on_fault: OnFault,
) -> Result<WorkerHandle>
where
    M: FnOnce() -> H + Send + 'static,
    H: Fn(TcpStream, Conn) -> F + 'static,
    F: Future<Output = io::Result<()>> + 'static,
{
    let thread_stats = stats.clone();
    spawn_pinned(info, on_fault, move || {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::io("registering a listener", e))?;
        Ok(accept_loop(
            info,
            listener,
            limits,
            thread_stats,
            make(),
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
    spawn_pinned(info, on_fault, move || {
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

/// Starts a worker thread that runs the future `make` returns (made on
/// that thread, inside its runtime) until it ends. The worker's flows are
/// its own to count (`active`); the slot's load is kept true to them, as a
/// TCP worker's is to its connections (see `LoadAudit`).
pub fn spawn_own<M, F>(
    info: WorkerInfo,
    stats: WorkerStats,
    on_fault: OnFault,
    make: M,
) -> Result<WorkerHandle>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    let audited = stats.clone();
    spawn_pinned(info, on_fault, move || {
        let fut = make();
        Ok(async move {
            let audit = tokio::task::spawn_local(async move {
                let mut audit = LoadAudit::default();
                let mut tick = audit_interval();
                loop {
                    tick.tick().await;
                    // Flows have no queue the worker can see: its open
                    // flows are all the work there is.
                    audit.check(&audited, Some(0));
                }
            });
            fut.await;
            audit.abort();
        })
    })
}

/// Runs `make`'s future on a new thread pinned to `info.cpu`, on a
/// current-thread runtime of its own. `make` runs on that thread inside the
/// runtime; its error is returned here.
fn spawn_pinned<M, F>(
    info: WorkerInfo,
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
                    // A panic in a connection's task (a TCP handler, even
                    // before it returns its future) is caught by tokio and
                    // ends that task only; one that reaches here (a datagram
                    // handler, or the accept or receive loop) ends the
                    // worker: report it so nothing is steered to it.
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
        Ok(Ok(())) => Ok(WorkerHandle { info, thread }),
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
    let mut cmsg = crate::datagram::control_buffer();
    let mut errors = ErrorPacing::new(format!("worker {}: receive", info.worker));
    let mut audit = LoadAudit::default();
    let mut tick = audit_interval();
    // Made once: a new one at every datagram would register with the
    // token's waiters (a lock) each time it is polled.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let (n, peer, dst) = tokio::select! {
            r = crate::datagram::recv(&socket, &mut buf, &mut cmsg, pktinfo) => match r {
                Ok(v) => {
                    errors.succeeded();
                    v
                }
                Err(e) => {
                    errors.failed(&e, receive_retry(&e)).await;
                    continue;
                }
            },
            // Here, between two datagrams, the worker has none in flight.
            _ = tick.tick() => {
                audit.check_datagrams(&stats, &socket);
                continue;
            }
            _ = &mut cancelled => break,
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

/// What a failed accept or receive says about the next try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// The error belonged to one connection or datagram, which is gone
    /// with it: try again at once.
    Now,
    /// The process or the kernel is short of descriptors or memory, which
    /// takes a while to free: pause.
    Shortage,
    /// Not an error the loop expects (a broken socket, a kernel refusing
    /// for good): pause, longer each time it repeats.
    Unexpected,
}

/// How to answer a failed `accept(2)`.
pub(crate) fn accept_retry(e: &io::Error) -> Retry {
    match e.raw_os_error() {
        // A connection reset or aborted while queued, refused by a
        // firewall hook (EPERM), or an error pending on the new socket,
        // which Linux's accept() passes on and which "should be treated
        // like EAGAIN" (accept(2); inet_accept() in net/ipv4/af_inet.c).
        Some(
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::ECONNRESET
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT
            | libc::EINTR,
        ) => Retry::Now,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Retry::Shortage,
        _ => Retry::Unexpected,
    }
}

/// How to answer a failed receive on a UDP socket.
fn receive_retry(e: &io::Error) -> Retry {
    match e.raw_os_error() {
        // An ICMP error that an earlier reply drew, queued on the socket
        // and reported once (icmp_err_convert[] in net/ipv4/icmp.c,
        // icmpv6_err_convert() in net/ipv6/icmp.c): it concerns that reply
        // only.
        Some(
            libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::ENONET
            | libc::ENOPROTOOPT
            | libc::EOPNOTSUPP
            | libc::EACCES
            | libc::EPROTO
            | libc::EMSGSIZE
            | libc::ETIMEDOUT
            | libc::EINTR,
        ) => Retry::Now,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Retry::Shortage,
        // Not from the kernel: a datagram was received but could not be
        // read as one (no sender address); it is consumed.
        None => Retry::Now,
        _ => Retry::Unexpected,
    }
}

/// Paces a serving loop (accept, receive) after its errors, so that one
/// that repeats never spins a CPU, and its log says so now and then
/// rather than at every try.
#[derive(Debug)]
pub(crate) struct ErrorPacing {
    /// What fails, for the log: `worker 3: accept`.
    what: String,
    /// The pause after the next unexpected error.
    pause: Duration,
    /// When an error was last logged.
    logged: Option<Instant>,
    /// Errors not logged since then.
    unlogged: u64,
    /// "Retry at once" errors in a row, with no success between.
    in_a_row: u32,
}

impl ErrorPacing {
    /// The pause after a shortage of descriptors or memory.
    const SHORTAGE_PAUSE: Duration = Duration::from_millis(50);
    /// The first pause after an unexpected error; it doubles while they go on.
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    /// The longest pause.
    const LONGEST_PAUSE: Duration = Duration::from_millis(100);
    /// "Retry at once" errors in a row taken as such; past this many they
    /// are paced as unexpected ones.
    const AT_ONCE_IN_A_ROW: u32 = 16;
    /// At most one log line per this interval.
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Pacing for the loop doing `what`.
    pub(crate) fn new(what: impl Into<String>) -> Self {
        ErrorPacing {
            what: what.into(),
            pause: Self::FIRST_PAUSE,
            logged: None,
            unlogged: 0,
            in_a_row: 0,
        }
    }

    /// The call succeeded: unexpected errors start again from the first
    /// pause.
    pub(crate) fn succeeded(&mut self) {
        self.pause = Self::FIRST_PAUSE;
        self.in_a_row = 0;
    }

    /// The call failed with `e`: logs it (rate-limited) and waits as
    /// `retry` says.
    pub(crate) async fn failed(&mut self, e: &io::Error, retry: Retry) {
        let retry = self.escalate(retry);
        let Some(pause) = self.pause_after(retry) else {
            debug!("{}: {e}", self.what);
            return;
        };
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < Self::LOG_EVERY)
        {
            self.unlogged += 1;
        } else {
            let more = match std::mem::take(&mut self.unlogged) {
                0 => String::new(),
                n => format!(" ({n} more errors since the last report)"),
            };
            self.logged = Some(now);
            match retry {
                Retry::Shortage => warn!(
                    "{}: {e}: short of descriptors or memory, pausing {pause:?} between tries{more}",
                    self.what
                ),
                _ => error!(
                    "{}: unexpected error: {e}; pausing up to {:?} between tries{more}",
                    self.what,
                    Self::LONGEST_PAUSE
                ),
            }
        }
        tokio::time::sleep(pause).await;
    }

    /// An error of one connection or datagram is gone with it; the same
    /// kind again and again with nothing served between is not (a security
    /// module refusing every accept, say): past a few, it is paced too.
    fn escalate(&mut self, retry: Retry) -> Retry {
        if retry != Retry::Now {
            return retry;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.in_a_row > Self::AT_ONCE_IN_A_ROW {
            Retry::Unexpected
        } else {
            Retry::Now
        }
    }

    /// The pause before the next try, if any.
    fn pause_after(&mut self, retry: Retry) -> Option<Duration> {
        match retry {
            Retry::Now => None,
            Retry::Shortage => Some(Self::SHORTAGE_PAUSE),
            Retry::Unexpected => {
                let pause = self.pause;
                self.pause = (pause * 2).min(Self::LONGEST_PAUSE);
                Some(pause)
            }
        }
    }
}

/// Ends a connection's accounting when its task ends, however it ends
/// (including a panic in the handler): one fewer active connection, and
/// one less unit of the slot's load.
struct ActiveGuard(Rc<WorkerStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.finish_one();
    }
}

/// Keeps the slot's load (what `least-loaded` compares) true to what the
/// worker can see, checked every [`AUDIT_EVERY`]. The program adds one
/// for each connection or datagram it steers here, the worker takes it
/// away when done; work steered here that never arrived is never taken
/// away, and would starve the slot.
///
/// TCP: the work is the open connections plus the accept queue.
/// - work steered here that never arrived (a handshake that did not
///   complete, a syncookie ACK that ran the program twice) leaves an
///   excess; an excess seen twice in a row is taken away (once could be a
///   handshake still under way);
/// - connections opened while another policy was in force were never
///   counted (the program counts only under `least-loaded`); a shortfall
///   is made up at once.
///
/// UDP: the kernel drops a datagram after it was steered here when the
/// receive buffer is full (`__udp_enqueue_schedule_skb()` in
/// `net/ipv4/udp.c`). The number of queued datagrams cannot be read (only
/// their bytes), so the check is made only when none is queued and the
/// worker has none in flight: then all the load is excess, and an excess
/// seen twice in a row is taken away.
///
/// Both are atomic adjustments, not stores, so the program's concurrent
/// additions are kept; an excess is taken away only up to the smaller of
/// two observations a check apart, so work steered between them (which
/// shows in the second only) stays counted.
#[derive(Debug, Default)]
struct LoadAudit {
    /// The excess the previous check saw and left.
    last_excess: u64,
}

/// How often the load audit runs.
const AUDIT_EVERY: Duration = Duration::from_secs(1);

/// The audit's clock. A check that was due while the worker was busy (or
/// the process stopped) runs once, and the next a whole period later: two
/// checks in a burst would not be two observations.
fn audit_interval() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(AUDIT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

impl LoadAudit {
    /// TCP: `queued` is the accept queue's length, if it could be read.
    fn check(&mut self, stats: &WorkerStats, queued: Option<u64>) {
        let Some(queued) = queued else {
            // Without the queue, only a shortfall is certain.
            let active = stats.active.load(Ordering::Relaxed);
            let load = stats.load.load(Ordering::Relaxed);
            if load < active {
                stats.load.fetch_add(active - load, Ordering::Relaxed);
            }
            self.last_excess = 0;
            return;
        };
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
        self.settle(
            stats,
            load - seen,
            "connections steered here that never arrived",
        );
    }

    /// UDP: to be called with no datagram in flight in the worker.
    fn check_datagrams(&mut self, stats: &WorkerStats, socket: &impl AsRawFd) {
        // The load is read before the queue is looked at: a datagram
        // steered here before the read and queued before the look shows
        // in the queue, and then nothing is settled. Only one still
        // between the program and the queue at both instants (a few
        // microseconds) is missed.
        let load = stats.load.load(Ordering::Relaxed);
        match datagram_waiting(socket) {
            Ok(false) => self.settle(
                stats,
                load,
                "datagrams steered here that the kernel dropped (receive buffer full)",
            ),
            Ok(true) => self.last_excess = 0,
            Err(e) => {
                debug!("load audit: peeking at the receive queue: {e}");
                self.last_excess = 0;
            }
        }
    }

    /// Takes away what of `excess` the previous check saw too.
    fn settle(&mut self, stats: &WorkerStats, excess: u64, why: &str) {
        let settled = excess.min(self.last_excess);
        // What is left of this observation is what the next check may
        // settle, once seen again.
        self.last_excess = excess - settled;
        if settled > 0 {
            let _ = stats
                .load
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(settled))
                });
            debug!("load of this slot corrected by {settled} ({why})");
        }
    }
}

/// Whether a datagram waits in `socket`'s receive queue. A peek returns
/// the first one (truncated, left in the queue) or fails with EAGAIN when
/// there is none. (SIOCINQ cannot tell: it gives the first datagram's
/// length, which is 0 for an empty datagram too.)
fn datagram_waiting(socket: &impl AsRawFd) -> io::Result<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    match recv(
        socket.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
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
    let mut errors = ErrorPacing::new(format!("worker {}: accept", info.worker));
    // The audit runs beside the accept loop, so that it goes on while the
    // worker waits at its connection limit.
    let audit = {
        let (listener, stats, shutdown) = (listener.clone(), stats.clone(), shutdown.clone());
        tokio::task::spawn_local(async move {
            let mut audit = LoadAudit::default();
            let mut tick = audit_interval();
            let mut unreadable_logged = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let queued = crate::sys::accept_queue_len(&*listener);
                        if queued.is_none() && !unreadable_logged {
                            // errno is still getsockopt's: nothing ran in between.
                            warn!(
                                "worker {}: cannot read the accept queue's length (getsockopt TCP_INFO: {}); \
                                 the load audit no longer takes excess load away",
                                info.worker,
                                io::Error::last_os_error()
                            );
                            unreadable_logged = true;
                        }
                        audit.check(&stats, queued);
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // Per connection, a count on this thread's own `Rc` rather than an
    // atomic one on the `Arc` every worker shares.
    let guard_stats = Rc::new(stats.clone());
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
                    _ = &mut cancelled => break,
                }
            }
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut cancelled => break,
        };
        let (stream, peer) = match accepted {
            Ok(v) => {
                errors.succeeded();
                v
            }
            Err(e) => {
                // Errors of one connection (it was reset while queued) are
                // retried at once; a shortage of descriptors or anything
                // unexpected is logged and waited out, never spun on.
                errors.failed(&e, accept_retry(&e)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(guard_stats.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::WorkerRegion;

    fn stats() -> WorkerStats {
        WorkerStats::new(Arc::new(WorkerRegion::anonymous().unwrap()), 0)
    }

    fn load(stats: &WorkerStats) -> u64 {
        stats.load.load(Ordering::Relaxed)
    }

    #[test]
    fn an_excess_is_taken_away_only_once_seen_twice_and_no_more_than_its_smaller_sighting() {
        let s = stats();
        let mut audit = LoadAudit::default();
        s.load.store(7, Ordering::Relaxed);
        audit.settle(&s, 7, "test");
        assert_eq!(load(&s), 7, "seen once: kept");
        // The program steered 2 more in between: only the 7 seen twice go.
        s.load.fetch_add(2, Ordering::Relaxed);
        audit.settle(&s, 9, "test");
        assert_eq!(load(&s), 2);
        // 5 more arrive: of the 7 now, only the 2 seen before go, not all
        // on the strength of the earlier sighting of 9.
        s.load.fetch_add(5, Ordering::Relaxed);
        audit.settle(&s, 7, "test");
        assert_eq!(load(&s), 5);
        audit.settle(&s, 5, "test");
        assert_eq!(load(&s), 0);
    }

    #[test]
    fn tcp_audit_makes_up_a_shortfall_and_settles_only_what_the_queue_does_not_explain() {
        let s = stats();
        let mut audit = LoadAudit::default();
        s.active.store(3, Ordering::Relaxed);
        audit.check(&s, Some(2));
        assert_eq!(load(&s), 5, "a shortfall is made up at once");
        assert_eq!(s.queued.load(Ordering::Relaxed), 2);
        s.load.fetch_add(4, Ordering::Relaxed);
        audit.check(&s, Some(2));
        audit.check(&s, Some(2));
        assert_eq!(load(&s), 5, "the excess of 4, seen twice, is gone");
    }

    #[test]
    fn without_the_queue_length_the_tcp_audit_takes_nothing_away() {
        let s = stats();
        let mut audit = LoadAudit::default();
        s.active.store(1, Ordering::Relaxed);
        s.load.store(10, Ordering::Relaxed);
        for _ in 0..3 {
            audit.check(&s, None);
        }
        assert_eq!(load(&s), 10);
        s.load.store(0, Ordering::Relaxed);
        audit.check(&s, None);
        assert_eq!(load(&s), 1, "a shortfall is still made up");
    }

    #[test]
    fn udp_audit_settles_only_while_nothing_is_queued() {
        let s = stats();
        let mut audit = LoadAudit::default();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.load.store(5, Ordering::Relaxed);
        // An empty datagram counts as queued too.
        client.send_to(&[], server.local_addr().unwrap()).unwrap();
        assert!(datagram_waiting(&server).unwrap());
        audit.check_datagrams(&s, &server);
        audit.check_datagrams(&s, &server);
        assert_eq!(load(&s), 5, "a queued datagram: nothing is settled");
        let mut buf = [0u8; 8];
        assert_eq!(server.recv(&mut buf).unwrap(), 0);
        assert!(!datagram_waiting(&server).unwrap());
        audit.check_datagrams(&s, &server);
        assert_eq!(load(&s), 5, "seen once");
        audit.check_datagrams(&s, &server);
        assert_eq!(load(&s), 0, "seen twice: settled");
    }

    #[test]
    fn errors_of_one_connection_are_retried_at_once_and_others_waited_out() {
        let os = io::Error::from_raw_os_error;
        for e in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ECONNRESET,
            libc::EPERM,
        ] {
            assert_eq!(accept_retry(&os(e)), Retry::Now, "{e}");
        }
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(accept_retry(&os(e)), Retry::Shortage, "{e}");
            assert_eq!(receive_retry(&os(e)), Retry::Shortage, "{e}");
        }
        for e in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert_eq!(accept_retry(&os(e)), Retry::Unexpected, "{e}");
            assert_eq!(receive_retry(&os(e)), Retry::Unexpected, "{e}");
        }
        assert_eq!(receive_retry(&os(libc::ECONNREFUSED)), Retry::Now);
        assert_eq!(receive_retry(&io::Error::other("no sender")), Retry::Now);
    }

    #[test]
    fn pauses_after_unexpected_errors_grow_to_a_bound_and_start_over_after_a_success() {
        let mut p = ErrorPacing::new("test");
        assert_eq!(p.pause_after(Retry::Now), None);
        assert_eq!(
            p.pause_after(Retry::Shortage),
            Some(Duration::from_millis(50))
        );
        let pauses: Vec<u64> = (0..6)
            .map(|_| p.pause_after(Retry::Unexpected).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 100, 100]);
        p.succeeded();
        assert_eq!(
            p.pause_after(Retry::Unexpected),
            Some(Duration::from_millis(10))
        );
    }

    #[test]
    fn errors_of_one_connection_are_paced_once_they_repeat_without_a_success() {
        let mut p = ErrorPacing::new("test");
        for _ in 0..ErrorPacing::AT_ONCE_IN_A_ROW {
            assert_eq!(p.escalate(Retry::Now), Retry::Now);
        }
        assert_eq!(p.escalate(Retry::Now), Retry::Unexpected);
        assert_eq!(p.escalate(Retry::Now), Retry::Unexpected);
        p.succeeded();
        assert_eq!(p.escalate(Retry::Now), Retry::Now);
        assert_eq!(p.escalate(Retry::Shortage), Retry::Shortage);
    }
}
