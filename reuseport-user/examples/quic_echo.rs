//! A QUIC echo server on quinn: one endpoint per worker, each on its own
//! socket of the group, steered by the `quic` key so that every packet of
//! a connection reaches the worker that holds it: through `ctl drain`,
//! `ctl add-worker`, and a client that changes its address.
//!
//! Each worker's endpoint mints connection IDs that start with the
//! worker's cookie ([`reuseport::cookie::Minter`]). After the handshake a
//! client addresses every packet to such an ID, and the program sends it
//! to the socket that minted it, whatever the client's address and port.
//! The handshake's first packets (Initial, 0-RTT) carry an ID the client
//! chose: the policy places them, on a hash of that ID.
//!
//! ```sh
//! cargo run --release --example quic_echo -- 127.0.0.1:4433 --cert /tmp/echo.der
//! # any QUIC client that trusts /tmp/echo.der (server name "localhost",
//! # ALPN "echo"); each bidirectional stream is echoed back.
//! reuseport stats --group quic-echo
//! ```
//!
//! Options: `--workers N`, `--policy NAME` (default `hash`; `kernel`: no
//! program, for comparison), `--group NAME` (default `quic-echo`),
//! `--cert PATH` (the certificate, DER, and its key at PATH with the
//! extension `.key`: used if they exist, else made self-signed and written
//! there),
//! `--metrics ADDR`, `--drain-timeout SECONDS` (default 10), `--takeover
//! GROUP` (take over a running group of this name: its address, and its
//! cookie secret, so that its connections' cookies stay valid).

use std::{net::SocketAddr, rc::Rc, sync::Arc, time::Duration};

use quinn::{ConnectionId, ConnectionIdGenerator};
use reuseport::{
    cookie::Minter, FlowCounter, Group, HashKey, Policy, PolicyKind, Proto, ServeOptions, Server,
    UdpWorker,
};

/// Connection IDs this long: the 8-byte cookie, then 8 random bytes.
const CID_LEN: usize = 16;
/// The application protocol both sides name in the handshake.
const ALPN: &[u8] = b"echo";

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct Args {
    addr: SocketAddr,
    workers: Option<usize>,
    policy: PolicyKind,
    group: String,
    cert: Option<std::path::PathBuf>,
    metrics: Option<SocketAddr>,
    drain_timeout: Duration,
    takeover: Option<String>,
}

fn usage(what: &str) -> Box<dyn std::error::Error> {
    format!(
        "{what}; usage: quic_echo [ADDRESS] [--workers N] [--policy NAME] [--group NAME] \
         [--cert PATH] [--metrics ADDR] [--drain-timeout SECONDS] [--takeover GROUP]"
    )
    .into()
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        addr: "127.0.0.1:4433".parse()?,
        workers: None,
        policy: PolicyKind::Hash,
        group: "quic-echo".into(),
        cert: None,
        metrics: None,
        drain_timeout: Duration::from_secs(10),
        takeover: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--workers" => args.workers = Some(value()?.parse()?),
            "--policy" => args.policy = value()?.parse()?,
            "--group" => args.group = value()?,
            "--cert" => args.cert = Some(value()?.into()),
            "--metrics" => args.metrics = Some(value()?.parse()?),
            "--drain-timeout" => args.drain_timeout = Duration::from_secs(value()?.parse()?),
            "--takeover" => args.takeover = Some(value()?),
            _ if !a.starts_with('-') => {
                args.addr = a
                    .parse()
                    .map_err(|_| usage(&format!("bad address `{a}`")))?
            }
            _ => return Err(usage(&format!("unknown option `{a}`"))),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let (cert, key) = identity(args.cert.as_deref())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key.into())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));

    let mut policy = Policy::new(args.policy);
    // Cookies in the connection IDs steer before any policy; the policy
    // places new connections (hashing policies: on the client's ID).
    policy.key = HashKey::Quic;
    let mut builder = Group::builder()
        .addr(args.addr)
        .proto(Proto::Udp)
        .policy(policy);
    let name = match &args.takeover {
        Some(old) => {
            builder = builder.takeover(old.clone());
            old.clone()
        }
        None => {
            builder = builder.name(args.group.clone());
            args.group.clone()
        }
    };
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    let group = builder.build()?;
    let addr = group.local_addr();
    let workers = group.members().len();
    println!("group {name} on udp {addr}");
    let mut options = ServeOptions::default();
    options.limits.drain_timeout = args.drain_timeout;
    options.metrics_addr = args.metrics;
    // A server for many connections: the process is ours.
    options.raise_fd_limit = true;
    let server = Server::start_udp_with(
        group,
        move |worker: UdpWorker| serve(worker, server_config.clone()),
        options,
    )?;
    if let Some(m) = server.metrics_addr() {
        println!("metrics on http://{m}/metrics");
    }
    println!("ready: serving quic {addr} with {workers} workers");
    server
        .run(async {
            let _ = reuseport::server::signalled().await;
        })
        .await?;
    Ok(())
}

