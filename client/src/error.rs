//! [`ClientError`]: every way a [`crate::Client`] call fails, classified by cause.

use std::io;
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address did not resolve, or no resolved address accepted a TCP connection.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address as given (or its resolved form).
        addr: String,
        /// The last connect error.
        source: io::Error,
    },
    /// The TLS handshake failed: most often the server's certificate is not signed by a
    /// trusted root ([`crate::options::Transport::Tls`] `roots`) or not valid for
    /// `server_name` ("invalid peer certificate: UnknownIssuer" or "certificate not valid for name").
    #[error("tls handshake with {addr}: {reason}")]
    Tls {
        /// The server address.
        addr: String,
        /// What rustls reported.
        reason: String,
    },
    /// The WebSocket upgrade failed (not a WebSocket server, refused path, timeout).
    #[error("websocket upgrade with {addr}: {reason}")]
    WebSocket {
        /// The server address.
        addr: String,
        /// What tungstenite reported.
        reason: String,
    },
    /// Reading or writing the connection failed, or it closed before HELLO_OK.
    #[error("connection i/o: {0}")]
    Io(#[from] io::Error),
    /// No HELLO_OK (or ERROR) arrived within `hello_timeout_ms`.
    #[error("no HELLO_OK within {0:?}")]
    HelloTimeout(Duration),
    /// The server refused the login with an ERROR frame (`bad_token`, `unsupported_version`,
    /// `shutting_down`, ...). `code` is the wire code (`iris_wire::v2::ErrorCode::from_code`).
    #[error("refused by the server: {code} {reason}")]
    Refused {
        /// The wire error code.
        code: u16,
        /// Its ASCII reason.
        reason: String,
    },
    /// The server limits logins: it answered HELLO with RATE_LIMITED and closed.
    #[error("login rate limited, retry after {retry_after_ms} ms")]
    LoginRateLimited {
        /// Try again after this long.
        retry_after_ms: u32,
    },
    /// The server sent bytes that are not protocol v2 (the connection was closed).
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// There is no connection now (it dropped and `auto_reconnect` is off): call
    /// [`crate::Client::reconnect`].
    #[error("not connected")]
    Disconnected,
    /// The un-acked outbox stayed full (`max_unacked` sends) for `outbox_wait_ms`.
    #[error("outbox full: {max_unacked} sends wait for SEND_ACK")]
    OutboxFull {
        /// The bound.
        max_unacked: usize,
    },
    /// An argument the protocol cannot carry (empty or too long user name, payload or bundle
    /// too large, no ids); nothing was sent.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// [`crate::Client::close`] was called.
    #[error("client closed")]
    Closed,
}
