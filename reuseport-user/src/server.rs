//! Serving a group: one worker per member, a supervisor that carries out
//! what `reuseport ctl` asks of the group (add, drain), restarts a worker
//! that dies, notices a takeover, and shuts everything down in order.
//!
//! [`Server::start_tcp`] serves any handler; `reuseport run` and `join`
//! serve the echo service ([`Server::start_echo`]).

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use crate::signals::catch_stop_signals;

use crate::{
    echo,
    error::{Error, Result},
    group::{lock, Group, Role},
    metrics,
    socket::Proto,
    worker::{self, Conn, DatagramHandler, Limits, OnFault, WorkerHandle, WorkerInfo},
};

/// How often the supervisor looks at the group's worker records.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// A worker that dies is restarted, but not more than this many times in
/// [`RESTART_WINDOW`]: a handler that always fails must not spin.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// Options of a serving process.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Per-worker limits.
    pub limits: Limits,
    /// The echo service's settings ([`Server::start_echo`] only).
    pub echo: echo::EchoOptions,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Turn on the kernel's BPF run-time statistics while serving (a
    /// system-wide switch, held while the server runs; it costs two clock
    /// reads per run of every BPF program).
    pub bpf_stats: bool,
    /// Raise this process's open-file limit (`RLIMIT_NOFILE`) to its hard
    /// limit at start, for many connections. Default no: the limit is a
    /// process-wide setting; without it, a limit lower than
    /// `limits.max_connections` allows is logged.
    pub raise_fd_limit: bool,
}

/// Starts the worker of a member: (group, slot, stop token, fault hook).
type Starter =
    Arc<dyn Fn(&Group, u32, CancellationToken, OnFault) -> Result<WorkerHandle> + Send + Sync>;

/// A group being served.
///
/// Dropping a `Server` that still serves shuts it down (see the `Drop`
/// implementation: it waits outside an async runtime, not inside one);
/// async code awaits [`Server::stop`] (or [`Server::run`]) to know when
/// the shutdown is done.
pub struct Server {
    stop: CancellationToken,
    thread: Option<thread::JoinHandle<Result<String>>>,
    /// Becomes true when the supervisor has shut everything down.
    done: tokio::sync::watch::Receiver<bool>,
    finished: Arc<std::sync::atomic::AtomicBool>,
    addr: SocketAddr,
    proto: Proto,
    metrics_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("proto", &self.proto)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Serves `group` (TCP) with `handler`: each worker calls it for every
    /// connection it accepts, on its own thread.
    pub fn start_tcp<H, F>(group: Group, handler: H, options: ServeOptions) -> Result<Server>
    where
        H: Fn(TcpStream, Conn) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + 'static,
    {
        Server::start_tcp_with(group, move |_: &WorkerInfo| handler.clone(), options)
    }

    /// Serves `group` (TCP) with a handler per worker: `factory` runs on
    /// each worker's own thread when the worker starts (again if it is
    /// restarted after a fault) and makes the handler that worker calls for
    /// every connection it accepts. The handler need not be `Send` or
    /// `Sync` (an `Rc`, a `RefCell` cache, a per-core connection pool): it
    /// never leaves its thread.
    pub fn start_tcp_with<M, H, F>(
        group: Group,
        factory: M,
        options: ServeOptions,
    ) -> Result<Server>
    where
        M: Fn(&WorkerInfo) -> H + Send + Sync + 'static,
        H: Fn(TcpStream, Conn) -> F + 'static,
        F: Future<Output = io::Result<()>> + 'static,
    {
        let factory = Arc::new(factory);
        if group.proto() != Proto::Tcp {
            return Err(Error::io(
                "serving a group",
                io::Error::other("start_tcp needs a TCP group"),
            ));
        }
        let limits = options.limits.clone();
        let starter: Starter = Arc::new(move |group: &Group, slot, stop, on_fault| {
            let member = member(group, slot)?;
            let info = WorkerInfo {
                worker: slot,
                cpu: member.cpu,
            };
            let factory = factory.clone();
            worker::spawn_tcp_with(
                info,
                member.tcp_listener()?,
                group.stats_of(slot),
                // Its own: each connection takes a count of it.
                Arc::new(limits.clone()),
                move || factory(&info),
                stop,
                on_fault,
            )
        });
        Server::start(group, starter, options, false)
    }

