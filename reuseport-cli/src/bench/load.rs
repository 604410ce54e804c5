//! The load generator: client threads pinned across the CPUs, each on a
//! current-thread tokio runtime running many clients, from many source
//! addresses in 127.0.0.0/8 (127.(cpu+1).thread.n, so the server can tell
//! which CPU sent a connection). Every echo is checked byte for byte.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, UdpSocket},
};

/// Size of each request.
pub const PAYLOAD: usize = 64;

/// What an epoch of load measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Operations completed and verified.
    pub ops: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The first few failures, as text.
    pub failures: Vec<String>,
    /// Latency of each operation, in microseconds.
    pub latency: Histogram<u64>,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl Outcome {
    /// An outcome with nothing counted.
    pub fn empty() -> Self {
        Outcome {
            ops: 0,
            errors: 0,
            failures: Vec::new(),
            latency: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn fail(&mut self, what: String) {
        self.errors += 1;
        if self.failures.len() < 5 {
            self.failures.push(what);
        }
    }

    /// Adds another outcome's counts.
    pub fn merge(&mut self, other: &Outcome) {
        self.ops += other.ops;
        self.errors += other.errors;
        for f in &other.failures {
            if self.failures.len() < 5 {
                self.failures.push(f.clone());
            }
        }
        let _ = self.latency.add(&other.latency);
        self.elapsed += other.elapsed;
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.ops as f64 / self.elapsed.as_secs_f64()
        }
    }
}

/// A latency histogram of 1 µs to 60 s, three significant figures.
pub fn histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5): it cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The load's shape.
#[derive(Clone, Debug)]
pub struct Shape {
    /// CPUs to run client threads on (one thread each).
    pub cpus: Vec<usize>,
    /// Clients (connections at once) per thread.
    pub per_thread: usize,
}

/// A client's source address: 127.(cpu+1).(thread+1).(n % 250 + 1).
fn source(cpu: usize, thread: usize, n: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(
            127,
            (cpu + 1) as u8,
            (thread + 1) as u8,
            (n % 250 + 1) as u8,
        ),
        0,
    ))
}

fn payload(n: u64) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (n as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    p
}

/// Runs `client(cpu, thread, k, deadline)` as `shape.per_thread` tasks on
/// each client thread until `duration` passes, and merges what they measured.
fn run<F, Fut>(shape: &Shape, duration: Duration, client: F) -> Outcome
where
    F: Fn(usize, usize, usize, Instant) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Outcome> + 'static,
{
    let start = Instant::now();
    let deadline = start + duration;
    let threads: Vec<_> = shape
        .cpus
        .iter()
        .enumerate()
        .map(|(t, &cpu)| {
            let client = client.clone();
            let per_thread = shape.per_thread;
            thread::spawn(move || {
                let _ = reuseport::sys::pin_current_thread(cpu);
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    let mut o = Outcome::empty();
                    o.fail("could not start a client runtime".into());
                    return o;
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let tasks: Vec<_> = (0..per_thread)
                        .map(|k| tokio::task::spawn_local(client(cpu, t, k, deadline)))
                        .collect();
                    let mut total = Outcome::empty();
                    for task in tasks {
                        match task.await {
                            Ok(o) => total.merge(&o),
                            Err(e) => total.fail(format!("client task: {e}")),
                        }
                    }
                    total
                })
            })
        })
        .collect();
    let mut total = Outcome::empty();
    for t in threads {
        match t.join() {
            Ok(o) => total.merge(&o),
            Err(_) => total.fail("client thread panicked".into()),
        }
    }
    total.elapsed = start.elapsed();
    total
}

