//! A minimal line protocol served by threads of our own on the group's
//! listeners: the lower-level use of the library, for servers that run
//! their own workers.
//!
//! Commands, one per line: `PING` (answers `PONG`), `WHO` (which worker and
//! CPU), `ECHO <text>`, `QUIT`.
//!
//! ```sh
//! cargo run --release --example line_server -- 127.0.0.1:9000
//! printf 'WHO\nPING\nECHO hi\nQUIT\n' | nc 127.0.0.1 9000
//! ```
use reuseport::{Group, Policy, PolicyKind};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

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
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let addr = addr.parse().map_err(|_| {
        reuseport::Error::io(
            format!("bad address `{addr}`"),
            std::io::Error::other("usage: line_server [ADDRESS]"),
        )
    })?;
    let group = Group::builder()
        .addr(addr)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .build()?;

    // One thread per member, pinned to the member's CPU, each with a
    // current-thread runtime serving that member's listener only.
    let stop = CancellationToken::new();
    let mut threads = Vec::new();
    for member in group.members() {
        let (listener, slot, cpu) = (member.tcp_listener()?, member.slot, member.cpu);
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let _ = reuseport::pin_current_thread(cpu);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            if let Ok((stream, _)) = accepted {
                                tokio::task::spawn_local(serve(stream, slot, cpu));
                            }
                        }
                        _ = stop.cancelled() => break,
                    }
                }
                // Stop accepting; connections already open finish.
                drop(listener);
                Ok::<_, std::io::Error>(())
            })
        }));
    }
    println!("ready: serving tcp {}", group.local_addr());

    // Until SIGINT or SIGTERM; then, in order: stop accepting, close the
    // group (out of the policy, detach, close the listeners, unpin), and
    // let the workers finish their connections.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| reuseport::Error::io("runtime", e))?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        Ok::<_, std::io::Error>(())
    })
    .map_err(|e| reuseport::Error::io("waiting for a signal", e))?;
    stop.cancel();
    group.close()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

async fn serve(stream: TcpStream, slot: u32, cpu: usize) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("PING", _) => "PONG".to_string(),
            ("WHO", _) => format!("worker {slot} cpu {cpu}"),
            ("ECHO", text) => text.to_string(),
            ("QUIT", _) => break,
            (other, _) => format!("ERR unknown command {other}"),
        };
        if write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
}