    /// Serves `group` (UDP) with `handler`: each worker answers the
    /// datagrams steered to it with a clone of `handler` of its own, on its
    /// own thread. A panic in the handler ends its worker, and with it the
    /// datagrams waiting in its socket (the others' are untouched); a new
    /// worker, with a fresh clone, takes the slot within 100 ms.
    pub fn start_udp<H>(group: Group, handler: H, options: ServeOptions) -> Result<Server>
    where
        H: DatagramHandler + Clone + Sync,
    {
        if group.proto() != Proto::Udp {
            return Err(Error::io(
                "serving a group",
                io::Error::other("start_udp needs a UDP group"),
            ));
        }
        let starter: Starter = Arc::new(move |group: &Group, slot, stop, on_fault| {
            let member = member(group, slot)?;
            worker::spawn_udp(
                WorkerInfo {
                    worker: slot,
                    cpu: member.cpu,
                },
                member.udp_socket()?,
                group.stats_of(slot),
                handler.clone(),
                stop,
                on_fault,
            )
        });
        Server::start(group, starter, options, true)
    }

    /// Serves `group` (UDP) with a server of your own per worker, such as
    /// a QUIC endpoint: on each worker's own thread (pinned, with a
    /// current-thread runtime), `factory` is given the worker's
    /// [`UdpWorker`] (its socket of the group, its cookie [`Minter`] and
    /// its drain signal) and returns the future that serves it. The
    /// worker ends when that future does; before
    /// [`UdpWorker::until_drain`] fires, that counts as a fault and a new
    /// worker takes the slot.
    ///
    /// On a drain (`reuseport ctl drain`, a shutdown) the worker is out of
    /// the policy: no new flow reaches it. Under a cookie-carrying key
    /// ([`HashKey::Cookie`](crate::HashKey::Cookie),
    /// [`HashKey::Quic`](crate::HashKey::Quic)) its socket stays in the
    /// socket map until the future returns, so that the flows it serves
    /// (their cookies) still reach it: finish them, within
    /// [`UdpWorker::drain_timeout`], then return.
    ///
    /// [`Minter`]: crate::cookie::Minter
    pub fn start_udp_with<M, F>(group: Group, factory: M, options: ServeOptions) -> Result<Server>
    where
        M: Fn(UdpWorker) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + 'static,
    {
        if group.proto() != Proto::Udp {
            return Err(Error::io(
                "serving a group",
                io::Error::other("start_udp_with needs a UDP group"),
            ));
        }
        let factory = Arc::new(factory);
        let drain_timeout = options.limits.drain_timeout;
        let starter: Starter = Arc::new(move |group: &Group, slot, stop, on_fault| {
            let member = member(group, slot)?;
            let info = WorkerInfo {
                worker: slot,
                cpu: member.cpu,
            };
            let worker = UdpWorker {
                info,
                socket: member.udp_socket()?,
                // Read after the slot got this socket (and its generation).
                minter: group.cookie_minter(slot)?,
                drain_timeout,
                stats: group.stats_of(slot),
                stop,
            };
            let factory = factory.clone();
            worker::spawn_own(info, group.stats_of(slot), on_fault, move || {
                let fut = factory(worker);
                async move {
                    if let Err(e) = fut.await {
                        error!("worker {}: {e}", info.worker);
                    }
                }
            })
        });
        Server::start(group, starter, options, false)
    }

    /// Serves `group` with the echo service: every byte of a TCP
    /// connection, or every UDP datagram, is sent back.
    pub fn start_echo(group: Group, options: ServeOptions) -> Result<Server> {
        match group.proto() {
            Proto::Tcp => {
                let settings = options.echo;
                Server::start_tcp(
                    group,
                    move |stream, conn| echo::echo_with(stream, conn, settings),
                    options,
                )
            }
            Proto::Udp => {
                let starter: Starter = Arc::new(|group: &Group, slot, stop, on_fault| {
                    let member = member(group, slot)?;
                    worker::spawn_udp_echo(
                        WorkerInfo {
                            worker: slot,
                            cpu: member.cpu,
                        },
                        member.udp_socket()?,
                        group.stats_of(slot),
                        stop,
                        on_fault,
                    )
                });
                Server::start(group, starter, options, true)
            }
        }
    }

