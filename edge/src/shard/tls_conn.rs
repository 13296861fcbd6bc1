//! Server-side TLS on rustls's unbuffered API ([`TlsConn`]): a connection holds no buffer while
//! it is idle.
//!
//! rustls's buffered `ServerConnection` (what `futures-rustls` wraps) keeps a read buffer of at
//! least 4 KiB, zero-filled, for the connection's life: most of what an idle TLS session cost
//! beyond a plain one. Here the caller owns the buffers, and each exists only while it holds
//! something:
//! - `incoming`: TLS bytes received and not yet processed (the rest of an incomplete record, or
//!   records behind the ones already handed out). The socket is read into a per-thread scratch
//!   buffer ([`READ_BYTES`]) and only what it brought is appended.
//! - `plain`: decrypted application data the reader has not taken yet (its buffer was smaller
//!   than a record).
//! - `outgoing`: encrypted bytes the socket has not taken yet. At most [`OUTPUT_LIMIT`] of them
//!   are held: beyond it a write waits, and the rest of the output stays in the connection's
//!   own queue, where it counts against `max_output_bytes`.
//!
//! [`TlsConn::accept`] runs the handshake (bounded by the caller's timeout). Then `AsyncRead`
//! yields application data and ends at the peer's close_notify or the socket's end, and
//! `AsyncWrite` encrypts, writes what the socket takes and keeps the rest; `poll_close` sends a
//! close_notify. Handshake and key-update records rustls asks to send are queued in `outgoing`
//! ahead of any later record, so the order on the wire is rustls's.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;

/// Size of the per-thread buffer the socket is read into: one whole TLS record of the largest
/// size (16 KiB of data, a TLS 1.2 record's up to 2 KiB of expansion, the 5-byte header).
const READ_BYTES: usize = (16 << 10) + 2048 + 5;

/// Encrypted output held for a socket that takes nothing: one record's worth (rustls's own
/// default is 64 KiB).
pub const OUTPUT_LIMIT: usize = 16 << 10;

/// The most plaintext one write encrypts (one full record).
const MAX_WRITE: usize = 16 << 10;

/// Room for one record's header, padding and tag beyond its plaintext (TLS 1.3: 5 + 1 + 16;
/// TLS 1.2 with AES-GCM: 5 + 8 + 16; with ChaCha20-Poly1305: 5 + 16).
const RECORD_OVERHEAD: usize = 64;

thread_local! {
    /// Where a shard's TLS connections read their sockets (one at a time: a read never waits
    /// while holding it).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BYTES].into_boxed_slice());
}

/// What one pass over the received records came to.
enum Step {
    /// Decrypted data came: this many bytes of it in the reader's buffer, the rest (if any)
    /// waits in `plain`.
    Data(usize),
    /// Nothing more to do without more input from the peer.
    NeedInput,
    /// The plaintext of a write (or a close_notify) was encrypted into `outgoing`.
    Sent,
    /// The peer's close_notify came: no more data will.
    PeerClosed,
}

/// What the pass should do once rustls can send application data.
#[derive(Clone, Copy)]
enum Op<'a> {
    Read,
    Write(&'a [u8]),
    Close,
}

