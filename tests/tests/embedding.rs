//! The library as another team embeds it: the axum example answers from
//! the worker the program picked (its counters say so), and a crate outside
//! this workspace, depending on the library by path, starts a group and
//! serves it from inside `#[tokio::main]`.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
};

use reuseport_tests::{binary, cpus, http_get, netns, pin_to_cpu, Metrics};

/// A running example; SIGTERM on drop.
struct Example {
    child: Child,
    lines: Vec<String>,
}

impl Example {
    /// Starts `target/debug/examples/NAME ARGS` and reads its output up to
    /// the `ready: ` line.
    fn start(name: &str, args: &[&str]) -> Example {
        let path: PathBuf = binary().parent().unwrap().join("examples").join(name);
        assert!(
            path.exists(),
            "{} is built by `cargo xtask test` (cargo build --examples)",
            path.display()
        );
        let mut child = Command::new(&path)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        for _ in 0..10 {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            lines.push(line.trim().to_string());
            if line.starts_with("ready: ") {
                return Example { child, lines };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{name} did not become ready: {lines:?}");
    }

    /// The address on the line starting with `prefix`.
    fn addr(&self, prefix: &str) -> SocketAddr {
        self.lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .flat_map(|l| l.split(['/', ' ']))
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("an address after {prefix:?} in {:?}", self.lines))
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn the_axum_example_answers_from_the_worker_the_program_picked() {
    netns();
    let example = Example::start("axum_hello", &["127.0.0.1:0", "127.0.0.1:0"]);
    let addr = example.addr("ready: ");
    let metrics = example.addr("metrics on ");
    const EACH: u64 = 20;
    for (worker, cpu) in cpus().into_iter().enumerate() {
        let before = Metrics::scrape(metrics);
        let bodies: Vec<String> = thread::spawn(move || {
            pin_to_cpu(cpu);
            (0..EACH).map(|_| http_get(addr)).collect()
        })
        .join()
        .unwrap();
        // The router answered, on the worker of the client's CPU ...
        for body in bodies {
            assert_eq!(body, format!("hello from worker {worker} on cpu {cpu}\n"));
        }
        // ... because the program picked that worker's socket for every
        // one of those connections, and for no other.
        let after = Metrics::scrape(metrics);
        for slot in 0..cpus().len() {
            let picked = after.selected(slot) - before.selected(slot);
            let expected = if slot == worker { EACH } else { 0 };
            assert_eq!(picked, expected, "program selections of slot {slot}");
        }
        assert_eq!(after.fallback(), before.fallback(), "no fallback");
    }
}

/// The consumer: its own package and workspace, the library by path.
const CONSUMER_MANIFEST: &str = r#"[package]
name = "outside-consumer"
version = "0.1.0"
edition = "2021"
publish = false

# Not a member of the reuseport workspace: a workspace of its own.
[workspace]

[dependencies]
reuseport-user = { path = "@LIBRARY@" }
tokio = { version = "1", features = ["rt-multi-thread", "macros", "net", "io-util", "time"] }
"#;

/// Its program, all inside `#[tokio::main]`: a round-robin group of two
/// workers whose handlers are made per worker, on the worker's thread, and
/// hold an `Rc` (not `Send`); clients in the same runtime; the async
/// shutdown; then a second group served by the blocking
/// `serve_until_signalled`, which must not panic inside the runtime.
const CONSUMER_MAIN: &str = r#"use std::{cell::Cell, rc::Rc};

use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server, WorkerInfo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn new_group() -> reuseport::Result<Group> {
    Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .policy(Policy::new(PolicyKind::RoundRobin))
        .workers(2)
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = new_group()?;
    let handle = group.handle();
    let server = Server::start_tcp_with(
        group,
        |me: &WorkerInfo| {
            let worker = me.worker;
            // This worker's own count, on its own thread.
            let calls = Rc::new(Cell::new(0u32));
            move |mut stream: TcpStream, _conn: Conn| {
                let calls = calls.clone();
                async move {
                    calls.set(calls.get() + 1);
                    let mut buf = [0u8; 64];
                    let n = stream.read(&mut buf).await?;
                    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let answer = format!("worker {worker} call {} heard {said}", calls.get());
                    stream.write_all(answer.as_bytes()).await
                }
            }
        },
        ServeOptions::default(),
    )?;
    let addr = server.local_addr();
    for i in 0..4 {
        let mut client = TcpStream::connect(addr).await?;
        client.write_all(format!("hello {i}").as_bytes()).await?;
        client.shutdown().await?;
        let mut answer = String::new();
        client.read_to_string(&mut answer).await?;
        println!("{answer}");
    }
    println!("selected {:?}", &handle.counters()?.selected[..2]);
    server.stop().await?;
    println!("stopped");

    let server = Server::start_tcp(
        new_group()?,
        |mut stream: TcpStream, _conn: Conn| async move { stream.write_all(b"bye").await },
        ServeOptions::default(),
    )?;
    reuseport::server::serve_until_signalled(server, || println!("ready"))?;
    println!("signalled");
    Ok(())
}
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

#[test]
fn a_crate_outside_the_workspace_serves_a_group_from_tokio_main() {
    netns();
    let root = workspace();
    let dir = std::env::temp_dir().join(format!("reuseport-consumer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let library = root.join("reuseport-user");
    std::fs::write(
        dir.join("Cargo.toml"),
        CONSUMER_MANIFEST.replace("@LIBRARY@", library.to_str().unwrap()),
    )
    .unwrap();
    std::fs::write(dir.join("src/main.rs"), CONSUMER_MAIN).unwrap();
    // The workspace's lock file: the same versions, and no network.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A target directory of its own (this workspace's is locked while its
    // tests run), kept between runs so that only the first one is slow.
    let target = root.join("target/outside-consumer");
    let build = Command::new(&cargo)
        .current_dir(&dir)
        .args(["build", "--offline", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("running cargo build");
    assert!(
        build.status.success(),
        "the consumer did not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let mut child = Command::new(target.join("debug/outside-consumer"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the consumer");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..10 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        lines.push(line.trim_end().to_string());
        if line.trim_end() == "ready" {
            break;
        }
    }
    // Ready: its signal handlers are in place.
    let ready = lines.last().map(String::as_str) == Some("ready");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let stdout = format!("{}\n{rest}", lines.join("\n"));
    assert!(ready, "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status}: {stdout}\n{stderr}");
    // Round robin by the program: the two workers take turns, and each
    // worker's handler counts only its own connections.
    let first: u32 = lines[0]
        .strip_prefix("worker ")
        .and_then(|l| l.split(' ').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    for (i, line) in lines[..4].iter().enumerate() {
        let worker = (first + i as u32) % 2;
        let call = i / 2 + 1;
        assert_eq!(
            *line,
            format!("worker {worker} call {call} heard hello {i}"),
            "{stdout}"
        );
    }
    assert_eq!(lines[4], "selected [2, 2]", "{stdout}");
    assert_eq!(lines[5], "stopped", "{stdout}");
    assert_eq!(rest.trim_end(), "signalled", "{stdout}\n{stderr}");
    // The internal modules, and the handles that would lead to them, are
    // out of an embedder's reach (the workspace's benchmark and tests reach
    // them with the `internals` feature only).
    std::fs::create_dir_all(dir.join("src/bin")).unwrap();
    let reaches = ["maps", "steering", "worker", "sys"]
        .map(|module| {
            (
                format!("use reuseport::{module} as _;"),
                format!("module `{module}` is private"),
            )
        })
        .into_iter()
        .chain([
            (
                "fn f(c: &reuseport::Control) { let _ = c.maps(); }".to_string(),
                "method `maps` is private".to_string(),
            ),
            (
                "fn f(c: &mut reuseport::Control) { let _ = c.maps_mut(); }".to_string(),
                "method `maps_mut` is private".to_string(),
            ),
            (
                "fn f(b: reuseport::GroupBuilder) { let _ = b.program(\"floor\"); }".to_string(),
                "no method named `program`".to_string(),
            ),
        ]);
    for (source, expected) in reaches {
        std::fs::write(
            dir.join("src/bin/internal.rs"),
            format!("#![allow(dead_code)]\n{source}\nfn main() {{}}\n"),
        )
        .unwrap();
        let check = Command::new(&cargo)
            .current_dir(&dir)
            .args(["check", "--offline", "--quiet", "--bin", "internal"])
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("running cargo check");
        let err = String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success(), "`{source}` compiles");
        assert!(err.contains(&expected), "`{source}`: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_group_has_no_default_address() {
    let err = reuseport::Group::builder()
        .policy(reuseport::Policy::new(reuseport::PolicyKind::RoundRobin))
        .build()
        .expect_err("a group without an address");
    assert!(matches!(err, reuseport::Error::NoAddress), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the group has no address: give one with GroupBuilder::addr"
    );
}

fn soft_fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .0
}

fn migrate_req() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .unwrap()
        .trim()
        .to_string()
}

/// A TCP group under the kernel policy (no program: the one case where
/// the library would set `tcp_migrate_req`), not pinned.
fn kernel_group(migrate: bool) -> reuseport::Group {
    reuseport::Group::builder()
        .addr("127.0.0.1:0".parse().unwrap())
        .workers(1)
        .policy(reuseport::Policy::new(reuseport::PolicyKind::Kernel))
        .pin(false)
        .tcp_migrate_req(migrate)
        .build()
        .unwrap()
}

#[test]
fn process_wide_settings_change_only_when_asked() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    use reuseport::{ServeOptions, Server};
    netns();
    // A soft open-file limit below the hard one, so that a raise shows.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let low = 512.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
    // tcp_migrate_req is per network namespace: this one's, fresh.
    assert_eq!(migrate_req(), "0");

    let server = Server::start_echo(kernel_group(false), ServeOptions::default()).unwrap();
    assert_eq!(soft_fd_limit(), low, "the open-file limit was left alone");
    assert_eq!(migrate_req(), "0", "the sysctl was left alone");
    server.shutdown().unwrap();

    let mut asked = ServeOptions::default();
    asked.raise_fd_limit = true;
    let server = Server::start_echo(kernel_group(true), asked).unwrap();
    if hard > low {
        assert!(soft_fd_limit() > low, "raised when asked");
    }
    assert_eq!(migrate_req(), "1", "set when asked");
    server.shutdown().unwrap();
    assert_eq!(migrate_req(), "0", "put back at close");
}