    /// `lingers`: the workers are plain datagram loops, which the
    /// supervisor keeps serving a drained worker's flows until they are
    /// idle (a UDP group with a flow table); otherwise the worker's stop
    /// token is its drain signal and it finishes its flows itself.
    fn start(
        group: Group,
        starter: Starter,
        options: ServeOptions,
        lingers: bool,
    ) -> Result<Server> {
        if let Err(e) = crate::signals::checkpoint("built") {
            let _ = group.close();
            return Err(e);
        }
        let metrics_listener = options.metrics_addr.map(metrics::bind).transpose()?;
        let limit = if options.raise_fd_limit {
            crate::sys::raise_fd_limit()
        } else {
            crate::sys::fd_limit()
        };
        let needed = (options.limits.max_connections * group.members().len()) as u64 + 64;
        if limit < needed {
            let why = if options.raise_fd_limit {
                "this process may not raise it (CAP_SYS_RESOURCE, or a higher hard limit: ulimit -Hn)"
            } else {
                "ServeOptions::raise_fd_limit was not asked to raise it"
            };
            warn!(
                "the open-file limit is {limit} and {why}: \
                 at most about {} connections can be open at once, fewer than --max-connections allows ({needed})",
                limit.saturating_sub(64)
            );
        } else {
            log::debug!("open-file limit: {limit} (each connection takes one)");
        }
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(|e| Error::io("getsockname", e))?;
        // Held for as long as the group runs: statistics stop when it closes.
        let stats = match (options.bpf_stats, group.steering_shared()) {
            (true, Some(s)) if lock(&s).has_program() => Some(crate::steering::enable_run_stats()?),
            _ => None,
        };
        let addr = group.local_addr();
        let proto = group.proto();
        let stop = CancellationToken::new();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let mut supervisor = Supervisor {
            group,
            starter,
            shutdown: stop.clone(),
            workers: BTreeMap::new(),
            restarts: BTreeMap::new(),
            given_up: Vec::new(),
            rejoin_failures: 0,
            drain_timeout: options.limits.drain_timeout,
            lingers,
        };
        let slots: Vec<u32> = supervisor.group.members().iter().map(|m| m.slot).collect();
        for slot in slots {
            if let Err(e) = supervisor.start_worker(slot) {
                // Those already started must not serve on unsupervised.
                let _ = supervisor.shut_down(format!("worker {slot} did not start"), &stop);
                return Err(e);
            }
        }
        if let Err(e) = crate::signals::checkpoint("workers") {
            let _ = supervisor.shut_down(e.to_string(), &stop);
            return Err(e);
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        let (s, f) = (stop.clone(), finished.clone());
        let thread = thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                let _stats = stats;
                let reason = supervisor.run(metrics_listener, ready_tx);
                f.store(true, Ordering::Release);
                // Whatever ended supervision, the workers stop and the group
                // closes in order; a failure is reported after that.
                let r = match reason {
                    Ok(reason) => supervisor.shut_down(reason, &s),
                    Err(e) => {
                        error!("{e}");
                        let _ = supervisor.shut_down("supervision failed".into(), &s);
                        Err(e)
                    }
                };
                // Wakes `Server::stop` and `Server::run`.
                let _ = done_tx.send(true);
                r
            })
            .map_err(|e| Error::io("spawning the supervisor", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(match thread.join() {
                    Ok(Err(e)) => e,
                    _ => Error::io("starting the supervisor", io::Error::other("it stopped")),
                })
            }
        }
        Ok(Server {
            stop,
            thread: Some(thread),
            done,
            finished,
            addr,
            proto,
            metrics_addr,
        })
    }

    /// The group's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The group's protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Whether serving ended on its own (every worker drained, or a
    /// successor took the group over).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Shuts down in order: stop accepting, take this process's members out
    /// of the policy, detach the program (if this process owns the group),
    /// close the listeners, let open connections finish within the drain
    /// timeout, remove the pins. Returns why serving ended.
    ///
    /// Blocks the calling thread (up to the drain timeout); inside an async
    /// runtime use [`Server::stop`].
    pub fn shutdown(mut self) -> Result<String> {
        self.stop.cancel();
        self.join()
    }

    /// Waits until serving ends on its own (see [`Server::finished`]).
    /// Blocks the calling thread; inside an async runtime use
    /// [`Server::run`].
    pub fn wait(mut self) -> Result<String> {
        self.join()
    }

    /// [`Server::shutdown`] for async callers: the same order, awaited
    /// without blocking the runtime's thread (the work is done on the
    /// server's own supervisor thread).
    pub async fn stop(mut self) -> Result<String> {
        self.stop.cancel();
        // Err only if the supervisor is gone, which join reports.
        let _ = self.done.wait_for(|done| *done).await;
        self.join()
    }

    /// Serves until `until` completes (a shutdown signal of yours, e.g.
    /// [`signalled`]) or serving ends on its own, then shuts down as
    /// [`Server::stop`] does. Returns why serving ended.
    pub async fn run(mut self, until: impl Future<Output = ()>) -> Result<String> {
        let mut done = self.done.clone();
        tokio::select! {
            _ = until => {}
            _ = done.wait_for(|done| *done) => {}
        }
        self.stop.cancel();
        let _ = self.done.wait_for(|done| *done).await;
        self.join()
    }

    fn join(&mut self) -> Result<String> {
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::io("the supervisor", io::Error::other("it panicked"))),
            None => Ok("already stopped".into()),
        }
    }
}

