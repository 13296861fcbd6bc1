//! The transport seam: how bytes reach the server. Only plain TCP exists now; TLS or
//! WebSocket would be another [`Transport`] whose halves carry the same frames.
//!
//! A connection is used by two threads (one reads, one writes) and closed from a third, so a
//! transport splits into a reading half, a writing half and a [`Closer`] that ends both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Ends a connection: a blocked read returns EOF or an error, and writes fail.
pub(crate) trait Closer: Send + Sync {
    /// Closes both directions; idempotent.
    fn close(&self);
}

/// The two halves of a connection and its closer.
pub(crate) type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>, Arc<dyn Closer>);

/// A connected byte stream to the server.
pub(crate) trait Transport: Send {
    /// Splits the connection for the reader and writer threads.
    fn split(self: Box<Self>) -> io::Result<Halves>;
}

/// Plain TCP.
struct Tcp(TcpStream);

impl Closer for TcpStream {
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Transport for Tcp {
    fn split(self: Box<Self>) -> io::Result<Halves> {
        let reader = self.0.try_clone()?;
        let closer = self.0.try_clone()?;
        Ok((Box::new(reader), Box::new(self.0), Arc::new(closer)))
    }
}

/// Connects to the first of `addrs` that accepts within `timeout`; writes blocked longer
/// than `write_timeout` fail.
pub(crate) fn connect_tcp(
    addrs: &[SocketAddr],
    timeout: Duration,
    write_timeout: Duration,
) -> io::Result<Box<dyn Transport>> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))?;
                return Ok(Box::new(Tcp(stream)));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
