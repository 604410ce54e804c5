//! QUIC: the `quic_echo` example as a server, a quinn client fleet that
//! keeps streams in flight on many connections while the group changes
//! (drain, add-worker, takeover), and hand-built QUIC packets for the
//! program's header parser.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{binary, unique_group, Server};

/// The application protocol the example speaks.
pub const ALPN: &[u8] = b"echo";

/// The `quic_echo` example, built by `cargo xtask test` (`cargo build
/// --examples`) next to the `reuseport` binary.
pub fn example_path() -> PathBuf {
    let path = binary()
        .parent()
        .expect("target directory")
        .join("examples")
        .join("quic_echo");
    assert!(
        path.exists(),
        "{} is built by `cargo xtask test` (cargo build --examples)",
        path.display()
    );
    path
}

/// A running `quic_echo` and the certificate its clients trust.
pub struct QuicEcho {
    /// The process (stopped when dropped), its group, address and metrics.
    pub server: Server,
    /// Its self-signed certificate (DER).
    pub cert: PathBuf,
}

impl QuicEcho {
    /// Starts `quic_echo 127.0.0.1:0 --group UNIQUE --cert TMP --metrics
    /// 127.0.0.1:0 ARGS` and waits until it serves.
    pub fn start(args: &[&str]) -> QuicEcho {
        let group = unique_group();
        let cert = std::env::temp_dir().join(format!("{group}.der"));
        let mut cmd = Command::new(example_path());
        cmd.args(["127.0.0.1:0", "--group", &group, "--metrics", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&cert)
            .args(args)
            .env("RUST_LOG", "info");
        let server = match Server::spawn(&mut cmd) {
            Ok(s) => s,
            Err(f) => panic!(
                "quic_echo did not start ({}):\n{}{}",
                f.status, f.stdout, f.stderr
            ),
        };
        assert_eq!(server.group, group, "banner: {:?}", server.banner);
        QuicEcho { server, cert }
    }

    /// Starts another `quic_echo` that takes this one's group over
    /// (`--takeover GROUP`), serving the same certificate: the successor.
    /// This process then drains and exits on its own.
    pub fn take_over(&self, args: &[&str]) -> QuicEcho {
        let mut cmd = Command::new(example_path());
        cmd.args(["--takeover", &self.server.group, "--metrics", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&self.cert)
            .args(args)
            .env("RUST_LOG", "info");
        let server = match Server::spawn(&mut cmd) {
            Ok(s) => s,
            Err(f) => panic!(
                "quic_echo --takeover did not start ({}):\n{}{}",
                f.status, f.stdout, f.stderr
            ),
        };
        assert_eq!(
            server.group, self.server.group,
            "banner: {:?}",
            server.banner
        );
        QuicEcho {
            server,
            cert: self.cert.clone(),
        }
    }

    /// The group's address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

impl Drop for QuicEcho {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
        let _ = std::fs::remove_file(self.cert.with_extension("key"));
    }
}

/// A client configuration that trusts the certificate in `cert` (DER) for
/// the name "localhost", and speaks [`ALPN`].
pub fn client_config(cert: &Path) -> quinn::ClientConfig {
    let der = std::fs::read(cert).expect("reading the server's certificate");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .expect("a valid certificate");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Loss of a connection shows as an error within this, not a hang.
    transport.max_idle_timeout(Some(
        Duration::from_secs(10).try_into().expect("idle timeout"),
    ));
    config.transport_config(Arc::new(transport));
    config
}

/// A client endpoint of its own (its own source port) on loopback. Call
/// it inside a tokio runtime.
pub fn client_endpoint(config: &quinn::ClientConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    ep.set_default_client_config(config.clone());
    ep
}

/// Connects to `server` from `endpoint`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
    endpoint
        .connect(server, "localhost")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// One bidirectional stream: sends `payload`, reads the echo back and
/// checks it.
pub async fn echo_stream(conn: &quinn::Connection, payload: &[u8]) -> Result<(), String> {
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
        return Err(format!(
            "echo of {} bytes came back as {} different bytes",
            payload.len(),
            back.len()
        ));
    }
    Ok(())
}

/// `n` new connections to `addr` at once, each from its own endpoint:
/// one stream echoed, then closed. The outcome of each. Call it inside a
/// tokio runtime.
pub async fn fresh_connections(
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    n: u64,
) -> Vec<Result<(), String>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let ep = client_endpoint(&config);
            let conn = connect(&ep, addr).await?;
            echo_stream(&conn, &crate::pattern(100, i)).await?;
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok(())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a connection's task"));
    }
    out
}