/// Dropping a server that still runs starts its shutdown. Outside an async
/// runtime the drop waits for it, as [`Server::shutdown`] does; inside one it
/// does not block the runtime's thread: the shutdown goes on, in the same
/// order, on the server's supervisor thread, for as long as the process
/// lives (await [`Server::stop`] instead to know when it is done).
impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        self.stop.cancel();
        if tokio::runtime::Handle::try_current().is_ok() {
            log::debug!("server dropped inside a runtime: shutting down in the background");
            self.thread.take();
        } else {
            let _ = self.join();
        }
    }
}

/// What a worker of [`Server::start_udp_with`] serves with.
#[non_exhaustive]
pub struct UdpWorker {
    /// Who it is: its slot and CPU.
    pub info: WorkerInfo,
    /// Its own socket of the group (nonblocking not yet set): hand it to
    /// your server (`quinn::Endpoint::new`, `tokio::net::UdpSocket::from_std`
    /// after `set_nonblocking(true)`).
    pub socket: std::net::UdpSocket,
    /// Mints the cookies that steer datagrams back to this socket.
    pub minter: crate::cookie::Minter,
    /// How long its flows may take to finish once it drains.
    pub drain_timeout: Duration,
    stats: crate::maps::WorkerStats,
    stop: CancellationToken,
}

impl std::fmt::Debug for UdpWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpWorker")
            .field("info", &self.info)
            .field("minter", &self.minter)
            .finish_non_exhaustive()
    }
}