/// The server's certificate and key: those at `path` (DER) and
/// `path.key` if both exist (a process taking over a group serves its
/// predecessor's), else a new self-signed one for "localhost", written
/// there for clients to trust.
fn identity(
    path: Option<&std::path::Path>,
) -> Result<
    (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivatePkcs8KeyDer<'static>,
    ),
    Box<dyn std::error::Error>,
> {
    let key_path = path.map(|p| p.with_extension("key"));
    if let (Some(p), Some(k)) = (path, &key_path) {
        if p.exists() && k.exists() {
            return Ok((std::fs::read(p)?.into(), std::fs::read(k)?.into()));
        }
    }
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let key = made.key_pair.serialize_der();
    if let (Some(p), Some(k)) = (path, &key_path) {
        std::fs::write(k, &key)?;
        std::fs::write(p, made.cert.der())?;
    }
    Ok((made.cert.der().clone(), key.into()))
}

/// One worker: a quinn endpoint on the worker's socket, until it drains;
/// then no new connections, and the open ones finish.
async fn serve(worker: UdpWorker, server_config: quinn::ServerConfig) -> std::io::Result<()> {
    let drain = worker.until_drain();
    let counter = worker.counter();
    let me = worker.info.worker;
    let minter = worker.minter;
    let drain_timeout = worker.drain_timeout;
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(move || Box::new(CookieIds { minter }));
    worker.socket.set_nonblocking(true)?;
    let endpoint = quinn::Endpoint::new(
        config,
        Some(server_config),
        worker.socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let counter = counter.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = connection(incoming, counter).await {
                        log::debug!("worker {me}: {e}");
                    }
                });
            }
        }
    }
    // Draining: out of the policy, no new connection reaches this socket,
    // and none is accepted; the cookies of the open ones still bring their
    // packets here until they close.
    endpoint.set_server_config(None);
    if tokio::time::timeout(drain_timeout, endpoint.wait_idle())
        .await
        .is_err()
    {
        log::warn!(
            "worker {me}: {} connections still open after {drain_timeout:?}: closing them",
            endpoint.open_connections()
        );
        endpoint.close(0u32.into(), b"server going away");
        endpoint.wait_idle().await;
    }
    Ok(())
}

/// Echoes every bidirectional stream of one connection.
async fn connection(
    incoming: quinn::Incoming,
    counter: FlowCounter,
) -> Result<(), Box<dyn std::error::Error>> {
    let conn = incoming.await?;
    let _open = Rc::new(counter.open_flow());
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let counter = counter.clone();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                counter.add_bytes(n as u64);
            }
            let _ = send.finish();
        });
    }
}

/// Connection IDs that start with the worker's cookie, then random bytes
/// (so that IDs of one connection are not all alike to an observer past
/// the cookie, which names the worker, not the connection).
struct CookieIds {
    minter: Minter,
}

impl ConnectionIdGenerator for CookieIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut id = [0u8; CID_LEN];
        id[..reuseport::cookie::LEN].copy_from_slice(&self.minter.mint());
        // The process's TLS provider's generator (ring: the kernel's).
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut id[reuseport::cookie::LEN..])
            .expect("the system's random generator");
        ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}
