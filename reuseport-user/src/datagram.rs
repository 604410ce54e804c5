//! Receiving and replying to datagrams so that the reply comes from the
//! address the client sent to.
//!
//! A UDP socket bound to a wildcard address (`0.0.0.0`, `[::]`) that simply
//! calls `send_to` lets routing pick the reply's source address, which need
//! not be the one the client wrote to (a host with several addresses, or
//! `::1` versus another address on `lo`); a client that connected its
//! socket then discards the reply. So on a wildcard socket the destination
//! of each datagram is read from `IP_PKTINFO`/`IPV6_PKTINFO` and given back
//! as the reply's source. A socket bound to one address needs none of this.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::{io::Interest, net::UdpSocket};

/// Where a datagram was sent to, when the socket is bound to a wildcard
/// address.
#[derive(Clone, Copy)]
pub enum Destination {
    /// Bound to one address: replies come from it anyway.
    Bound,
    /// The IPv4 destination (IP_PKTINFO).
    V4(libc::in_pktinfo),
    /// The IPv6 (or v4-mapped) destination (IPV6_PKTINFO).
    V6(libc::in6_pktinfo),
}

/// Asks the kernel for each datagram's destination address, if `socket` is
/// bound to a wildcard address. Returns whether it did.
pub fn enable_pktinfo(socket: BorrowedFd<'_>, local: SocketAddr) -> io::Result<bool> {
    if !local.ip().is_unspecified() {
        return Ok(false);
    }
    match local {
        SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?,
        // A dual-stack socket reports IPv4 datagrams as v4-mapped IPv6
        // destinations (ip6_datagram_recv_specific_ctl()).
        SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?,
    }
    Ok(true)
}

/// Room for the destination-address control message of one datagram, made
/// once per socket and handed to every [`recv`].
pub fn control_buffer() -> Vec<u8> {
    nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo)
}

/// Receives one datagram into `buf`: its length, sender and destination.
/// `cmsg` comes from [`control_buffer`].
pub async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
    pktinfo: bool,
) -> io::Result<(usize, SocketAddr, Destination)> {
    if !pktinfo {
        let (n, peer) = socket.recv_from(buf).await?;
        return Ok((n, peer, Destination::Bound));
    }
    socket
        .async_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut *cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let mut dst = Destination::Bound;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                match c {
                    ControlMessageOwned::Ipv4PacketInfo(i) => dst = Destination::V4(i),
                    ControlMessageOwned::Ipv6PacketInfo(i) => dst = Destination::V6(i),
                    _ => {}
                }
            }
            let peer = msg
                .address
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::V4((*v4).into()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
                })
                .ok_or_else(|| io::Error::other("datagram without a sender address"))?;
            Ok((msg.bytes, peer, dst))
        })
        .await
}

/// Sends `data` to `peer`, from the address the request went to.
pub async fn reply(
    socket: &UdpSocket,
    data: &[u8],
    peer: SocketAddr,
    from: Destination,
) -> io::Result<usize> {
    let mut v4 = match from {
        Destination::Bound => return socket.send_to(data, peer).await,
        Destination::V4(i) => Some(i),
        Destination::V6(_) => None,
    };
    let v6 = match from {
        Destination::V6(i) => Some(i),
        _ => None,
    };
    if let Some(i) = v4.as_mut() {
        // Reply from the address the request was sent to; let routing pick
        // the interface.
        i.ipi_spec_dst = i.ipi_addr;
        i.ipi_ifindex = 0;
    }
    let peer: SockaddrStorage = peer.into();
    socket
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(data)];
            let cmsg = match (&v4, &v6) {
                (Some(i), _) => Some(ControlMessage::Ipv4PacketInfo(i)),
                (_, Some(i)) => Some(ControlMessage::Ipv6PacketInfo(i)),
                _ => None,
            };
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                cmsg.as_slice(),
                MsgFlags::MSG_DONTWAIT,
                Some(&peer),
            )
            .map_err(io::Error::from)
        })
        .await
}