impl UdpWorker {
    /// Completes when the worker is to drain: take no new flows, finish
    /// those it serves within [`UdpWorker::drain_timeout`], then return.
    pub fn until_drain(&self) -> impl Future<Output = ()> + 'static {
        let stop = self.stop.clone();
        async move { stop.cancelled().await }
    }

    /// Whether the worker is asked to drain.
    pub fn draining(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Counts a flow (a QUIC connection) the worker took on, in its record
    /// (`accepted` and `open` in `reuseport stats`, and the metrics) until
    /// the returned guard is dropped.
    pub fn open_flow(&self) -> OpenFlow {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        OpenFlow(self.stats.clone())
    }

    /// Adds `n` to the bytes the worker has served.
    pub fn add_bytes(&self, n: u64) {
        self.stats.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// A handle that counts this worker's flows and bytes, for its tasks
    /// (the [`UdpWorker`] itself gives up its socket).
    pub fn counter(&self) -> FlowCounter {
        FlowCounter(self.stats.clone())
    }
}

/// Counts a worker's flows and bytes from any of its tasks
/// ([`UdpWorker::counter`]).
#[derive(Clone, Debug)]
pub struct FlowCounter(crate::maps::WorkerStats);

impl FlowCounter {
    /// See [`UdpWorker::open_flow`].
    pub fn open_flow(&self) -> OpenFlow {
        self.0.accepted.fetch_add(1, Ordering::Relaxed);
        self.0.active.fetch_add(1, Ordering::Relaxed);
        OpenFlow(self.0.clone())
    }

    /// See [`UdpWorker::add_bytes`].
    pub fn add_bytes(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

/// An open flow of a worker ([`UdpWorker::open_flow`]): counted open until
/// dropped.
#[derive(Debug)]
pub struct OpenFlow(crate::maps::WorkerStats);

impl Drop for OpenFlow {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.finish_one();
    }
}

fn member(group: &Group, slot: u32) -> Result<&crate::group::Member> {
    group
        .members()
        .iter()
        .find(|m| m.slot == slot)
        .ok_or_else(|| Error::io(format!("worker {slot}"), io::Error::other("no such member")))
}

struct Running {
    handle: WorkerHandle,
    stop: CancellationToken,
    draining: bool,
    /// A draining UDP worker that still serves its flows.
    linger: Option<Linger>,
}

/// A draining UDP worker that keeps its socket in the socket map so that
/// the datagrams of its flows (the flow table's, or cookies') still reach
/// it: it closes once it has received nothing for the flow timeout (its
/// flows are idle, and the table no longer sends them here), or at the
/// drain deadline.
struct Linger {
    since: Instant,
    /// Datagrams received when last looked at, and since when unchanged.
    received: u64,
    quiet_since: Instant,
    idle: Duration,
}

impl Linger {
    fn new(idle: Duration, received: u64) -> Self {
        let now = Instant::now();
        Linger {
            since: now,
            received,
            quiet_since: now,
            idle,
        }
    }

    /// Why to close now, if it is time: the flows went idle, or the
    /// deadline passed.
    fn over(&mut self, received: u64, deadline: Duration) -> Option<&'static str> {
        let now = Instant::now();
        if received != self.received {
            self.received = received;
            self.quiet_since = now;
        }
        if now.duration_since(self.quiet_since) >= self.idle {
            Some("its flows are idle")
        } else if now.duration_since(self.since) >= deadline {
            Some("the drain timeout passed")
        } else {
            None
        }
    }
}

struct Supervisor {
    group: Group,
    starter: Starter,
    shutdown: CancellationToken,
    workers: BTreeMap<u32, Running>,
    restarts: BTreeMap<u32, Vec<Instant>>,
    /// Slots whose worker died too often to be restarted.
    given_up: Vec<u32>,
    /// Failed attempts to re-join a group's new generation (a joined
    /// process whose group was taken over).
    rejoin_failures: u32,
    /// How long a draining UDP worker may serve its flows at most.
    drain_timeout: Duration,
    /// Whether a drained UDP worker lingers (see [`Server::start`]).
    lingers: bool,
}

impl Supervisor {
    fn start_worker(&mut self, slot: u32) -> Result<()> {
        let stop = self.shutdown.child_token();
        // If the worker dies, its socket leaves the socket map at once (on
        // the dying thread); the policy is rebuilt within a tick.
        // Its own handle on the socket map: the hook must not wait behind a
        // policy write that holds the group's.
        let socket_map = match self.group.steering_shared() {
            Some(s) => Some(lock(&s).maps().socket_map_handle()?),
            None => None,
        };
        let on_fault: OnFault = Box::new(move || {
            if let Some(mut map) = socket_map {
                if let Err(e) = map.clear_slot(slot) {
                    warn!("worker {slot} died, and its socket stays in the socket map until the next check: {e}");
                }
            }
        });
        // The starter clones the caller's handler: a panic there (in its
        // Clone) is this worker's failure, not the supervisor's.
        let start = std::panic::AssertUnwindSafe(|| {
            (self.starter)(&self.group, slot, stop.clone(), on_fault)
        });
        let handle = std::panic::catch_unwind(start).map_err(|_| {
            Error::io(
                format!("starting worker {slot}"),
                io::Error::other("it panicked"),
            )
        })??;
        self.workers.insert(
            slot,
            Running {
                handle,
                stop,
                draining: false,
                linger: None,
            },
        );
        Ok(())
    }

    fn run(
        &mut self,
        metrics_listener: Option<std::net::TcpListener>,
        ready: mpsc::Sender<Result<()>>,
    ) -> Result<String> {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(Error::io("starting the supervisor's runtime", e)));
                return Err(Error::io(
                    "starting the supervisor's runtime",
                    io::Error::other("failed"),
                ));
            }
        };
        rt.block_on(async {
            if let Some(l) = metrics_listener {
                let l = match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(Error::io("registering the metrics listener", e)));
                        return Ok("metrics failed".to_string());
                    }
                };
                let registry = Arc::new(metrics::registry(metrics::Sources {
                    region: self.group.worker_region(),
                    steering: self.group.steering_shared(),
                }));
                tokio::spawn(metrics::serve(l, registry, self.shutdown.clone()));
            }
            let _ = ready.send(Ok(()));
            let mut tick = tokio::time::interval(SUPERVISE_EVERY);
            loop {
                tokio::select! {
                    // Checked first: once asked to stop, the workers end
                    // (their tokens are children of this one), and a tick
                    // would take them for dead and restart them.
                    biased;
                    _ = self.shutdown.cancelled() => return Ok("asked to stop".to_string()),
                    _ = tick.tick() => {
                        if self.shutdown.is_cancelled() {
                            return Ok("asked to stop".to_string());
                        }
                        if let Some(reason) = self.supervise()? {
                            return Ok(reason);
                        }
                    }
                }
            }
        })
    }

    /// Carries out what the worker records ask for. Returns why to stop,
    /// if this process has no more work.
    fn supervise(&mut self) -> Result<Option<String>> {
        let me = std::process::id();
        if *self.group.role() == Role::Joined && self.group.retired() {
            // A successor took the group over: move into its generation.
            if let Err(e) = self.group.rejoin() {
                self.rejoin_failures += 1;
                // Every 5 s at most: it is tried again each tick.
                if self.rejoin_failures % 50 == 1 {
                    warn!("re-joining the group's new generation: {e} (trying again)");
                }
            }
        }
        let owner = matches!(self.group.role(), Role::Owner | Role::Successor { .. });
        let retired = owner && self.group.retired();
        let region = self.group.worker_region();
        if retired {
            for &slot in self.workers.keys() {
                let rec = region.slot(slot);
                crate::slots::drain(&rec.state);
            }
        }
        let records = region.snapshot();
        // Drains asked for (`ctl drain`, or a successor took over): stop
        // accepting and close the listener, whose queue then moves to the
        // live members; open connections finish. A UDP worker with a flow
        // timeout serves its flows until they are idle first.
        let linger = self.udp_flow_timeout();
        // A TCP member's listener closes at once (its queue moves on). A UDP
        // member's socket stays the group's until its worker has finished:
        // the worker may hold it for its flows (a QUIC endpoint does) and
        // its record names the group's descriptor of it, which a takeover
        // carries; closed early, that number could name another socket.
        let close_now = self.group.proto() == Proto::Tcp;
        for (slot, run) in self.workers.iter_mut() {
            if records[*slot as usize].state == crate::slots::DRAINING && !run.draining {
                run.draining = true;
                if let Some(idle) = linger {
                    let received = records[*slot as usize].accepted;
                    run.linger = Some(Linger::new(idle, received));
                    info!(
                        "worker {slot}: draining (no new flows; it serves its flows until they have been idle for {idle:?}, at most {:?})",
                        self.drain_timeout
                    );
                } else {
                    run.stop.cancel();
                    if close_now {
                        self.group.remove_member(*slot);
                    }
                    info!(
                        "worker {slot}: draining (no new connections; closes after its open ones)"
                    );
                }
            }
            if let Some(l) = run.linger.as_mut() {
                let received = records[*slot as usize].accepted;
                if let Some(why) = l.over(received, self.drain_timeout) {
                    run.linger = None;
                    run.stop.cancel();
                    if close_now {
                        self.group.remove_member(*slot);
                    }
                    info!("worker {slot}: {why}: closing its socket");
                }
            }
        }
        // Workers that have finished: drained, or dead.
        let finished: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(s, _)| *s)
            .collect();
        for slot in finished {
            // Asked to stop while this tick ran: the workers end because of
            // that, not dead, and are not to be restarted (with many
            // workers, this pass can outlast the request); shutting down
            // takes it from here.
            if self.shutdown.is_cancelled() {
                return Ok(Some("asked to stop".to_string()));
            }
            let Some(run) = self.workers.remove(&slot) else {
                continue;
            };
            let cpu = run.handle.info.cpu;
            let drained = run.draining;
            let joined = run.handle.join();
            if drained {
                // Empty first: a takeover that reads the record from now
                // on does not look for its socket.
                self.group.release_slot(slot);
                self.group.remove_member(slot);
                info!("worker {slot}: drained and closed");
                continue;
            }
            // It died: out of the policy, and a new one in its place.
            if let Err(e) = self.group.retire_slot(slot) {
                warn!("worker {slot}: could not take it out of the policy: {e}");
            }
            self.group.remove_member(slot);
            self.group.release_slot(slot);
            error!(
                "worker {slot} stopped unexpectedly ({}); restarting it",
                match joined {
                    Ok(()) => "it returned".to_string(),
                    Err(e) => e.to_string(),
                }
            );
            self.restart(slot, cpu);
        }
        if owner && !retired {
            // Workers `ctl add-worker` asked this process for.
            for (slot, r) in records.iter().enumerate() {
                let slot = slot as u32;
                if r.state == crate::slots::STARTING
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
                        if let Err(e) = self.group.retire_slot(slot) {
                            warn!("worker {slot}: could not take it out of the policy: {e}");
                        }
                        self.group.remove_member(slot);
                        self.group.release_slot(slot);
                    }
                }
            }
            match self.group.reap_dead_workers() {
                Ok(dead) => {
                    for (slot, pid) in dead {
                        warn!("worker {slot} of pid {pid} is gone with its process: its slot is out of the policy");
                    }
                }
                Err(e) => warn!("checking other processes' workers: {e} (trying again)"),
            }
        }
        if let Role::Successor { .. } = self.group.role() {
            if !self.group.previous_owner_running() {
                if let Err(e) = self.group.finish_takeover(Duration::ZERO) {
                    warn!("finishing the takeover: {e} (trying again)");
                }
            }
        }
        if self.workers.is_empty() && !self.given_up.is_empty() {
            let slots: Vec<String> = self.given_up.iter().map(u32::to_string).collect();
            return Err(Error::io(
                "serving",
                io::Error::other(format!(
                    "every worker is gone: worker(s) {} died again after {MAX_RESTARTS} restarts in {RESTART_WINDOW:?} and were not restarted",
                    slots.join(", ")
                )),
            ));
        }
        if self.workers.is_empty() {
            return Ok(Some(if retired {
                "taken over, and every worker drained".to_string()
            } else {
                "every worker drained".to_string()
            }));
        }
        Ok(None)
    }

    /// A UDP group's flow timeout, if it has a flow table (a program and a
    /// timeout): how long a draining worker's flows may stay silent.
    fn udp_flow_timeout(&self) -> Option<Duration> {
        if !self.lingers || self.group.proto() != Proto::Udp {
            return None;
        }
        let steering = self.group.steering_shared()?;
        let s = lock(&steering);
        // The group's record, not `has_program`: a joined process steers
        // with its owner's program.
        if s.maps().group_info().ok()?.flags & reuseport_common::group_flag::PROGRAM == 0 {
            return None;
        }
        let config = s.maps().config().ok()?;
        // Under a cookie key the datagram loop keeps no flows of its own
        // (a cookie names the socket, and one of a closed socket counts
        // old and goes by the policy): only the flow table's flows wait.
        config
            .flow_table_on()
            .then(|| Duration::from_millis(u64::from(config.flow_timeout_ms)))
    }

    /// Starts a new worker in `slot` after one died there, unless workers
    /// of that slot die too often.
    fn restart(&mut self, slot: u32, cpu: usize) {
        let now = Instant::now();
        let recent = self.restarts.entry(slot).or_default();
        recent.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if recent.len() >= MAX_RESTARTS {
            error!(
                "worker {slot} died again after {MAX_RESTARTS} restarts in {RESTART_WINDOW:?}: not restarting it"
            );
            self.given_up.push(slot);
            return;
        }
        recent.push(now);
        let slot_ok = self
            .group
            .claim_slot_again(slot, cpu)
            .and_then(|()| self.group.add_member(slot, cpu).map(|_| ()))
            .and_then(|()| self.start_worker(slot));
        match slot_ok {
            Ok(()) => info!("worker {slot} restarted on CPU {cpu}"),
            Err(e) => {
                error!("could not restart worker {slot}: {e}");
                self.group.remove_member(slot);
                self.group.release_slot(slot);
            }
        }
    }

    fn shut_down(self, reason: String, stop: &CancellationToken) -> Result<String> {
        info!("{reason}: shutting down");
        if let Err(e) = self.group.step_aside() {
            warn!("could not hand this process's share to the group's other workers: {e}");
        }
        stop.cancel();
        let Supervisor { group, workers, .. } = self;
        // Even if closing fails, the workers' open connections finish.
        let mut result = group.close().map(|()| reason);
        for (_, run) in workers {
            if let Err(e) = run.handle.join() {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if result.is_ok() {
            info!("shut down cleanly");
        }
        result
    }
}

/// Serves until SIGINT or SIGTERM, or until serving ends on its own (a
/// successor took the group over), then shuts down in order. `ready` runs
/// once the signal handlers are in place: a signal sent after it is seen.
///
/// Blocks the calling thread. Called from inside a tokio runtime (in
/// `#[tokio::main]`, say) it waits for the signals on a thread of its own,
/// since a runtime cannot be blocked on from within another; async code
/// would rather `server.run(signalled()).await`. A signal caught earlier
/// by [`catch_stop_signals`] shuts down at once, without `ready`.
pub fn serve_until_signalled(server: Server, ready: impl FnOnce()) -> Result<()> {
    let finished = server.finished.clone();
    let signalled = if tokio::runtime::Handle::try_current().is_ok() {
        let (installed, handlers_ready) = mpsc::channel();
        let waiter = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                wait_for_signals(finished, move || {
                    let _ = installed.send(());
                })
            })
            .map_err(|e| Error::io("spawning the signal thread", e))?;
        if handlers_ready.recv().is_ok() {
            ready();
        }
        waiter.join().map_err(|_| {
            Error::io(
                "waiting for signals",
                io::Error::other("the thread panicked"),
            )
        })??
    } else {
        wait_for_signals(finished, ready)?
    };
    if let Some(name) = signalled {
        info!("{name}");
    }
    server.shutdown().map(|_| ())
}

