//! One connection: [`establish`] connects, sends HELLO, waits for HELLO_OK and installs the
//! connection (resending the outbox); a reader thread decodes server frames into the shared
//! state ([`reader_loop`]), a writer thread writes queued frames in batches ([`writer_loop`]).
//!
//! Everything that must be atomic with the outbox (a send, a resend after login) happens
//! under the state lock and only queues bytes to the writer (an unbounded channel, bounded in
//! practice by the outbox and by what the app sends), so no socket write ever holds the lock.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use iris_wire::v2::{
    decode_server, encode_client, ClientFrame, Decoded, ErrorCode, LimitedAction, ServerFrame,
    DEFAULT_MAX_FRAME_BYTES,
};

use crate::book::Mark;
use crate::client::{Inner, State};
use crate::transport::Closer;
use crate::{ClientError, Event, ServerLimits};

/// Bytes queued for the writer thread.
pub(crate) enum WriterMsg {
    /// Frames to write.
    Bytes(Vec<u8>),
    /// An outbox frame (shared with the outbox).
    Shared(Arc<[u8]>),
    /// Write what came before, then close the connection.
    Close,
}

/// The live connection, as the shared state holds it.
pub(crate) struct Conn {
    /// Its generation (each connect attempt takes the next).
    pub(crate) generation: u64,
    /// Frames to write.
    pub(crate) tx: Sender<WriterMsg>,
    /// Ends it.
    pub(crate) closer: Arc<dyn Closer>,
    /// The writer thread (joined by `close` so the last acks reach the socket).
    pub(crate) writer: Option<JoinHandle<()>>,
    /// When the writer last wrote, in ms since [`Inner::epoch`] (for keepalive PINGs).
    pub(crate) last_write_ms: Arc<AtomicU64>,
}

impl Conn {
    /// Queues bytes; a closed writer means the connection is going away, and the reader
    /// reports that.
    pub(crate) fn write(&self, bytes: Vec<u8>) {
        let _ = self.tx.send(WriterMsg::Bytes(bytes));
    }
}

/// Encodes one client frame.
pub(crate) fn encode(frame: &ClientFrame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client(frame, &mut out);
    out
}

/// A silence of this many ping intervals drops the connection.
pub(crate) const IDLE_PINGS: u32 = 3;

/// Connects, logs in and installs the connection in the state (resending the outbox and the
/// pending acks). Pushes [`Event::Reconnected`] unless it is the client's first connection.
pub(crate) fn establish(inner: &Arc<Inner>) -> Result<ServerLimits, ClientError> {
    let opts = &inner.opts;
    let (generation, resume_after) = {
        let mut st = inner.lock();
        if st.closed {
            return Err(ClientError::Closed);
        }
        st.generation += 1;
        (st.generation, st.resume_after)
    };
    let timeout = Duration::from_millis(opts.hello_timeout_ms.max(1));
    let (reader, writer, closer) = inner.connector.connect(
        &inner.addrs,
        timeout,
        Duration::from_millis(opts.write_timeout_ms),
    )?;
    let (tx, rx) = mpsc::channel();
    let wcloser = closer.clone();
    let last_write_ms = Arc::new(AtomicU64::new(0));
    let written = Written {
        at_ms: last_write_ms.clone(),
        epoch: inner.epoch,
    };
    let writer = thread::Builder::new()
        .name("iris-client-writer".into())
        .spawn(move || writer_loop(writer, rx, wcloser, written))?;
    let _ = tx.send(WriterMsg::Bytes(encode(&ClientFrame::Hello {
        client_name: opts.client_name.as_bytes().to_vec(),
        client_version: opts.client_version.as_bytes().to_vec(),
        token: opts.token().into_bytes(),
        resume_after,
    })));
    let (hello_tx, hello_rx) = mpsc::sync_channel(1);
    {
        let inner = inner.clone();
        let tx = tx.clone();
        let closer = closer.clone();
        thread::Builder::new()
            .name("iris-client-reader".into())
            .spawn(move || reader_loop(inner, generation, reader, tx, closer, hello_tx))?;
    }
    let limits = match hello_rx.recv_timeout(timeout) {
        Ok(Ok(limits)) => limits,
        Ok(Err(e)) => {
            closer.close();
            return Err(e);
        }
        Err(RecvTimeoutError::Timeout) => {
            closer.close();
            return Err(ClientError::HelloTimeout(timeout));
        }
        Err(RecvTimeoutError::Disconnected) => {
            closer.close();
            return Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    };
    let mut st = inner.lock();
    if st.closed {
        closer.close();
        return Err(ClientError::Closed);
    }
    if st.dead_generation >= generation {
        return Err(ClientError::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed right after HELLO_OK",
        )));
    }
    if let Some(old) = st.conn.take() {
        old.closer.close();
    }
    for frame in st.outbox.all_for_resend() {
        let _ = tx.send(WriterMsg::Shared(frame));
    }
    let conn = Conn {
        generation,
        tx,
        closer,
        writer: Some(writer),
        last_write_ms,
    };
    st.conn = Some(conn);
    st.flush_acks();
    st.limits = limits;
    st.last_frame_at = Instant::now();
    if st.ever_connected {
        st.events.push_back(Event::Reconnected);
    }
    st.ever_connected = true;
    st.backoff = Duration::ZERO;
    tracing::debug!(
        generation,
        session_id = limits.session_id,
        "iris-client logged in"
    );
    inner.cv.notify_all();
    inner.maint_cv.notify_all();
    Ok(limits)
}

