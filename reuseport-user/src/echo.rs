//! The echo service: every byte a client sends is sent back.

use std::{io, sync::atomic::Ordering};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::worker::Conn;

/// Echoes a TCP connection until the client's EOF, then closes its side.
///
/// Half-close is honoured: after the client shuts down its sending side,
/// everything it sent is still echoed before the server closes. At most
/// `buffer_size` bytes are held per connection: the worker does not read
/// more until they are written back, so a client that does not read its
/// echo is slowed down by TCP flow control instead of growing the server's
/// memory. The buffer is allocated when data first arrives, not per idle
/// connection. A connection idle (no progress reading or writing) for
/// `idle_timeout` is closed.
pub async fn echo(mut stream: TcpStream, conn: Conn) -> io::Result<()> {
    let idle = conn.limits.idle_timeout;
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "idle timeout");
    timeout(idle, stream.readable())
        .await
        .map_err(|_| timed_out())??;
    let mut buf = vec![0u8; conn.limits.buffer_size.max(1)];
    loop {
        let n = timeout(idle, stream.read(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        if n == 0 {
            break;
        }
        timeout(idle, stream.write_all(&buf[..n]))
            .await
            .map_err(|_| timed_out())??;
        conn.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    stream.shutdown().await
}
