//! `reuseport-bench --quic-churn N`: QUIC connections through changes of
//! the group. N connections, each from its own port with a stream echoed
//! on it every few hundred milliseconds, while the busiest worker drains,
//! a worker is added, and then a new generation of the server takes the
//! group over (a restart: `GroupBuilder::takeover`, in this process, as
//! `reuseport run --takeover` does from another); counted: the
//! connections that broke. Run once with the `quic` key (cookies in the
//! connection IDs) and once with the kernel's own hash, in the same process
//! and network namespace.
//!
//! The server is a quinn endpoint per worker, as in the library's
//! `quic_echo` example: each on its own socket of the group, minting
//! connection IDs that start with its cookie.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use reuseport::{
    cookie::Minter,
    error::{Error, Result},
    Control, Group, HashKey, Policy, PolicyKind, Proto, ServeOptions, Server, UdpWorker,
};

/// Workers of each group.
const WORKERS: usize = 3;
/// Between two streams of one connection.
const EVERY: Duration = Duration::from_millis(300);
/// Bytes echoed per stream.
const PAYLOAD: usize = 600;
const ALPN: &[u8] = b"echo";

/// One policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnRow {
    /// The policy (and key).
    pub model: String,
    /// Connections established before the changes.
    pub connections: usize,
    /// Connections that failed to connect.
    pub failed_to_connect: usize,
    /// Established connections that broke.
    pub broken: usize,
    /// Streams echoed in all.
    pub streams: u64,
    /// The first failure, if any.
    pub first_failure: Option<String>,
}

/// Runs the churn with `connections` connections under the `quic` key
/// (policy `hash`) and under the kernel's hash.
pub fn run(connections: usize) -> Result<Vec<ChurnRow>> {
    let mut rows = Vec::new();
    for kind in [PolicyKind::Hash, PolicyKind::Kernel] {
        rows.push(one(kind, connections)?);
    }
    Ok(rows)
}

fn io(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(what.to_string(), std::io::Error::other(e.to_string()))
}

fn one(kind: PolicyKind, connections: usize) -> Result<ChurnRow> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .map_err(|e| io("making a certificate", e))?;
    let cert = made.cert.der().clone();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.key_pair.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| io("TLS", e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .map_err(|e| io("TLS", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| io("QUIC TLS", e))?,
    ));

    let mut policy = Policy::new(kind);
    policy.key = HashKey::Quic;
    let name = format!("bench-quic-{}-{kind}", std::process::id());
    let group = Group::builder()
        .addr("127.0.0.1:0".parse().expect("an address"))
        .proto(Proto::Udp)
        .workers(WORKERS)
        .name(name.clone())
        .policy(policy)
        .build()?;
    let addr = group.local_addr();
    let handle = group.handle();
    let options = {
        let mut options = ServeOptions::default();
        options.limits.drain_timeout = Duration::from_secs(30);
        options.limits.max_connections = 4 * 1024;
        options.raise_fd_limit = true;
        options
    };
    let successor_config = server_config.clone();
    let server = Server::start_udp_with(
        group,
        move |w: UdpWorker| serve(w, server_config.clone()),
        options.clone(),
    )?;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert)
        .map_err(|e| io("trusting the certificate", e))?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| io("TLS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| io("QUIC TLS", e))?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .expect("10 s is a valid idle timeout"),
    ));
    client.transport_config(Arc::new(transport));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("a client runtime", e))?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let settled = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let (client, stop, connected, settled) = (
            client.clone(),
            stop.clone(),
            connected.clone(),
            settled.clone(),
        );
        tasks.push(rt.spawn(connection(i, addr, client, stop, connected, settled)));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while settled.load(Ordering::Acquire) < connections as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The changes: the busiest worker drains, then a worker is added.
    std::thread::sleep(Duration::from_millis(1500));
    let records = handle.workers();
    let busiest = (0..WORKERS as u32)
        .max_by_key(|&s| records[s as usize].active)
        .unwrap_or(0);
    Control::open(Some(&name))?.drain(busiest)?;
    std::thread::sleep(Duration::from_millis(1500));
    Control::open(Some(&name))?.add_worker(None, 1, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(1500));
    // A restart: a new generation takes the group over; the old one drains
    // and keeps serving the flows it has until they end.
    let successor = Group::builder()
        .addr(addr)
        .proto(Proto::Udp)
        .workers(WORKERS)
        .takeover(name.clone())
        .policy(handle.policy()?)
        .build()?;
    let successor = Server::start_udp_with(
        successor,
        move |w: UdpWorker| serve(w, successor_config.clone()),
        options,
    )?;
    std::thread::sleep(Duration::from_millis(4000));
    stop.store(true, Ordering::Release);

    let mut row = ChurnRow {
        model: match kind {
            PolicyKind::Kernel => "kernel".into(),
            k => format!("{k} --hash-key quic"),
        },
        connections: connected.load(Ordering::Acquire) as usize,
        failed_to_connect: 0,
        broken: 0,
        streams: 0,
        first_failure: None,
    };
    for t in tasks {
        let (established, streams, failure) = rt.block_on(t).map_err(|e| io("a client task", e))?;
        row.streams += streams;
        if let Some(f) = failure {
            if established {
                row.broken += 1;
            } else {
                row.failed_to_connect += 1;
            }
            row.first_failure.get_or_insert(f);
        }
    }
    drop(rt);
    successor.shutdown()?;
    server.shutdown()?;
    Ok(row)
}