async fn connect(src: SocketAddr, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(src)?;
    tokio::time::timeout(Duration::from_secs(5), s.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn roundtrip(s: &mut tokio::net::TcpStream, p: &[u8; PAYLOAD]) -> std::io::Result<()> {
    s.write_all(p).await?;
    let mut got = [0u8; PAYLOAD];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    if &got != p {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// One connection from `src`: connect, echo one request, close; counted
/// (with its latency) or recorded as a failure in `o`.
async fn one_connection(addr: SocketAddr, src: SocketAddr, n: u64, o: &mut Outcome) {
    let start = Instant::now();
    let r = async {
        let mut s = connect(src, addr).await?;
        roundtrip(&mut s, &payload(n)).await
    }
    .await;
    match r {
        Ok(()) => {
            o.ops += 1;
            let _ = o.latency.record(start.elapsed().as_micros() as u64);
        }
        Err(e) => o.fail(format!("connection: {e}")),
    }
}

/// Connection rate: each client connects, echoes 64 bytes, closes, again.
/// Latency is that of the whole connection.
pub fn connection_rate(addr: SocketAddr, shape: &Shape, duration: Duration) -> Outcome {
    run(shape, duration, move |cpu, t, k, deadline| async move {
        let mut o = Outcome::empty();
        let mut n = k;
        while Instant::now() < deadline {
            n += 1;
            one_connection(addr, source(cpu, t, n), n as u64, &mut o).await;
        }
        o
    })
}

/// Exactly `total` connections, spread over the clients (for distribution
/// figures over a known count).
pub fn connections(addr: SocketAddr, shape: &Shape, total: usize) -> Outcome {
    let clients = shape.cpus.len() * shape.per_thread;
    let each = total.div_ceil(clients.max(1));
    let deadline = Duration::from_secs(600);
    run(shape, deadline, move |cpu, t, k, _| async move {
        let mut o = Outcome::empty();
        for i in 0..each {
            let n = k * each + i;
            one_connection(addr, source(cpu, t, n), n as u64, &mut o).await;
        }
        o
    })
}

/// Persistent echo, closed loop: each client keeps one connection and
/// sends the next request when the last echo is back.
pub fn persistent(addr: SocketAddr, shape: &Shape, duration: Duration) -> Outcome {
    run(shape, duration, move |cpu, t, k, deadline| async move {
        let mut o = Outcome::empty();
        let mut s = match connect(source(cpu, t, k), addr).await {
            Ok(s) => s,
            Err(e) => {
                o.fail(format!("connect: {e}"));
                return o;
            }
        };
        let mut n = 0u64;
        while Instant::now() < deadline {
            n += 1;
            let start = Instant::now();
            match roundtrip(&mut s, &payload(n)).await {
                Ok(()) => {
                    o.ops += 1;
                    let _ = o.latency.record(start.elapsed().as_micros() as u64);
                }
                Err(e) => {
                    o.fail(format!("request: {e}"));
                    break;
                }
            }
        }
        o
    })
}

/// Persistent echo, open loop: `threads` blocking clients (pinned across
/// `cpus`), each sending at a fixed rate whatever the server does, so that
/// a slow answer delays the count of every request scheduled behind it
/// (latency is measured from when a request was due, not when it was sent:
/// no coordinated omission).
pub fn open_loop(
    addr: SocketAddr,
    cpus: &[usize],
    threads: usize,
    rate: f64,
    duration: Duration,
) -> Outcome {
    let interval = Duration::from_secs_f64(threads as f64 / rate.max(1.0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let cpu = cpus[t % cpus.len()];
            thread::spawn(move || {
                let _ = reuseport::sys::pin_current_thread(cpu);
                let mut o = Outcome::empty();
                let sock = match socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    None,
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        o.fail(format!("socket: {e}"));
                        return o;
                    }
                };
                let _ = sock.set_reuse_address(true);
                let connected = sock
                    .bind(&source(cpu, 200 + t, t).into())
                    .and_then(|()| sock.connect(&addr.into()));
                if let Err(e) = connected {
                    o.fail(format!("connect: {e}"));
                    return o;
                }
                let mut s: std::net::TcpStream = sock.into();
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                // Stagger the clients within one interval.
                let begin = Instant::now() + interval.mul_f64(t as f64 / threads as f64);
                let mut n = 0u64;
                loop {
                    let due = begin + interval.mul_f64(n as f64);
                    if due >= start + duration {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    n += 1;
                    let p = payload(n);
                    let mut got = [0u8; PAYLOAD];
                    match s.write_all(&p).and_then(|()| s.read_exact(&mut got)) {
                        Ok(()) if got == p => {
                            o.ops += 1;
                            let _ = o.latency.record(due.elapsed().as_micros().max(1) as u64);
                        }
                        Ok(()) => o.fail("echo differs".into()),
                        Err(e) => {
                            o.fail(format!("request: {e}"));
                            break;
                        }
                    }
                }
                o
            })
        })
        .collect();
    let mut total = Outcome::empty();
    for h in handles {
        match h.join() {
            Ok(o) => total.merge(&o),
            Err(_) => total.fail("client thread panicked".into()),
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// A skewed mix: `long` connections opened first and held for the whole
/// epoch (a slow trickle of requests), while the clients churn short ones.
/// `snapshot` is called with the long connections still open; its result
/// is returned with the outcome of the short ones.
pub fn skewed<T>(
    addr: SocketAddr,
    shape: &Shape,
    long: usize,
    duration: Duration,
    snapshot: impl FnOnce() -> T,
) -> (Outcome, T) {
    let mut held = Vec::new();
    let mut o = Outcome::empty();
    // Interleave: one long, a few short, so that a policy that does not
    // look at load puts the long ones where the turn happens to be.
    for i in 0..long {
        let src = source(shape.cpus[i % shape.cpus.len()], 220, i);
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
        let s = sock.and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&src.into())?;
            s.connect(&addr.into())?;
            Ok(std::net::TcpStream::from(s))
        });
        match s {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let p = payload(i as u64);
                let mut got = [0u8; PAYLOAD];
                match s.write_all(&p).and_then(|()| s.read_exact(&mut got)) {
                    Ok(()) if got == p => held.push(s),
                    _ => o.fail("long connection: no echo".into()),
                }
            }
            Err(e) => o.fail(format!("long connection: {e}")),
        }
        let short = connections(
            addr,
            &Shape {
                cpus: vec![shape.cpus[i % shape.cpus.len()]],
                per_thread: 1,
            },
            1,
        );
        o.merge(&short);
    }
    let churn = connection_rate(addr, shape, duration);
    o.merge(&churn);
    // Let the last short connections finish on the server.
    thread::sleep(Duration::from_millis(100));
    let snap = snapshot();
    drop(held);
    (o, snap)
}

/// UDP echo, closed loop: each client sends a 64-byte datagram and waits
/// for its echo (a lost datagram counts as a failure after 1 s).
pub fn udp(addr: SocketAddr, shape: &Shape, duration: Duration) -> Outcome {
    run(shape, duration, move |cpu, t, k, deadline| async move {
        let mut o = Outcome::empty();
        let s = match UdpSocket::bind(source(cpu, t, k)).await {
            Ok(s) => s,
            Err(e) => {
                o.fail(format!("bind: {e}"));
                return o;
            }
        };
        if let Err(e) = s.connect(addr).await {
            o.fail(format!("connect: {e}"));
            return o;
        }
        let mut n = 0u64;
        let mut got = [0u8; PAYLOAD];
        while Instant::now() < deadline {
            n += 1;
            let p = payload(n);
            let start = Instant::now();
            let r = async {
                s.send(&p).await?;
                let len = tokio::time::timeout(Duration::from_secs(1), s.recv(&mut got))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo within 1 s")
                    })??;
                if got[..len] != p {
                    return Err(std::io::Error::other("echo differs"));
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            match r {
                Ok(()) => {
                    o.ops += 1;
                    let _ = o.latency.record(start.elapsed().as_micros() as u64);
                }
                Err(e) => o.fail(format!("datagram: {e}")),
            }
        }
        o
    })
}

/// Opens `n` connections (from many source addresses), echoes one byte on
/// each, and keeps them open.
pub fn hold(addr: SocketAddr, n: usize) -> (Vec<std::net::TcpStream>, Outcome) {
    let mut o = Outcome::empty();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let src = source(i % 2, 230 + i / 62_500, i / 250);
        let r = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).and_then(
            |s| {
                s.set_reuse_address(true)?;
                s.bind(&src.into())?;
                s.connect(&addr.into())?;
                let mut s = std::net::TcpStream::from(s);
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(&[i as u8])?;
                let mut b = [0u8];
                s.read_exact(&mut b)?;
                Ok(s)
            },
        );
        match r {
            Ok(s) => {
                o.ops += 1;
                let _ = o.latency.record(start.elapsed().as_micros() as u64);
                held.push(s);
            }
            Err(e) => o.fail(format!("connection {i}: {e}")),
        }
    }
    (held, o)
}