/// What a [`Fleet`] saw.
#[derive(Debug, Default)]
pub struct FleetResult {
    /// Connections established.
    pub connected: usize,
    /// Connections that failed to connect: (index, why).
    pub failed_to_connect: Vec<(usize, String)>,
    /// Connections broken after they were established: (index, why).
    pub broken: Vec<(usize, String)>,
    /// Streams echoed in all.
    pub streams: u64,
    /// Per connection, the streams echoed since the last
    /// [`Fleet::mark`].
    pub since_mark: Vec<u64>,
}

/// Many QUIC connections, each from its own endpoint (its own source
/// port), each echoing one stream after another until stopped. Runs on a
/// multi-threaded runtime of its own.
pub struct Fleet {
    stop: Arc<AtomicBool>,
    connect_failures: Arc<Mutex<Vec<String>>>,
    streams: Arc<Vec<AtomicU64>>,
    marks: Arc<Mutex<Vec<u64>>>,
    connected: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<FleetResult>>,
}

impl Fleet {
    /// Starts `n` connections to `server`, one stream of `payload` bytes
    /// every `every` on each, and waits (up to 60 s) until all of them
    /// have connected or failed to.
    pub fn start(
        server: SocketAddr,
        config: quinn::ClientConfig,
        n: usize,
        payload: usize,
        every: Duration,
    ) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let connected = Arc::new(AtomicU64::new(0));
        let settled = Arc::new(AtomicU64::new(0));
        let connect_failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, streams, connected, settled, failures) = (
                stop.clone(),
                streams.clone(),
                connected.clone(),
                settled.clone(),
                connect_failures.clone(),
            );
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(fleet(
                    server, config, n, payload, every, stop, streams, connected, settled, failures,
                ))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while settled.load(Ordering::Acquire) < n as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Fleet {
            stop,
            connect_failures,
            streams,
            marks: Arc::new(Mutex::new(vec![0; n])),
            connected,
            thread: Some(thread),
        }
    }

    /// Connections established so far.
    pub fn connected(&self) -> u64 {
        self.connected.load(Ordering::Acquire)
    }

    /// Why connections failed to connect so far.
    pub fn connect_failures(&self) -> Vec<String> {
        self.connect_failures.lock().unwrap().clone()
    }

    /// Streams echoed so far, all connections together.
    pub fn streams(&self) -> u64 {
        self.streams.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    /// Notes each connection's stream count now: [`FleetResult::since_mark`]
    /// counts from here.
    pub fn mark(&self) {
        let mut m = self.marks.lock().unwrap();
        for (i, s) in self.streams.iter().enumerate() {
            m[i] = s.load(Ordering::Relaxed);
        }
    }

    /// Waits (up to `timeout`) until every connection has echoed at least
    /// one stream since the last [`Fleet::mark`]; whether they all did.
    pub fn wait_all_since_mark(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let done = {
                let m = self.marks.lock().unwrap();
                self.streams
                    .iter()
                    .zip(m.iter())
                    .all(|(s, m)| s.load(Ordering::Relaxed) > *m)
            };
            if done || Instant::now() >= deadline {
                return done;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops: every connection finishes its stream in flight and closes.
    pub fn stop(mut self) -> FleetResult {
        self.stop.store(true, Ordering::Release);
        let mut r = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("the client fleet panicked");
        let marks = self.marks.lock().unwrap();
        r.since_mark = self
            .streams
            .iter()
            .zip(marks.iter())
            .map(|(s, m)| s.load(Ordering::Relaxed) - m)
            .collect();
        r
    }
}

#[allow(clippy::too_many_arguments)]
async fn fleet(
    server: SocketAddr,
    config: quinn::ClientConfig,
    n: usize,
    payload: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
    streams: Arc<Vec<AtomicU64>>,
    connected: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) -> FleetResult {
    // Handshakes a few at a time: hundreds at once on a small, busy
    // machine (debug builds) can outlast the idle timeout.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (config, stop, streams, connected, settled, failures, handshakes) = (
            config.clone(),
            stop.clone(),
            streams.clone(),
            connected.clone(),
            settled.clone(),
            failures.clone(),
            handshakes.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let endpoint = client_endpoint(&config);
            let permit = handshakes.acquire_owned().await.expect("semaphore open");
            let conn = match connect(&endpoint, server).await {
                Ok(c) => c,
                Err(e) => {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: {e}"));
                    settled.fetch_add(1, Ordering::Release);
                    return (i, Err(e), false);
                }
            };
            drop(permit);
            connected.fetch_add(1, Ordering::Release);
            settled.fetch_add(1, Ordering::Release);
            let bytes = crate::pattern(payload, i as u64);
            // Spread the streams of all connections over the period.
            tokio::time::sleep(every.mul_f64((i % 16) as f64 / 16.0)).await;
            let mut outcome = Ok(());
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = echo_stream(&conn, &bytes).await {
                    outcome = Err(e);
                    break;
                }
                streams[i].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
            (i, outcome, true)
        }));
    }
    let mut r = FleetResult::default();
    for t in tasks {
        match t.await.expect("a client task panicked") {
            (_, Ok(()), true) => r.connected += 1,
            (i, Err(e), true) => {
                r.connected += 1;
                r.broken.push((i, e));
            }
            (i, Err(e), false) => r.failed_to_connect.push((i, e)),
            (_, Ok(()), false) => unreachable!("a connection that failed has an error"),
        }
    }
    r.streams = streams.iter().map(|s| s.load(Ordering::Relaxed)).sum();
    r
}