/// A TLS server session over `S`, on rustls's unbuffered API (see the module doc).
pub struct TlsConn<S> {
    io: S,
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plain: Vec<u8>,
    plain_pos: usize,
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer closed (close_notify or the socket's end): reads return 0.
    read_done: bool,
    /// Our close_notify is queued: writes fail.
    write_done: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `fill` writes to `out`, growing it to the size `fill` asks for.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(need) if need > room => room = need,
                _ => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

fn encode_required(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_required(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsConn<S> {
    /// Runs the server side of the handshake on `io`; the first application data may already
    /// wait in the returned session.
    pub async fn accept(io: S, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut t = TlsConn {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_done: false,
            write_done: false,
        };
        loop {
            let step = t.step(Op::Read, &mut [])?;
            std::future::poll_fn(|cx| t.poll_send(cx)).await?;
            if !t.conn.is_handshaking() {
                return Ok(t);
            }
            match step {
                Step::NeedInput => {
                    let n = std::future::poll_fn(|cx| t.poll_fill(cx)).await?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed during the tls handshake",
                        ));
                    }
                }
                Step::Data(_) | Step::Sent => {}
                Step::PeerClosed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed during the tls handshake",
                    ))
                }
            }
        }
    }

    /// The socket under the session.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Whether the handshake resumed a session (with a ticket) rather than a full one.
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Processes the received records until `op` is done or more input is needed: decrypted
    /// data goes to `out` (the reader's buffer) while nothing waits in `plain` and `out` has
    /// room, the rest to `plain`; records rustls wants sent go to `outgoing`.
    fn step(&mut self, op: Op<'_>, out: &mut [u8]) -> io::Result<Step> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = state.map_err(tls_error)?;
            let step = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    let mut filled = 0;
                    while let Some(record) = r.next_record() {
                        let mut payload = record.map_err(tls_error)?.payload;
                        if self.plain_pos == self.plain.len() {
                            // Nothing waits before it: straight into the reader's buffer.
                            let n = payload.len().min(out.len() - filled);
                            out[filled..filled + n].copy_from_slice(&payload[..n]);
                            filled += n;
                            payload = &payload[n..];
                        }
                        if !payload.is_empty() {
                            if self.plain_pos == self.plain.len() {
                                self.plain.clear();
                                self.plain_pos = 0;
                            }
                            self.plain.extend_from_slice(payload);
                        }
                    }
                    match op {
                        Op::Read => Some(Step::Data(filled)),
                        // Kept for the reader; go on to the write.
                        Op::Write(_) | Op::Close => None,
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    append(&mut self.outgoing, 1024, |b| e.encode(b), encode_required)
                        .map_err(other)?;
                    None
                }
                // Queued in `outgoing`, ahead of anything written later: sent in order.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::NeedInput),
                ConnectionState::WriteTraffic(mut w) => match op {
                    Op::Read => Some(Step::NeedInput),
                    Op::Write(data) => {
                        let guess = data.len() + RECORD_OVERHEAD * (data.len() / MAX_WRITE + 1);
                        append(
                            &mut self.outgoing,
                            guess,
                            |b| w.encrypt(data, b),
                            encrypt_required,
                        )
                        .map_err(other)?;
                        Some(Step::Sent)
                    }
                    Op::Close => {
                        append(
                            &mut self.outgoing,
                            RECORD_OVERHEAD,
                            |b| w.queue_close_notify(b),
                            encrypt_required,
                        )
                        .map_err(other)?;
                        Some(Step::Sent)
                    }
                },
                // Edge-triggered: once said, rustls goes on with `WriteTraffic` (sending is
                // still allowed after the peer's close_notify).
                ConnectionState::PeerClosed => {
                    self.read_done = true;
                    match op {
                        Op::Read => Some(Step::PeerClosed),
                        Op::Write(_) | Op::Close => None,
                    }
                }
                // Both sides closed: nothing more to read or send.
                ConnectionState::Closed => {
                    self.read_done = true;
                    Some(Step::PeerClosed)
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "tls early data, which this server never accepts",
                    ))
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a tls connection state this server does not handle",
                    ))
                }
            };
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if self.incoming.is_empty() {
                // Free the buffer of a finished record: an idle session holds none.
                self.incoming = Vec::new();
            }
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    /// Reads what the socket holds (into the thread's scratch buffer) and appends it to
    /// `incoming`; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut scratch[..]))?;
            self.incoming.extend_from_slice(&scratch[..n]);
            Poll::Ready(Ok(n))
        })
    }

    /// Writes `outgoing` to the socket until it is empty (then frees it) or the socket takes no
    /// more (`Pending`, with the task woken when it can).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Encrypted bytes not yet taken by the socket.
    fn unsent(&self) -> usize {
        self.outgoing.len() - self.out_pos
    }

    /// Drops the sent head of `outgoing` before more is appended.
    fn compact(&mut self) {
        if self.out_pos > 0 {
            self.outgoing.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.len().min(this.plain.len() - this.plain_pos);
                buf[..n].copy_from_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(n));
            }
            if this.read_done || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // Records rustls asked to send (a key update's answer) go out with the next read
            // if no write takes them first.
            if this.unsent() > 0 {
                let _ = this.poll_send(cx)?;
            }
            match this.step(Op::Read, buf)? {
                Step::Data(0) | Step::Sent => {}
                Step::Data(n) => return Poll::Ready(Ok(n)),
                Step::PeerClosed => return Poll::Ready(Ok(0)),
                Step::NeedInput => {
                    if ready!(this.poll_fill(cx))? == 0 {
                        // The socket ended without a close_notify: the end of the stream all
                        // the same (a client that drops its connection).
                        this.read_done = true;
                        return Poll::Ready(Ok(0));
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls session closed",
            )));
        }
        if this.unsent() > 0 && this.poll_send(cx)?.is_pending() && this.unsent() >= OUTPUT_LIMIT {
            return Poll::Pending;
        }
        let take = buf.len().min(MAX_WRITE).min(OUTPUT_LIMIT - this.unsent());
        this.compact();
        match this.step(Op::Write(&buf[..take]), &mut [])? {
            Step::Sent => {}
            Step::PeerClosed | Step::NeedInput | Step::Data(_) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "tls session cannot send",
                )))
            }
        }
        // Sent now if the socket takes it; else on the next write or flush (the task is woken
        // when the socket can take more).
        let _ = this.poll_send(cx)?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_done {
            this.write_done = true;
            this.compact();
            // A session rustls already closed has nothing more to say.
            let _ = this.step(Op::Close, &mut []);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream as StdStream};
    use std::sync::Arc;

    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use glommio::net::{TcpListener, TcpStream};
    use rustls::ClientConfig;
    use rustls_pki_types::pem::PemObject;

    use super::TlsConn;
    use crate::shard::transport::tests::on_executor;

    /// A server configuration with a new certificate, and a client configuration that trusts it
    /// and speaks only TLS 1.3 (`tls13`) or only TLS 1.2.
    fn configs(tls13: bool) -> (Arc<rustls::ServerConfig>, Arc<ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::tls::write_cert(dir.path(), "edge");
        let server = Arc::new(crate::tls::load_server_config(&cert, &key).expect("config"));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap())
            .unwrap();
        // The edge's own provider choice (crate::tls), deprecated for lacking post-quantum
        // key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let version = if tls13 {
            &rustls::version::TLS13
        } else {
            &rustls::version::TLS12
        };
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    /// A rustls client stream to `addr`, its handshake done.
    fn connect(
        config: Arc<ClientConfig>,
        addr: SocketAddr,
    ) -> rustls::StreamOwned<rustls::ClientConnection, StdStream> {
        let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
        let sock = StdStream::connect(addr).expect("connect");
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("handshake");
        }
        tls
    }

    /// Accepts one connection on a new listener and hands it to `server`; `client` (run on a
    /// thread) gets the listener's address. The client is joined once the executor has ended
    /// (so the server's socket is closed: glommio closes it on the executor).
    fn serve<C, F, Fut>(client: C, server: F)
    where
        C: FnOnce(SocketAddr) + Send + 'static,
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let client = std::thread::spawn(move || client(addr_rx.recv().expect("the address")));
        on_executor(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).unwrap();
            server(listener.accept().await.expect("accept")).await;
        });
        client.join().expect("the client thread");
    }

    /// What an idle session holds: the capacities of its three buffers.
    fn held<S>(t: &TlsConn<S>) -> [usize; 3] {
        [
            t.incoming.capacity(),
            t.plain.capacity(),
            t.outgoing.capacity(),
        ]
    }

    /// Echoes `LEN` bytes that come as three records in one write, read through a 7-byte buffer
    /// (so decrypted data waits in `plain` between reads); in TLS 1.3 the client also updates
    /// its keys halfway, asking the server to update its own (a record rustls has the server
    /// send while it reads). Between exchanges and at the end the session holds no buffer; the
    /// client's close_notify ends the server's reads, the server's ends the client's.
    fn echo(tls13: bool) {
        const LEN: usize = 40_000;
        let (server, client) = configs(tls13);
        serve(
            move |addr| {
                let mut tls = connect(client, addr);
                let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
                for round in 0..2 {
                    if round == 1 && tls13 {
                        tls.conn.refresh_traffic_keys().expect("key update");
                    }
                    tls.write_all(&data).unwrap();
                    tls.flush().unwrap();
                    let mut back = vec![0; LEN];
                    tls.read_exact(&mut back).unwrap();
                    assert!(back == data, "round {round}: the echo differs");
                }
                tls.conn.send_close_notify();
                tls.flush().unwrap();
                let mut rest = Vec::new();
                // The server's close_notify: a clean end, nothing more.
                assert_eq!(tls.read_to_end(&mut rest).expect("a clean end"), 0);
            },
            |stream| async move {
                // The client's first records may already wait in it.
                let mut t = TlsConn::accept(stream, server).await.expect("handshake");
                let mut buf = [0u8; 7];
                let mut echoed = 0;
                loop {
                    let n = t.read(&mut buf).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    t.write_all(&buf[..n]).await.expect("write");
                    echoed += n;
                    if echoed % LEN == 0 {
                        t.flush().await.expect("flush");
                        assert_eq!(held(&t), [0, 0, 0], "idle after {echoed} bytes");
                    }
                }
                assert_eq!(echoed, 2 * LEN);
                t.close().await.expect("close");
                assert_eq!(held(&t), [0, 0, 0], "closed");
            },
        );
    }

    #[test]
    fn tls13_echoes_through_a_small_buffer_with_a_key_update_and_holds_nothing_idle() {
        echo(true);
    }

    #[test]
    fn tls12_echoes_through_a_small_buffer_and_holds_nothing_idle() {
        echo(false);
    }

    /// A client that shuts its socket without a close_notify: the data before it arrives, then
    /// the stream ends (as a plain socket's would).
    #[test]
    fn a_socket_shut_without_close_notify_ends_the_stream_after_its_data() {
        let (server, client) = configs(true);
        serve(
            move |addr| {
                let mut tls = connect(client, addr);
                tls.write_all(b"last words").unwrap();
                tls.flush().unwrap();
                // A FIN with no close_notify before it; then whatever the server sent (its
                // session tickets) is read, so the close resets nothing.
                tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                let _ = tls.sock.read_to_end(&mut rest);
            },
            |stream| async move {
                let mut t = TlsConn::accept(stream, server).await.expect("handshake");
                let mut got = Vec::new();
                t.read_to_end(&mut got).await.expect("read to the end");
                assert_eq!(got, b"last words");
            },
        );
    }

    /// Bytes that are not TLS (an HTTP request, a record header announcing more than a record
    /// may hold) fail the handshake with an error; nothing panics.
    #[test]
    fn bytes_that_are_not_tls_fail_the_handshake() {
        let junk: [&'static [u8]; 3] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3],
            &[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5],
        ];
        for bytes in junk {
            let (server, _) = configs(true);
            serve(
                move |addr| {
                    let mut s = StdStream::connect(addr).expect("connect");
                    s.write_all(bytes).unwrap();
                    // Keep the socket open until the server gave up, then see it close.
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                },
                move |stream| async move {
                    match TlsConn::accept(stream, server).await {
                        Ok(_) => panic!("{bytes:?} accepted as a tls handshake"),
                        Err(e) => assert!(
                            matches!(
                                e.kind(),
                                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                            ),
                            "{bytes:?}: {e}"
                        ),
                    }
                },
            );
        }
    }
}
