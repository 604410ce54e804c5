//! The server designs the benchmark compares, all serving the same echo.
//!
//! Every model counts, per worker, the connections (or datagrams) it
//! served, how many are open, and how many were served on the CPU that
//! received them (the client's CPU, which the load generator writes into
//! its source address: 127.(cpu+1).x.y).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::LocalSet,
};
use tokio_util::sync::CancellationToken;

use reuseport::{
    error::{Error, Result},
    group::{lock, Group},
    policy::{HashKey, Policy, PolicyKind},
    socket::Proto,
    steering::Steering,
    sys,
    worker::{self, Conn, Limits, WorkerHandle, WorkerInfo},
};

/// A server design.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Design {
    /// One thread accepts and hands connections to worker threads.
    SingleAcceptor,
    /// One listening socket; every worker accepts from it (TCP), or every
    /// worker reads the one socket (UDP).
    SharedAccept,
    /// One listener on tokio's multi-thread runtime, a task per connection.
    TokioDefault,
    /// A reuseport group under a policy (`kernel`: no program).
    Reuseport(Policy),
    /// A reuseport group under `policy` with a reference program of the
    /// test object (`reuseport::objects::TEST`) instead of the steering
    /// program: the cost floor (always slot 0), one step of the steering
    /// path alone, or a variant measured but not offered.
    Reference {
        /// The program's name in the test object.
        program: &'static str,
        /// The plan in the maps (what the program reads, if anything).
        policy: Policy,
    },
}

/// A named model.
#[derive(Clone, Debug)]
pub struct Model {
    /// Its name in the tables.
    pub name: String,
    /// What it is.
    pub design: Design,
}

fn reuseport(kind: PolicyKind, workers: usize) -> Design {
    Design::Reuseport(policy(kind, HashKey::FourTuple, workers))
}

/// `kind` for a group of `workers`, hashing `key` if it hashes.
pub fn policy(kind: PolicyKind, key: HashKey, workers: usize) -> Policy {
    let mut p = Policy::new(kind);
    match kind {
        PolicyKind::Hash | PolicyKind::Consistent => p.key = key,
        // Equal weights: the figures compare spreads, and a weighted
        // spread is uneven by design.
        PolicyKind::Weighted => p.weights = vec![1; workers],
        _ => {}
    }
    p
}

/// The models of the TCP workloads.
pub fn tcp_models(cpus: usize) -> Vec<Model> {
    let mut v = vec![
        Model {
            name: "single-acceptor".into(),
            design: Design::SingleAcceptor,
        },
        Model {
            name: "shared-accept".into(),
            design: Design::SharedAccept,
        },
        Model {
            name: "tokio-default".into(),
            design: Design::TokioDefault,
        },
    ];
    v.extend(reuseport_models(cpus));
    v
}

/// The models of the UDP workload: one socket read by every worker, then
/// the reuseport ones.
pub fn udp_models(cpus: usize) -> Vec<Model> {
    let mut v = vec![Model {
        name: "shared-socket".into(),
        design: Design::SharedAccept,
    }];
    v.extend(reuseport_models(cpus));
    v
}

fn reuseport_models(cpus: usize) -> Vec<Model> {
    let mut v = vec![Model {
        name: "reuseport-kernel".into(),
        design: reuseport(PolicyKind::Kernel, cpus),
    }];
    for kind in PolicyKind::STEERED {
        v.push(Model {
            name: kind.name().into(),
            design: reuseport(kind, cpus),
        });
    }
    v.push(floor());
    v
}

/// The cost floor: a group whose program selects slot 0 and does nothing
/// else.
pub fn floor() -> Model {
    Model {
        name: "floor".into(),
        design: Design::Reference {
            program: reuseport_common::program::FLOOR,
            policy: Policy::new(PolicyKind::Cpu),
        },
    }
}

/// What a running model counts.
#[derive(Debug)]
pub struct Tally {
    /// Served per worker.
    pub served: Vec<AtomicU64>,
    /// Open per worker.
    pub open: Vec<AtomicU64>,
    /// Served on the CPU that received the SYN or datagram.
    pub local: AtomicU64,
    /// Echoes that failed on the server side.
    pub errors: AtomicU64,
}