/// Hand-built QUIC packets (RFC 9000 section 17, RFC 9369 for version 2):
/// what the program's parser reads, padded as a client pads its Initial.
pub mod packet {
    /// QUIC version 1.
    pub const V1: u32 = 1;
    /// QUIC version 2.
    pub const V2: u32 = 0x6b33_43cf;

    /// A long header packet of `version` with type bits `ty` (as on the
    /// wire: 0..=3), destination connection ID `dcid`, an empty source
    /// connection ID, and `pad` bytes of payload.
    pub fn long(version: u32, ty: u8, dcid: &[u8], pad: usize) -> Vec<u8> {
        let mut p = vec![0xc0 | (ty << 4)];
        p.extend_from_slice(&version.to_be_bytes());
        p.push(dcid.len() as u8);
        p.extend_from_slice(dcid);
        p.push(0);
        p.extend(std::iter::repeat_n(0u8, pad));
        p
    }

    /// A version 1 Initial with `dcid`, padded to 1200 bytes as clients
    /// must pad theirs.
    pub fn initial(dcid: &[u8]) -> Vec<u8> {
        long(V1, 0, dcid, 1200 - 7 - dcid.len())
    }

    /// A short header packet to `dcid` with `pad` bytes after it.
    pub fn short(dcid: &[u8], pad: usize) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend_from_slice(dcid);
        p.extend(std::iter::repeat_n(0x5au8, pad));
        p
    }

    /// A version negotiation packet (version 0).
    pub fn version_negotiation(dcid: &[u8]) -> Vec<u8> {
        let mut p = long(0, 0, dcid, 0);
        p.extend_from_slice(&V1.to_be_bytes());
        p
    }
}
