//! The transport protocol of a group: a leaf that every layer may name.

use std::fmt;

/// Transport protocol of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// Stream sockets; the program steers each connection's SYN.
    Tcp,
    /// Datagram sockets; the program steers each datagram.
    Udp,
}

impl std::str::FromStr for Proto {
    type Err = String;

    /// `tcp` or `udp`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("unknown transport `{s}`: use tcp or udp")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}
