//! The examples: the hyper server answers on every worker under `cpu`
//! (pinned clients), and the line server speaks its protocol.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
};

use reuseport_tests::{binary, cpus, http_get, netns, pin_to_cpu};

struct Example {
    child: Child,
    addr: SocketAddr,
}

impl Example {
    fn start(name: &str) -> Example {
        // target/debug/reuseport -> target/debug/examples/NAME
        let path: PathBuf = binary().parent().unwrap().join("examples").join(name);
        assert!(
            path.exists(),
            "{} is built by `cargo xtask test` (cargo build --examples)",
            path.display()
        );
        let mut child = Command::new(&path)
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(['/', ' '])
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("address in {line:?}"));
        Example { child, addr }
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
fn the_hyper_example_answers_on_every_worker_of_its_cpu() {
    netns();
    let example = Example::start("hello_http");
    let addr = example.addr;
    for (worker, cpu) in cpus().into_iter().enumerate() {
        let bodies: Vec<String> = thread::spawn(move || {
            pin_to_cpu(cpu);
            (0..20).map(|_| http_get(addr)).collect()
        })
        .join()
        .unwrap();
        for body in bodies {
            assert_eq!(body, format!("hello from worker {worker} on cpu {cpu}\n"));
        }
    }
}

#[test]
fn the_line_example_speaks_its_protocol_from_every_worker() {
    netns();
    let example = Example::start("line_server");
    let n = cpus().len();
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..3 * n {
        let mut s = TcpStream::connect(example.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"PING\nECHO hello there\nWHO\nQUIT\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..2], ["PONG", "hello there"]);
        assert!(lines[2].starts_with("worker "), "{out}");
        seen.push(lines[2].to_string());
    }
    // Round robin, by the program: the workers take turns, each coming
    // back every n connections (the kernel's hash would not keep that up).
    let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), n, "every worker answers: {seen:?}");
    for (i, w) in seen.iter().enumerate().skip(n) {
        assert_eq!(w, &seen[i - n], "turn {i}: {seen:?}");
    }
}
