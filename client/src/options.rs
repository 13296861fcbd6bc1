//! [`ClientOptions`]: who logs in and how the client behaves; [`ServerLimits`]: what HELLO_OK
//! announced.

use crate::ClientError;

/// How a [`crate::Client`] reaches the server (docs/PROTOCOL-v2.md "Transports"). Every
/// reconnect uses the same transport.
///
/// `roots` are the certificates the client trusts as issuers of the server's certificate. For
/// a server with a self-signed certificate (or one signed by a private CA), trust that
/// certificate (or the CA's) itself: [`roots_from_pem`] with the contents of its PEM file, and
/// a `server_name` the certificate is valid for (a DNS name in its subjectAltName, or an IP
/// address in an IP subjectAltName). Public CAs: fill a [`rustls::RootCertStore`] from a
/// crate such as `webpki-roots` or from the system store.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// Plain TCP (the default).
    #[default]
    Tcp,
    /// TLS 1.2 or 1.3 over TCP (the server's `tls_listen` port).
    Tls {
        /// The name the server's certificate must be valid for (also sent as SNI).
        server_name: String,
        /// Trusted roots.
        roots: rustls::RootCertStore,
    },
    /// WebSocket (`ws://`, the server's `ws_listen` port): one binary message per v2 frame.
    Ws {
        /// The request path, e.g. `/` (empty means `/`).
        path: String,
    },
    /// WebSocket over TLS (`wss://`, the server's `wss_listen` port).
    Wss {
        /// The name the server's certificate must be valid for (also the URL's host).
        server_name: String,
        /// Trusted roots.
        roots: rustls::RootCertStore,
        /// The request path, e.g. `/` (empty means `/`).
        path: String,
    },
}

/// A root store holding every certificate of a PEM file (`-----BEGIN CERTIFICATE-----`
/// blocks), e.g. a self-signed server certificate or a private CA's certificate. No
/// certificate, or one that does not parse, is [`ClientError::Invalid`].
pub fn roots_from_pem(pem: &[u8]) -> Result<rustls::RootCertStore, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| ClientError::Invalid(format!("pem certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Invalid(format!("trusted certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Invalid(
            "no certificate in the pem data".to_owned(),
        ));
    }
    Ok(roots)
}

/// Options of a [`crate::Client`]. Build with [`ClientOptions::new`], then set fields.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The user name (1..=256 bytes).
    pub user: String,
    /// TCP, TLS, WebSocket or WebSocket over TLS. Default [`Transport::Tcp`].
    pub transport: Transport,
    /// The JWT, when the server checks tokens: HELLO's token is then `user:jwt`. Default none.
    pub jwt: Option<String>,
    /// HELLO `client_name`. Default `iris-client`.
    pub client_name: String,
    /// HELLO `client_version`. Default this crate's version.
    pub client_version: String,
    /// TCP connect, then TLS handshake and WebSocket upgrade (each), then HELLO_OK wait, per
    /// attempt. Default 5000.
    pub hello_timeout_ms: u64,
    /// A write blocked this long ends the connection (then it reconnects). Default 10000.
    pub write_timeout_ms: u64,
    /// Most sends waiting for SEND_ACK. Default 1024.
    pub max_unacked: usize,
    /// How long [`crate::Client::send`] blocks while the outbox is full before it returns
    /// [`crate::ClientError::OutboxFull`]; 0 fails at once. Default 5000.
    pub outbox_wait_ms: u64,
    /// Reconnect in the background when the connection drops (read error, EOF, or no frame
    /// for 3 ping intervals), with exponential backoff. Default true.
    pub auto_reconnect: bool,
    /// First backoff delay between reconnect attempts. Default 100.
    pub reconnect_min_ms: u64,
    /// Largest backoff delay. Default 5000.
    pub reconnect_max_ms: u64,
    /// Automatic acks are sent at most this long after the delivery was handed to the app
    /// (or at once when 256 are pending). Default 20.
    pub ack_flush_ms: u64,
    /// Do not ack deliveries automatically: the app calls [`crate::Client::ack`]. Default false.
    pub manual_ack: bool,
    /// The first client_msg_id; later sends count up from it. Default: unix microseconds at
    /// [`crate::Client::connect`], so ids stay unique per sender across restarts of the app
    /// as long as it sends fewer than a million messages per second of its lifetime.
    pub first_client_msg_id: Option<u64>,
    /// HELLO `resume_after` of the first connection: the highest server id the app processed
    /// in an earlier run (0: none). Later HELLOs carry the highest id this client acked.
    pub resume_after: u64,
    /// How many recent delivery ids are remembered to drop redeliveries. Default 8192.
    pub dedupe_window: usize,
}

impl ClientOptions {
    /// The defaults for `user`.
    pub fn new(user: impl Into<String>) -> ClientOptions {
        ClientOptions {
            user: user.into(),
            transport: Transport::Tcp,
            jwt: None,
            client_name: "iris-client".to_owned(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
            hello_timeout_ms: 5000,
            write_timeout_ms: 10_000,
            max_unacked: 1024,
            outbox_wait_ms: 5000,
            auto_reconnect: true,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            ack_flush_ms: 20,
            manual_ack: false,
            first_client_msg_id: None,
            resume_after: 0,
            dedupe_window: 8192,
        }
    }

    /// HELLO's token: `user` or `user:jwt`.
    pub fn token(&self) -> String {
        match &self.jwt {
            Some(jwt) => format!("{}:{jwt}", self.user),
            None => self.user.clone(),
        }
    }
}

/// The values of the last HELLO_OK.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerLimits {
    /// Protocol version spoken.
    pub version: u8,
    /// Largest frame `len`; a SEND payload may be `max_frame_bytes - 512` bytes.
    pub max_frame_bytes: u32,
    /// The server PINGs after this much silence; the client drops a connection silent for 3.
    pub ping_interval_ms: u32,
    /// SENDs per second allowed (0: no limit).
    pub send_rate_per_sec: u32,
    /// SEND burst above the rate.
    pub send_burst: u32,
    /// The session's id.
    pub session_id: u64,
    /// The server's clock at login.
    pub server_time_unix_ms: u64,
}

impl ServerLimits {
    /// The largest SEND payload.
    pub fn max_payload_bytes(&self) -> usize {
        (self.max_frame_bytes as usize).saturating_sub(iris_wire::v2::FRAME_OVERHEAD_BYTES)
    }
}
