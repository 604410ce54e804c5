//! The library as another team embeds it: the axum example answers from
//! the worker the program picked (its counters say so), and a crate outside
//! this workspace, depending on the library by path, starts a group and
//! serves it from inside `#[tokio::main]`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
};

use reuseport_tests::{binary, cpus, netns, pin_to_cpu, Metrics};

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

fn http_get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
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

/// Its program: a round-robin group of two workers serving a greeting,
/// started and stopped from inside `#[tokio::main]`, and a client in the
/// same runtime.
const CONSUMER_MAIN: &str = r#"use reuseport::{Conn, Group, Policy, PolicyKind, ServeOptions, Server};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = Group::builder()
        .addr("127.0.0.1:0".parse()?)
        .policy(Policy::new(PolicyKind::RoundRobin))
        .workers(2)
        .build()?;
    let handle = group.handle();
    let server = Server::start_tcp(
        group,
        |mut stream: TcpStream, conn: Conn| async move {
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).await?;
            let said = String::from_utf8_lossy(&buf[..n]).into_owned();
            let answer = format!("worker {} heard {said}", conn.worker.worker);
            stream.write_all(answer.as_bytes()).await
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
    server.shutdown()?;
    println!("stopped");
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
    let run = Command::new(target.join("debug/outside-consumer"))
        .output()
        .expect("running the consumer");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    // Round robin by the program: the two workers take turns.
    let first: u32 = lines[0]
        .strip_prefix("worker ")
        .and_then(|l| l.split(' ').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    for (i, line) in lines[..4].iter().enumerate() {
        let worker = (first + i as u32) % 2;
        assert_eq!(
            *line,
            format!("worker {worker} heard hello {i}"),
            "{stdout}"
        );
    }
    assert_eq!(lines[4], "selected [2, 2]", "{stdout}");
    assert_eq!(lines[5], "stopped", "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