/// On a runtime of its own: waits for SIGINT or SIGTERM (returning its
/// name) or for `finished` (returning `None`); `installed` runs once the
/// handlers are in place.
fn wait_for_signals(
    finished: Arc<std::sync::atomic::AtomicBool>,
    installed: impl FnOnce(),
) -> Result<Option<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the signal runtime", e))?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("installing a SIGINT handler", e))?;
        if let Some(name) = crate::signals::stop_signal() {
            return Ok(Some(name));
        }
        installed();
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(Some("SIGTERM")),
                _ = int.recv() => return Ok(Some("SIGINT")),
                _ = tick.tick() => {
                    if finished.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    if let Some(name) = crate::signals::stop_signal() {
                        return Ok(Some(name));
                    }
                }
            }
        }
    })
}

/// Completes at the first SIGINT or SIGTERM after it is first polled (its
/// handlers are installed then), with the signal's name: the shutdown
/// future for [`Server::run`]. Must be polled inside a tokio runtime.
pub async fn signalled() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing a SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::io("installing a SIGINT handler", e))?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lingering_worker_closes_when_quiet_for_the_idle_time_or_at_the_deadline() {
        let idle = Duration::from_millis(60);
        let mut l = Linger::new(idle, 5);
        assert_eq!(l.over(5, Duration::from_secs(60)), None, "just drained");
        // Traffic keeps it: each new datagram starts the quiet time over.
        for received in 6..10 {
            thread::sleep(Duration::from_millis(20));
            assert_eq!(l.over(received, Duration::from_secs(60)), None);
        }
        thread::sleep(idle + Duration::from_millis(10));
        assert_eq!(
            l.over(9, Duration::from_secs(60)),
            Some("its flows are idle")
        );
        // Busy to the end: the deadline closes it.
        let mut l = Linger::new(Duration::from_secs(60), 0);
        thread::sleep(Duration::from_millis(30));
        assert_eq!(
            l.over(1, Duration::from_millis(20)),
            Some("the drain timeout passed")
        );
    }
}
