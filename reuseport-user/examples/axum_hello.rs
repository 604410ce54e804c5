//! An axum `Router` served from a steered reuseport group: one worker per
//! CPU, each on its own listener and its own current-thread runtime, the
//! program picking the worker of the CPU each connection came in on. Each
//! answer says which worker and CPU served it.
//!
//! ```sh
//! cargo run --release --example axum_hello -- 127.0.0.1:8080
//! curl http://127.0.0.1:8080/          # hello from worker 1 on cpu 1
//! ```
//!
//! `axum_hello ADDRESS plain` serves the same router with axum's own
//! `axum::serve` on one listener and tokio's multi-threaded runtime, the
//! usual way, for comparison (the README's figures). A second address,
//! `axum_hello ADDRESS METRICS_ADDRESS`, also serves the group's Prometheus
//! metrics (the program's per-worker counters) there.
use std::{io, net::SocketAddr};

use axum::{routing::get, Extension, Router};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::TokioIo;
use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server, WorkerInfo};
use tower::Service as _;

/// The application: what a team would write for axum anyway.
fn app() -> Router {
    Router::new().route("/", get(hello))
}

/// Says who served: the worker is in the request's extensions (set per
/// connection below); under `plain` there is none.
async fn hello(worker: Option<Extension<WorkerInfo>>) -> String {
    match worker {
        Some(Extension(w)) => format!("hello from worker {} on cpu {}\n", w.worker, w.cpu),
        None => "hello\n".into(),
    }
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let second = args.next();
    let done = match (addr.parse::<SocketAddr>(), second.as_deref()) {
        (Ok(addr), Some("plain")) => plain(addr).map_err(|e| e.to_string()),
        (Ok(addr), None) => steered(addr, None).map_err(|e| e.to_string()),
        (Ok(addr), Some(metrics)) => match metrics.parse() {
            Ok(m) => steered(addr, Some(m)).map_err(|e| e.to_string()),
            Err(_) => Err(usage(metrics)),
        },
        (Err(_), _) => Err(usage(&addr)),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn usage(what: &str) -> String {
    format!("bad argument `{what}`: usage: axum_hello [ADDRESS] [plain | METRICS_ADDRESS]")
}

/// The router on a steered group.
fn steered(addr: SocketAddr, metrics_addr: Option<SocketAddr>) -> reuseport::Result<()> {
    let group = Group::builder()
        .addr(addr)
        .policy(Policy::new(PolicyKind::Cpu))
        .build()?;
    let router = app();
    let server = Server::start_tcp(
        group,
        move |stream, conn: Conn| {
            let router = router.clone();
            async move {
                let worker = conn.worker;
                // hyper drives the connection; each request goes to the
                // router with the worker that accepted it attached.
                let service = service_fn(move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(worker);
                    router.clone().call(request)
                });
                http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                    .map_err(io::Error::other)
            }
        },
        {
            let mut options = ServeOptions::default();
            options.metrics_addr = metrics_addr;
            options
        },
    )?;
    if let Some(m) = server.metrics_addr() {
        println!("metrics on http://{m}/metrics");
    }
    let ready = format!("ready: serving http://{}", server.local_addr());
    reuseport::server::serve_until_signalled(server, move || println!("{ready}"))
}

/// The same router the usual way: `axum::serve` on one listener.
fn plain(addr: SocketAddr) -> io::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            println!("ready: serving http://{}", listener.local_addr()?);
            axum::serve(listener, app())
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
        })
}
