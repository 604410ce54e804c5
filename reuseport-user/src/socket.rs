//! The one place where the group's sockets are made.

use std::{fs::File, io, io::BufReader, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Error, Result};

pub use crate::proto::Proto;

/// Creates a socket, joins it to the reuseport group of `addr` and binds it.
/// TCP sockets are not yet listening: see [`listen`].
pub fn bind_member(addr: SocketAddr, proto: Proto) -> Result<Socket> {
    let (ty, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))
        .map_err(|e| Error::io(format!("creating a {proto} socket"), e))?;
    if addr.is_ipv6() {
        // Every member must agree on IPV6_V6ONLY to share the group; dual
        // stack lets `[::]` serve IPv4 clients too.
        socket
            .set_only_v6(false)
            .map_err(|e| Error::io("setsockopt IPV6_V6ONLY", e))?;
    }
    // SO_REUSEPORT must be set before bind(2): the kernel decides at bind
    // time whether this socket may share the port (sk_reuseport_match() in
    // net/ipv4/inet_connection_sock.c); set afterwards it is silently
    // ignored. The kernel admits only sockets of the same effective UID to
    // the group, which is what keeps other users from hijacking the port.
    socket
        .set_reuse_port(true)
        .map_err(|e| Error::io("setsockopt SO_REUSEPORT", e))?;
    // TCP: lets a restarted server bind while connections of its
    // predecessor linger in TIME_WAIT. Never UDP: there SO_REUSEADDR lets
    // any socket that also sets it bind the same address, of any user
    // (udp_lib_lport_inuse() checks no UID for it), so another user could
    // bind the group's port, and a client socket bound to port 0 could be
    // given it.
    if proto == Proto::Tcp {
        socket
            .set_reuse_address(true)
            .map_err(|e| Error::io("setsockopt SO_REUSEADDR", e))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting O_NONBLOCK", e))?;
    if proto == Proto::Udp {
        enlarge_receive_buffer(&socket, UDP_RECEIVE_BUFFER);
    }
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            Err(Error::AddrInUse { addr, proto })
        }
        Err(e) => Err(Error::io(format!("binding {proto} {addr}"), e)),
    }
}

/// Receive buffer asked for each UDP member: room for a burst of large
/// datagrams while its worker is busy (the default, about 208 KiB, holds
/// only a few datagrams of 64 KiB; beyond it the kernel drops them).
pub const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Sets SO_RCVBUF to `bytes`; if `net.core.rmem_max` caps it lower and the
/// process has CAP_NET_ADMIN, SO_RCVBUFFORCE goes past the cap. A smaller
/// buffer is not an error, only logged.
pub fn enlarge_receive_buffer(socket: &Socket, bytes: usize) {
    let _ = socket.set_recv_buffer_size(bytes);
    // The kernel reports twice what was set (it counts its bookkeeping).
    let got = socket.recv_buffer_size().unwrap_or(0) / 2;
    if got >= bytes {
        return;
    }
    // SO_RCVBUFFORCE: past net.core.rmem_max, with CAP_NET_ADMIN.
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(socket, bytes).is_err() {
        log::debug!(
            "UDP receive buffer is {got} bytes (net.core.rmem_max); bursts beyond it are dropped by the kernel"
        );
    }
}

/// Starts listening: the socket becomes visible to lookups (and to the
/// steering program's map, which refuses sockets that are not yet hashed).
pub fn listen(socket: &Socket, backlog: i32) -> Result<()> {
    socket
        .listen(backlog)
        .map_err(|e| Error::io(format!("listen(backlog {backlog})"), e))
}

/// The sockets of this network namespace bound to exactly `addr` that a new
/// member would share a group with: TCP listeners, or UDP sockets.
///
/// Reads `/proc/thread-self/net/{tcp,tcp6,udp,udp6}`, which describe the
/// calling thread's network namespace.
pub fn existing_members(addr: SocketAddr, proto: Proto) -> Result<usize> {
    use procfs_core::{
        net::{TcpNetEntries, TcpState, UdpNetEntries},
        ExplicitSystemInfo, FromBufReadSI,
    };
    let info = ExplicitSystemInfo {
        boot_time_secs: 0,
        ticks_per_second: 100,
        page_size: 4096,
        is_little_endian: cfg!(target_endian = "little"),
    };
    let mut count = 0;
    for family in ["", "6"] {
        let path = format!("/proc/thread-self/net/{proto}{family}");
        let file = match File::open(&path) {
            Ok(f) => BufReader::new(f),
            // No IPv6 in this kernel: nothing bound there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading {path}"), e)),
        };
        let parse_err = |e: procfs_core::ProcError| {
            Error::io(format!("parsing {path}"), io::Error::other(e.to_string()))
        };
        let same = |local: SocketAddr| local == addr;
        count += match proto {
            Proto::Tcp => TcpNetEntries::from_buf_read(file, &info)
                .map_err(parse_err)?
                .0
                .iter()
                .filter(|e| e.state == TcpState::Listen && same(e.local_address))
                .count(),
            Proto::Udp => UdpNetEntries::from_buf_read(file, &info)
                .map_err(parse_err)?
                .0
                .iter()
                .filter(|e| same(e.local_address))
                .count(),
        };
    }
    Ok(count)
}