impl Tally {
    fn new(workers: usize) -> Arc<Self> {
        Arc::new(Tally {
            served: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            open: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            local: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Served per worker now.
    pub fn served(&self) -> Vec<u64> {
        self.served
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Open per worker now.
    pub fn open(&self) -> Vec<u64> {
        self.open
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn count(&self, worker: usize, peer: SocketAddr) {
        self.served[worker % self.served.len()].fetch_add(1, Ordering::Relaxed);
        if client_cpu(peer) == current_cpu() {
            self.local.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The CPU a load-generator client ran on, from its source address.
pub fn client_cpu(peer: SocketAddr) -> Option<usize> {
    match peer.ip() {
        IpAddr::V4(v4) => v4.octets()[1].checked_sub(1).map(usize::from),
        IpAddr::V6(_) => None,
    }
}

fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments, no memory.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// A model serving on its port.
pub struct Running {
    /// The model.
    pub model: Model,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its counts.
    pub tally: Arc<Tally>,
    /// Its program, for the BPF cost.
    pub steering: Option<Arc<Mutex<Steering>>>,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Running {
    /// The program's run time and run count so far.
    pub fn bpf_stats(&self) -> Option<(Duration, u64)> {
        let s = self.steering.as_ref()?;
        let s = lock(s);
        if !s.has_program() {
            return None;
        }
        s.run_stats().ok()
    }

    /// Stops the model.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// One echo connection: count it, then echo until EOF.
async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    worker: usize,
    tally: Arc<Tally>,
) -> io::Result<()> {
    tally.count(worker, peer);
    let open = &tally.open[worker % tally.open.len()];
    open.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 4096];
    let result = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            stream.write_all(&buf[..n]).await?;
        }
    }
    .await;
    open.fetch_sub(1, Ordering::Relaxed);
    if result.is_err() {
        tally.errors.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// Starts `model` on `addr` (TCP or UDP) with one worker per CPU of `cpus`.
pub fn start(model: &Model, addr: SocketAddr, proto: Proto, cpus: &[usize]) -> Result<Running> {
    start_workers(model, addr, proto, cpus, cpus.len())
}

/// Starts `model` on `addr` with `workers` workers spread over `cpus` (a
/// reuseport group; the other designs take one worker per CPU).
pub fn start_workers(
    model: &Model,
    addr: SocketAddr,
    proto: Proto,
    cpus: &[usize],
    workers: usize,
) -> Result<Running> {
    match (&model.design, proto) {
        (Design::Reuseport(policy), _) => {
            start_group(model, addr, proto, cpus, workers, policy.clone(), None)
        }
        (Design::Reference { program, policy }, _) => start_group(
            model,
            addr,
            proto,
            cpus,
            workers,
            policy.clone(),
            Some(program),
        ),
        (Design::SharedAccept, Proto::Tcp) => start_shared_accept(model, addr, cpus),
        (Design::SharedAccept, Proto::Udp) => start_shared_socket(model, addr, cpus),
        (Design::SingleAcceptor, Proto::Tcp) => start_single_acceptor(model, addr, cpus),
        (Design::TokioDefault, Proto::Tcp) => start_tokio_default(model, addr, cpus),
        (d, p) => Err(Error::io(
            format!("model {}", model.name),
            io::Error::other(format!("{d:?} has no {p} form")),
        )),
    }
}

fn start_group(
    model: &Model,
    addr: SocketAddr,
    proto: Proto,
    cpus: &[usize],
    n_workers: usize,
    policy: Policy,
    program: Option<&str>,
) -> Result<Running> {
    let mut builder = Group::builder()
        .addr(addr)
        .proto(proto)
        .workers(n_workers)
        .cpus(cpus.to_vec())
        .policy(policy)
        .pin(false);
    if let Some(p) = program {
        // The reference programs exist only in the test object.
        builder = builder.program(p).object(reuseport::objects::TEST);
    }
    let group = builder.build()?;
    let tally = Tally::new(n_workers);
    let stop = CancellationToken::new();
    let limits = Arc::new(Limits::default());
    let mut workers: Vec<WorkerHandle> = Vec::new();
    for m in group.members() {
        let info = WorkerInfo::new(m.slot, m.cpu);
        let t = tally.clone();
        workers.push(match proto {
            Proto::Tcp => worker::spawn_tcp(
                info,
                m.tcp_listener()?,
                group.worker_stats(m.slot),
                limits.clone(),
                move |stream, conn: Conn| {
                    serve(stream, conn.peer, conn.worker.worker as usize, t.clone())
                },
                stop.clone(),
                Box::new(|| {}),
            )?,
            Proto::Udp => worker::spawn_udp(
                info,
                m.udp_socket()?,
                group.worker_stats(m.slot),
                move |_: &mut [u8], len: usize, peer: SocketAddr| {
                    t.count(info.worker as usize, peer);
                    Some(len)
                },
                stop.clone(),
                Box::new(|| {}),
            )?,
        });
    }
    let steering = group.steering();
    let addr = group.local_addr();
    Ok(Running {
        model: model.clone(),
        addr,
        tally,
        steering,
        stop: Some(Box::new(move || {
            stop.cancel();
            let _ = group.close();
            for w in workers {
                let _ = w.join();
            }
        })),
    })
}

/// Runs `f`'s future on `n` threads pinned to `cpus`, each with a
/// current-thread runtime; returns their handles.
fn pinned_threads<F, Fut>(cpus: &[usize], name: &str, f: F) -> Result<Vec<thread::JoinHandle<()>>>
where
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let mut v = Vec::new();
    for (i, &cpu) in cpus.iter().enumerate() {
        let f = f.clone();
        v.push(
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let _ = sys::pin_current_thread(cpu);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(_) => return,
                    };
                    LocalSet::new().block_on(&rt, f(i));
                })
                .map_err(|e| Error::io("spawning a benchmark thread", e))?,
        );
    }
    Ok(v)
}

fn bind_plain(addr: SocketAddr, proto: Proto) -> Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let s =
        Socket::new(Domain::for_address(addr), ty, Some(p)).map_err(|e| Error::io("socket", e))?;
    // As the group's own sockets: never SO_REUSEADDR on UDP (see
    // reuseport::socket::bind_member).
    if proto == Proto::Tcp {
        s.set_reuse_address(true)
            .map_err(|e| Error::io("SO_REUSEADDR", e))?;
    }
    s.set_nonblocking(true)
        .map_err(|e| Error::io("O_NONBLOCK", e))?;
    if proto == Proto::Udp {
        reuseport::socket::enlarge_receive_buffer(&s, reuseport::socket::UDP_RECEIVE_BUFFER);
    }
    s.bind(&addr.into())
        .map_err(|e| Error::io(format!("binding {addr}"), e))?;
    if proto == Proto::Tcp {
        s.listen(reuseport::group::DEFAULT_BACKLOG)
            .map_err(|e| Error::io("listen", e))?;
    }
    Ok(s)
}

fn start_shared_accept(model: &Model, addr: SocketAddr, cpus: &[usize]) -> Result<Running> {
    let listener: std::net::TcpListener = bind_plain(addr, Proto::Tcp)?.into();
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let tally = Tally::new(cpus.len());
    let stop = CancellationToken::new();
    let (t, s) = (tally.clone(), stop.clone());
    let listener = Arc::new(listener);
    let threads = pinned_threads(cpus, "shared-accept", move |i| {
        let (t, s, l) = (t.clone(), s.clone(), listener.clone());
        async move {
            let Ok(dup) = l.try_clone() else { return };
            let Ok(l) = tokio::net::TcpListener::from_std(dup) else {
                return;
            };
            loop {
                let accepted = tokio::select! {
                    r = l.accept() => r,
                    _ = s.cancelled() => return,
                };
                if let Ok((stream, peer)) = accepted {
                    tokio::task::spawn_local(serve(stream, peer, i, t.clone()));
                }
            }
        }
    })?;
    Ok(running(model, addr, tally, stop, threads))
}

fn start_shared_socket(model: &Model, addr: SocketAddr, cpus: &[usize]) -> Result<Running> {
    let socket: std::net::UdpSocket = bind_plain(addr, Proto::Udp)?.into();
    let addr = socket
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let tally = Tally::new(cpus.len());
    let stop = CancellationToken::new();
    let (t, s) = (tally.clone(), stop.clone());
    let socket = Arc::new(socket);
    let threads = pinned_threads(cpus, "shared-socket", move |i| {
        let (t, s, sock) = (t.clone(), s.clone(), socket.clone());
        async move {
            let Ok(dup) = sock.try_clone() else { return };
            let Ok(sock) = tokio::net::UdpSocket::from_std(dup) else {
                return;
            };
            let mut buf = vec![0u8; 65_536];
            loop {
                let r = tokio::select! {
                    r = sock.recv_from(&mut buf) => r,
                    _ = s.cancelled() => return,
                };
                if let Ok((n, peer)) = r {
                    t.count(i, peer);
                    if sock.send_to(&buf[..n], peer).await.is_err() {
                        t.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    })?;
    Ok(running(model, addr, tally, stop, threads))
}

fn start_single_acceptor(model: &Model, addr: SocketAddr, cpus: &[usize]) -> Result<Running> {
    let listener: std::net::TcpListener = bind_plain(addr, Proto::Tcp)?.into();
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let tally = Tally::new(cpus.len());
    let stop = CancellationToken::new();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in cpus {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        senders.push(tx);
        receivers.push(Mutex::new(Some(rx)));
    }
    let receivers = Arc::new(receivers);
    let (t, s) = (tally.clone(), stop.clone());
    let mut threads = pinned_threads(cpus, "acceptor-worker", move |i| {
        let (t, s) = (t.clone(), s.clone());
        let rx = receivers[i].lock().ok().and_then(|mut r| r.take());
        async move {
            let Some(mut rx) = rx else { return };
            loop {
                let next = tokio::select! {
                    r = rx.recv() => r,
                    _ = s.cancelled() => return,
                };
                let Some((stream, peer)) = next else { return };
                if let Ok(stream) = TcpStream::from_std(stream) {
                    tokio::task::spawn_local(serve(stream, peer, i, t.clone()));
                }
            }
        }
    })?;
    // The one acceptor: blocking accept, hand-off in turn to the workers.
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    listener
        .set_nonblocking(false)
        .map_err(|e| Error::io("O_NONBLOCK", e))?;
    let l = listener.try_clone().map_err(|e| Error::io("dup", e))?;
    threads.push(
        thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || {
                let mut next = 0;
                while !d.load(Ordering::Relaxed) {
                    let Ok((stream, peer)) = l.accept() else {
                        continue;
                    };
                    if d.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = stream.set_nonblocking(true);
                    let _ = senders[next % senders.len()].send((stream, peer));
                    next += 1;
                }
            })
            .map_err(|e| Error::io("spawning the acceptor", e))?,
    );
    let mut r = running(model, addr, tally, stop, threads);
    let inner = r.stop.take();
    r.stop = Some(Box::new(move || {
        done.store(true, Ordering::Relaxed);
        // Wake the blocked accept.
        let _ = std::net::TcpStream::connect(addr);
        if let Some(f) = inner {
            f();
        }
        drop(listener);
    }));
    Ok(r)
}

fn start_tokio_default(model: &Model, addr: SocketAddr, cpus: &[usize]) -> Result<Running> {
    let listener: std::net::TcpListener = bind_plain(addr, Proto::Tcp)?.into();
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let tally = Tally::new(cpus.len());
    let stop = CancellationToken::new();
    let next = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.len())
        .enable_all()
        .on_thread_start(move || {
            WORKER.with(|w| w.set(next.fetch_add(1, Ordering::Relaxed) as usize));
        })
        .build()
        .map_err(|e| Error::io("starting tokio", e))?;
    let (t, s) = (tally.clone(), stop.clone());
    rt.spawn(async move {
        let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let accepted = tokio::select! {
                r = l.accept() => r,
                _ = s.cancelled() => return,
            };
            if let Ok((stream, peer)) = accepted {
                let t = t.clone();
                tokio::spawn(async move {
                    let worker = WORKER.with(|w| w.get());
                    let _ = serve(stream, peer, worker, t).await;
                });
            }
        }
    });
    Ok(Running {
        model: model.clone(),
        addr,
        tally,
        steering: None,
        stop: Some(Box::new(move || {
            stop.cancel();
            rt.shutdown_timeout(Duration::from_secs(2));
        })),
    })
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn running(
    model: &Model,
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: CancellationToken,
    threads: Vec<thread::JoinHandle<()>>,
) -> Running {
    Running {
        model: model.clone(),
        addr,
        tally,
        steering: None,
        stop: Some(Box::new(move || {
            stop.cancel();
            for t in threads {
                let _ = t.join();
            }
        })),
    }
}