/// Writes queued frames, batching whatever is queued, until the channel closes, a write
/// fails (then closes the connection) or [`WriterMsg::Close`].
fn writer_loop(
    mut w: Box<dyn Write + Send>,
    rx: Receiver<WriterMsg>,
    closer: Arc<dyn Closer>,
    written: Written,
) {
    let mut out = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut close = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriterMsg::Bytes(b) => out.extend_from_slice(&b),
                WriterMsg::Shared(b) => out.extend_from_slice(&b),
                WriterMsg::Close => {
                    close = true;
                    break;
                }
            }
            if out.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !out.is_empty() {
            if let Err(e) = w.write_all(&out).and_then(|()| w.flush()) {
                tracing::debug!(error = %e, "iris-client write failed");
                closer.close();
                return;
            }
            out.clear();
            written.now();
        }
        if close {
            closer.close();
            return;
        }
    }
}

/// Where the writer records when it last wrote.
struct Written {
    at_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Written {
    fn now(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(ms, Ordering::Relaxed);
    }
}

/// The nonce of the client's own keepalive PINGs (their PONG is not an event).
pub(crate) const KEEPALIVE_NONCE: u64 = u64::MAX;

/// Reads and handles server frames until the connection ends; then marks it dead.
fn reader_loop(
    inner: Arc<Inner>,
    generation: u64,
    mut r: Box<dyn Read + Send>,
    tx: Sender<WriterMsg>,
    closer: Arc<dyn Closer>,
    hello: SyncSender<Result<ServerLimits, ClientError>>,
) {
    let mut hello = Some(hello);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut max_frame = DEFAULT_MAX_FRAME_BYTES;
    let why: ClientError = 'conn: loop {
        let mut start = 0;
        loop {
            match decode_server(&buf[start..], max_frame) {
                Ok(Decoded::Incomplete { .. }) => break,
                Ok(Decoded::Unknown { ty, consumed }) => {
                    tracing::debug!(ty, "iris-client skipped an unknown frame type");
                    start += consumed;
                }
                Ok(Decoded::Frame { frame, consumed }) => {
                    start += consumed;
                    if let Some(h) = hello.take() {
                        match login_answer(frame, &tx) {
                            Login::Ok(limits) => {
                                max_frame = (limits.max_frame_bytes as usize).max(1);
                                let _ = h.send(Ok(limits));
                            }
                            Login::Wait => hello = Some(h),
                            Login::Err(e) => {
                                let _ = h.send(Err(e));
                                break 'conn ClientError::Disconnected;
                            }
                        }
                    } else {
                        handle(&inner, generation, &tx, frame);
                    }
                }
                Err(e) => match e.skip() {
                    Some(n) => {
                        tracing::debug!(error = %e, "iris-client skipped a bad frame");
                        start += n;
                    }
                    None => break 'conn ClientError::Protocol(e.to_string()),
                },
            }
        }
        buf.drain(..start);
        let len = buf.len();
        buf.resize(len + 64 * 1024, 0);
        match r.read(&mut buf[len..]) {
            Ok(0) => break ClientError::Io(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.truncate(len + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => break ClientError::Io(e),
        }
    };
    closer.close();
    tracing::debug!(generation, reason = %why, "iris-client connection ended");
    if let Some(h) = hello {
        let _ = h.send(Err(why));
    }
    let mut st = inner.lock();
    st.dead_generation = st.dead_generation.max(generation);
    if st.conn.as_ref().is_some_and(|c| c.generation == generation) {
        st.conn = None;
        st.reconnect_at = Instant::now();
        inner.cv.notify_all();
        inner.maint_cv.notify_all();
    }
}

/// What a frame before HELLO_OK means.
enum Login {
    Ok(ServerLimits),
    /// A PING (answered): keep waiting.
    Wait,
    Err(ClientError),
}

fn login_answer(frame: ServerFrame, tx: &Sender<WriterMsg>) -> Login {
    match frame {
        ServerFrame::HelloOk {
            version,
            max_frame_bytes,
            ping_interval_ms,
            send_rate_per_sec,
            send_burst,
            session_id,
            server_time_unix_ms,
        } => Login::Ok(ServerLimits {
            version,
            max_frame_bytes,
            ping_interval_ms,
            send_rate_per_sec,
            send_burst,
            session_id,
            server_time_unix_ms,
        }),
        ServerFrame::Error { code, reason, .. } => {
            Login::Err(ClientError::Refused { code, reason })
        }
        ServerFrame::RateLimited { retry_after_ms, .. } => {
            Login::Err(ClientError::LoginRateLimited { retry_after_ms })
        }
        ServerFrame::Ping { nonce } => {
            let _ = tx.send(WriterMsg::Bytes(encode(&ClientFrame::Pong { nonce })));
            Login::Wait
        }
        other => Login::Err(ClientError::Protocol(format!(
            "frame type {:#04x} before HELLO_OK",
            other.ty()
        ))),
    }
}

/// Handles one frame after login.
fn handle(inner: &Inner, generation: u64, tx: &Sender<WriterMsg>, frame: ServerFrame) {
    if let ServerFrame::Ping { nonce } = frame {
        let _ = tx.send(WriterMsg::Bytes(encode(&ClientFrame::Pong { nonce })));
        touch(&mut inner.lock(), generation);
        return;
    }
    let mut st = inner.lock();
    touch(&mut st, generation);
    let event = match frame {
        ServerFrame::SendAck {
            client_msg_id,
            server_id,
            server_time_unix_ms,
        } => {
            if !st.outbox.remove(client_msg_id) {
                return; // a second answer to a resend: the app saw the first
            }
            inner.cv.notify_all(); // room in the outbox
            Event::SendAck {
                client_msg_id,
                server_id,
                server_time_unix_ms,
            }
        }
        ServerFrame::Deliver {
            server_id,
            sender,
            server_time_unix_ms,
            kind,
            payload,
        } => {
            match st.seen.arrive(server_id) {
                None => {}
                Some(Mark::Acked) => {
                    // Redelivered because our ack did not make it: ack again, do not show.
                    if st.acks.push(server_id, Instant::now()) {
                        st.flush_acks();
                    }
                    inner.maint_cv.notify_all();
                    return;
                }
                Some(Mark::Queued | Mark::Handed) => return,
            }
            Event::Deliver {
                server_id,
                sender,
                kind,
                payload,
                server_time_unix_ms,
            }
        }
        ServerFrame::Receipt {
            kind,
            reader,
            unix_ms,
            ids,
        } => Event::Receipt {
            kind,
            reader,
            unix_ms,
            ids,
        },
        ServerFrame::Typing { sender, typing } => Event::Typing { sender, typing },
        ServerFrame::Status {
            user,
            online,
            last_seen_unix_secs,
        } => Event::Status {
            user,
            online,
            last_seen_unix_secs,
        },
        ServerFrame::Prekeys { user, bundle } => Event::Prekeys { user, bundle },
        ServerFrame::Pong { nonce } if nonce == KEEPALIVE_NONCE => return,
        ServerFrame::Pong { nonce } => Event::Pong { nonce },
        ServerFrame::RateLimited {
            what,
            retry_after_ms,
            reference,
        } => {
            if what == LimitedAction::Send && reference != 0 {
                let at = Instant::now() + Duration::from_millis(u64::from(retry_after_ms));
                st.outbox.schedule(reference, at);
                inner.maint_cv.notify_all();
            }
            Event::RateLimited {
                what,
                retry_after_ms,
                reference,
            }
        }
        ServerFrame::Error {
            code,
            reason,
            reference,
        } => {
            if reference != 0 && st.outbox.contains(reference) {
                if code == ErrorCode::StoreUnavailable.code() {
                    st.outbox
                        .schedule(reference, Instant::now() + Duration::from_secs(1));
                    inner.maint_cv.notify_all();
                } else {
                    st.outbox.remove(reference);
                    inner.cv.notify_all();
                }
            }
            Event::Error {
                code,
                reason,
                reference,
            }
        }
        ServerFrame::HelloOk { .. } | ServerFrame::Ping { .. } => return,
    };
    st.events.push_back(event);
    inner.cv.notify_all();
}

/// A frame arrived on `generation`: the connection is alive.
fn touch(st: &mut State, generation: u64) {
    if st.conn.as_ref().is_some_and(|c| c.generation == generation) {
        st.last_frame_at = Instant::now();
    }
}
