//! `reuseport adopt`: a listening socket of another program (a Python
//! server here) joins the group's policy, and every way it can fail.

use reuseport_tests::{echo, netns, reuseport, Python, Server};

fn adopt(server: &Server, pid: u32, fd: i32) -> (i32, String, String) {
    reuseport(&[
        "adopt",
        "--group",
        &server.group,
        "--pid",
        &pid.to_string(),
        "--fd",
        &fd.to_string(),
    ])
}

#[test]
fn a_python_server_serves_its_share_under_round_robin() {
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let python = Python::start(server.addr.port(), None);
    let (code, out, err) = adopt(&server, python.pid, python.fd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "group {}: descriptor {} of process {} serves slot 2",
            server.group, python.fd, python.pid
        )
    );
    let mut from_python = 0;
    for i in 0..100 {
        let p = format!("hello {i}").into_bytes();
        let got = echo(server.addr, &p);
        if got.starts_with(b"py:") {
            assert_eq!(&got[3..], &p[..]);
            from_python += 1;
        } else {
            assert_eq!(got, p);
        }
    }
    // Round robin over three slots: a third of the connections, exactly.
    assert!(
        (33..=34).contains(&from_python),
        "the Python server answered {from_python} of 100"
    );
    let m = server.metrics();
    assert_eq!(
        m.selected(2),
        from_python,
        "the program's count for its slot"
    );
    assert_eq!(m.accepted(0) + m.accepted(1) + from_python, 100);

    // When it exits, the kernel empties its slot and the owner takes it
    // out of the policy: everything goes to the workers again.
    drop(python);
    assert!(reuseport_tests::eventually(
        std::time::Duration::from_secs(5),
        || {
            let (_, out, _) = server.ctl(&["status"]);
            !out.lines()
                .any(|l| l.trim_start().starts_with("2 ") && l.contains("serving"))
        }
    ));
    let before = server.metrics();
    for i in 0..10 {
        let p = format!("after {i}").into_bytes();
        assert_eq!(echo(server.addr, &p), p);
    }
    let after = server.metrics();
    assert_eq!(after.fallback(), 0);
    assert_eq!(
        reuseport_tests::selected_delta(&before, &after, 2),
        [5, 5],
        "all ten, round robin over the two workers left, by a rebuilt policy"
    );
    assert_eq!(
        after.empty_slot(),
        before.empty_slot(),
        "its empty slot is no longer even picked"
    );
}

#[test]
fn adopting_what_cannot_serve_the_group_fails_clearly() {
    netns();
    let server = Server::start(&["--policy", "round-robin", "--workers", "2"]);
    let first_line = |r: (i32, String, String)| {
        assert_eq!(r.0, 1, "{r:?}");
        r.2.lines().next().unwrap_or("").to_string()
    };

    assert_eq!(
        first_line(adopt(&server, 999_999, 3)),
        "error: no process with pid 999999"
    );

    let python = Python::start(server.addr.port(), None);
    assert_eq!(
        first_line(adopt(&server, python.pid, 0)),
        format!(
            "error: descriptor 0 of process {} is not a socket",
            python.pid
        )
    );
    assert_eq!(
        first_line(adopt(&server, python.pid, 99)),
        format!("error: process {} has no descriptor 99", python.pid)
    );

    // A socket of another group: bound to another port.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = Python::start(other.local_addr().unwrap().port() + 1, None);
    let line = first_line(adopt(&server, elsewhere.pid, elsewhere.fd));
    assert!(
        line.ends_with(&format!(
            "not to the group's {}: it belongs to another group",
            server.addr
        )),
        "{line}"
    );

    // A socket of another user (it cannot be on the group's port at all:
    // the kernel refuses it there).
    let theirs = Python::start(other.local_addr().unwrap().port() + 2, Some("nobody"));
    assert_eq!(
        first_line(adopt(&server, theirs.pid, theirs.fd)),
        format!("error: the socket (descriptor {} of process {}) belongs to uid 65534, the group to uid 0", theirs.fd, theirs.pid)
    );
}

#[test]
fn a_group_with_every_slot_taken_has_no_room() {
    netns();
    let max = reuseport_common::MAX_WORKERS;
    let workers = max.to_string();
    let server = Server::start(&["--policy", "round-robin", "--workers", &workers]);
    let python = Python::start(server.addr.port(), None);
    let (code, _, err) = adopt(&server, python.pid, python.fd);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!("error: the group has no free slot: all {max} are taken")
    );
}