/// Echoes 8 bytes on each of `held`.
pub fn echo_all(held: &[std::net::TcpStream]) -> Outcome {
    let mut o = Outcome::empty();
    for (i, s) in held.iter().enumerate() {
        let p = payload(i as u64);
        let mut got = [0u8; 8];
        let mut s = s;
        match s.write_all(&p[..8]).and_then(|()| s.read_exact(&mut got)) {
            Ok(()) if got == p[..8] => o.ops += 1,
            Ok(()) => o.fail(format!("connection {i}: echo differs")),
            Err(e) => o.fail(format!("connection {i}, held: {e}")),
        }
    }
    o
}

/// A child process (`reuseport bench-hold`) that holds idle connections:
/// it opens them, reports, echoes on each when asked, reports, exits.
pub struct HoldChild {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl HoldChild {
    /// Starts the child, which opens `n` connections to `addr`.
    pub fn spawn(addr: SocketAddr, n: usize) -> reuseport::error::Result<Self> {
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe()
            .map_err(|e| reuseport::error::Error::io("finding this program", e))?;
        let mut child = Command::new(exe)
            .args([
                "bench-hold",
                "--addr",
                &addr.to_string(),
                "--count",
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| reuseport::error::Error::io("starting the client process", e))?;
        let out = std::io::BufReader::new(child.stdout.take().ok_or_else(|| {
            reuseport::error::Error::io("the client process", std::io::Error::other("no stdout"))
        })?);
        Ok(HoldChild { child, out })
    }

    fn report(&mut self) -> reuseport::error::Result<Outcome> {
        use std::io::BufRead;
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| reuseport::error::Error::io("reading the client process", e))?;
        let mut o = Outcome::empty();
        let mut fields = line.trim().splitn(3, ' ');
        let _ = fields.next();
        o.ops = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if let Some(rest) = fields.next() {
            let (errors, first) = rest.split_once(' ').unwrap_or((rest, ""));
            o.errors = errors.parse().unwrap_or(0);
            if !first.is_empty() {
                o.failures.push(first.to_string());
            }
        }
        if line.is_empty() {
            o.fail("the client process ended early".into());
        }
        Ok(o)
    }

    /// Waits until every connection is open (and echoed once).
    pub fn held(&mut self) -> reuseport::error::Result<Outcome> {
        self.report()
    }

    /// Has every connection echo again, then ends the child.
    pub fn echo_all(mut self) -> reuseport::error::Result<Outcome> {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"echo\n");
            let _ = stdin.flush();
        }
        let o = self.report()?;
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        Ok(o)
    }
}

/// The child's side of [`HoldChild`]: `reuseport bench-hold`.
pub fn hold_child(addr: SocketAddr, n: usize) -> reuseport::error::Result<()> {
    reuseport::sys::raise_fd_limit();
    let (held, o) = hold(addr, n);
    let say = |what: &str, o: &Outcome| {
        println!(
            "{what} {} {} {}",
            o.ops,
            o.errors,
            o.failures.first().cloned().unwrap_or_default()
        );
        let _ = std::io::stdout().flush();
    };
    say("held", &o);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    say("echoed", &echo_all(&held));
    Ok(())
}
