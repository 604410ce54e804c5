//! An HTTP "hello" server on a steered reuseport group, thread-per-core:
//! each worker runs hyper on its own listener, on its own CPU, and says
//! which worker and CPU answered.
//!
//! ```sh
//! cargo run --release --example hello_http -- 127.0.0.1:8080 cpu
//! curl http://127.0.0.1:8080/          # hello from worker 1 on cpu 1
//! wrk -t2 -c64 -d10s http://127.0.0.1:8080/
//! ```
use std::convert::Infallible;

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server};

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

fn run() -> reuseport::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let addr = addr.parse().map_err(|_| usage(&addr))?;
    let kind = args.next().unwrap_or_else(|| "cpu".into());
    let kind: PolicyKind = kind.parse().map_err(|_| usage(&kind))?;

    let group = Group::builder()
        .addr(addr)
        .policy(Policy::new(kind))
        .build()?;
    let server = Server::start_tcp(
        group,
        |stream, conn: Conn| async move {
            let (worker, cpu) = (conn.worker.worker, conn.worker.cpu);
            let hello = service_fn(move |_: Request<hyper::body::Incoming>| async move {
                let body = format!("hello from worker {worker} on cpu {cpu}\n");
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hello)
                .await
                .map_err(std::io::Error::other)
        },
        ServeOptions::default(),
    )?;
    let ready = format!("ready: serving http://{}", server.local_addr());
    reuseport::server::serve_until_signalled(server, move || println!("{ready}"))
}

fn usage(what: &str) -> reuseport::Error {
    reuseport::Error::io(
        format!("bad argument `{what}`"),
        std::io::Error::other(
            "usage: hello_http [ADDRESS] [POLICY: cpu, round-robin, least-loaded, ...]",
        ),
    )
}