/// One client connection from its own endpoint: streams until `stop`.
/// Returns whether it was established, the streams echoed, and why it
/// failed, if it did.
async fn connection(
    i: usize,
    server: std::net::SocketAddr,
    config: quinn::ClientConfig,
    stop: Arc<std::sync::atomic::AtomicBool>,
    connected: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
) -> (bool, u64, Option<String>) {
    let endpoint = match quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")) {
        Ok(e) => e,
        Err(e) => {
            settled.fetch_add(1, Ordering::Release);
            return (false, 0, Some(format!("endpoint: {e}")));
        }
    };
    let conn = match endpoint.connect_with(config, server, "localhost") {
        Ok(c) => c.await.map_err(|e| format!("handshake: {e}")),
        Err(e) => Err(format!("connect: {e}")),
    };
    settled.fetch_add(1, Ordering::Release);
    let conn = match conn {
        Ok(c) => c,
        Err(e) => return (false, 0, Some(e)),
    };
    connected.fetch_add(1, Ordering::Release);
    let payload: Vec<u8> = (0..PAYLOAD).map(|b| (b + i) as u8).collect();
    tokio::time::sleep(EVERY.mul_f64((i % 16) as f64 / 16.0)).await;
    let mut streams = 0;
    let mut failure = None;
    while !stop.load(Ordering::Acquire) {
        match echo(&conn, &payload).await {
            Ok(()) => streams += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        tokio::time::sleep(EVERY).await;
    }
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    (true, streams, failure)
}

async fn echo(conn: &quinn::Connection, payload: &[u8]) -> std::result::Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
    send.write_all(payload)
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    let back = recv
        .read_to_end(payload.len() + 1)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err("the echo differs".into());
    }
    Ok(())
}

/// A worker: a quinn endpoint on its socket until it drains, then its open
/// connections finish (see the library's `quic_echo` example).
async fn serve(worker: UdpWorker, server_config: quinn::ServerConfig) -> std::io::Result<()> {
    let drain = worker.until_drain();
    let counter = worker.counter();
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
                    let Ok(conn) = incoming.await else { return };
                    let _open = counter.open_flow();
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::task::spawn_local(async move {
                            let mut buf = vec![0u8; 4096];
                            while let Ok(Some(n)) = recv.read(&mut buf).await {
                                if send.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            let _ = send.finish();
                        });
                    }
                });
            }
        }
    }
    endpoint.set_server_config(None);
    if tokio::time::timeout(drain_timeout, endpoint.wait_idle())
        .await
        .is_err()
    {
        endpoint.close(0u32.into(), b"server going away");
        endpoint.wait_idle().await;
    }
    Ok(())
}

/// 16-byte connection IDs: the worker's cookie, then random bytes.
struct CookieIds {
    minter: Minter,
}

impl quinn::ConnectionIdGenerator for CookieIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 16];
        id[..reuseport::cookie::LEN].copy_from_slice(&self.minter.mint());
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut id[reuseport::cookie::LEN..])
            .expect("the system's random generator");
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        16
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The runs as a Markdown table.
pub fn markdown(rows: &[ChurnRow]) -> String {
    let mut s = String::from(
        "### quic-churn\n\nQUIC connections (one stream each every 300 ms) while the busiest of 3 workers drains, a worker is added and a new generation takes the group over\n\n| model | connections | broken | failed to connect | streams | first failure |\n|---|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.model,
            r.connections,
            r.broken,
            r.failed_to_connect,
            r.streams,
            r.first_failure.as_deref().unwrap_or("-")
        ));
    }
    s
}
