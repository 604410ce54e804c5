//! The echo service: every byte a client sends is sent back.

use std::{io, sync::atomic::Ordering, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream, time::timeout};

use crate::worker::Conn;

/// Settings of the echo service (a custom handler keeps its own).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct EchoOptions {
    /// A connection that neither sends nor accepts data for this long is closed.
    pub idle_timeout: Duration,
    /// Size of a connection's buffer: the most bytes read before they are
    /// written back (taken while data flows, given back when it stops).
    pub buffer_size: usize,
}

impl Default for EchoOptions {
    fn default() -> Self {
        EchoOptions {
            idle_timeout: Duration::from_secs(60),
            buffer_size: 64 * 1024,
        }
    }
}

/// Echoes a TCP connection until the client's EOF, then closes its side.
///
/// Half-close is honoured: after the client shuts down its sending side,
/// everything it sent is still echoed before the server closes.
///
/// Memory is bounded and spent only while data flows: a buffer of
/// `buffer_size` bytes is taken when the socket becomes readable, used to
/// read and write back until the socket has nothing more to read, and
/// given back; an idle connection holds no buffer. While the echo of a
/// buffer cannot be written (the client does not read), nothing more is
/// read, so TCP flow control slows the client down instead of the server
/// buffering without bound. A connection that makes no progress reading or
/// writing for `idle_timeout` is closed; a slow one (a byte a second) costs
/// a task, not a worker.
pub async fn echo(stream: TcpStream, conn: Conn) -> io::Result<()> {
    echo_with(stream, conn, EchoOptions::default()).await
}

/// [`echo`] with these settings.
pub async fn echo_with(mut stream: TcpStream, conn: Conn, options: EchoOptions) -> io::Result<()> {
    let idle = options.idle_timeout;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
    loop {
        timeout(idle, stream.readable())
            .await
            .map_err(|_| timed_out())??;
        // Not zeroed: reads fill it from the start, and only what they
        // filled is written back.
        let mut buf = Vec::with_capacity(options.buffer_size.max(1));
        loop {
            buf.clear();
            let n = match stream.try_read_buf(&mut buf) {
                Ok(0) => return stream.shutdown().await,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            timeout(idle, stream.write_all(&buf[..n]))
                .await
                .map_err(|_| timed_out())??;
            conn.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        // Nothing more to read now: the buffer goes back to the allocator.
    }
}
