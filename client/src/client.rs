//! [`Client`]: the public API over the shared state, and the maintenance thread that flushes
//! acks, resends limited sends, drops silent connections and reconnects with backoff.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use iris_wire::v2::{
    ClientFrame, ErrorCode, MsgKind, ReceiptKind, MAX_ACK_IDS, MAX_PREKEY_BYTES, MAX_USER_BYTES,
};

use crate::book::{seed_client_msg_id, AckBatch, Mark, Outbox, SeenWindow};
use crate::conn::{encode, establish, Conn, WriterMsg, IDLE_PINGS, KEEPALIVE_NONCE};
use crate::transport::Connector;
use crate::{ClientError, ClientOptions, Event, ServerLimits};

/// State shared by the API, the connection threads and the maintenance thread.
pub(crate) struct Inner {
    pub(crate) opts: ClientOptions,
    pub(crate) addrs: Vec<SocketAddr>,
    /// The transport, ready to connect.
    pub(crate) connector: Connector,
    state: Mutex<State>,
    /// Events queued, outbox room, connection up or down, close.
    pub(crate) cv: Condvar,
    /// Wakes the maintenance thread (acks pending, a resend scheduled, a drop, close).
    pub(crate) maint_cv: Condvar,
    /// One connect attempt at a time.
    connect_lock: Mutex<()>,
    /// The origin of the writers' `last_write_ms`.
    pub(crate) epoch: Instant,
}

impl Inner {
    /// The state; a panicked holder cannot leave it half-updated in a way that matters more
    /// than stopping, so a poisoned lock is taken as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The mutable state.
pub(crate) struct State {
    pub(crate) conn: Option<Conn>,
    /// The last connection generation handed out.
    pub(crate) generation: u64,
    /// The highest generation whose reader ended.
    pub(crate) dead_generation: u64,
    pub(crate) closed: bool,
    pub(crate) ever_connected: bool,
    /// A login refusal that reconnecting cannot fix (auto reconnect stops).
    pub(crate) fatal: Option<(u16, String)>,
    pub(crate) outbox: Outbox,
    pub(crate) next_client_msg_id: u64,
    pub(crate) events: VecDeque<Event>,
    pub(crate) seen: SeenWindow,
    pub(crate) acks: AckBatch,
    /// HELLO `resume_after`: the highest id acked so far.
    pub(crate) resume_after: u64,
    pub(crate) limits: ServerLimits,
    pub(crate) last_frame_at: Instant,
    /// The next automatic reconnect attempt.
    pub(crate) reconnect_at: Instant,
    /// The current backoff delay (0 after a success).
    pub(crate) backoff: Duration,
    pub(crate) ping_nonce: u64,
}

impl State {
    /// Sends the pending acks on the live connection (kept while there is none).
    pub(crate) fn flush_acks(&mut self) {
        let Some(conn) = &self.conn else { return };
        if self.acks.is_empty() {
            return;
        }
        let (frames, max) = self.acks.take_frames();
        for f in frames {
            conn.write(f);
        }
        self.resume_after = self.resume_after.max(max);
    }

    /// The connection, or why there is none.
    fn live(&self) -> Result<&Conn, ClientError> {
        if self.closed {
            return Err(ClientError::Closed);
        }
        self.conn.as_ref().ok_or(ClientError::Disconnected)
    }
}

/// A protocol v2 client: one logged-in user, thread-safe (`&self` everywhere, share it in an
/// `Arc`). See the crate documentation for an example.
pub struct Client {
    inner: Arc<Inner>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.inner.opts.user)
            .field("addrs", &self.inner.addrs)
            .finish_non_exhaustive()
    }
}

fn check_user(what: &str, user: &[u8]) -> Result<(), ClientError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(ClientError::Invalid(format!(
            "{what} must be 1..={MAX_USER_BYTES} bytes, not {}",
            user.len()
        )));
    }
    Ok(())
}

impl Client {
    /// Connects over [`ClientOptions::transport`], logs in (HELLO, waits up to `hello_timeout_ms` for HELLO_OK) and
    /// starts the background threads. An ERROR answer is [`ClientError::Refused`].
    pub fn connect(addr: impl ToSocketAddrs, opts: ClientOptions) -> Result<Client, ClientError> {
        check_user("user", opts.user.as_bytes())?;
        let connector = Connector::new(&opts.transport)?;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: "(unresolved)".into(),
                source,
            })?
            .collect();
        let now = Instant::now();
        let state = State {
            conn: None,
            generation: 0,
            dead_generation: 0,
            closed: false,
            ever_connected: false,
            fatal: None,
            outbox: Outbox::new(),
            next_client_msg_id: opts.first_client_msg_id.unwrap_or_else(seed_client_msg_id),
            events: VecDeque::new(),
            seen: SeenWindow::new(opts.dedupe_window),
            acks: AckBatch::new(),
            resume_after: opts.resume_after,
            limits: ServerLimits::default(),
            last_frame_at: now,
            reconnect_at: now,
            backoff: Duration::ZERO,
            ping_nonce: 0,
        };
        let inner = Arc::new(Inner {
            opts,
            addrs,
            connector,
            state: Mutex::new(state),
            cv: Condvar::new(),
            maint_cv: Condvar::new(),
            connect_lock: Mutex::new(()),
            epoch: now,
        });
        {
            let _one = inner.connect_lock.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = establish(&inner) {
                inner.lock().closed = true;
                return Err(e);
            }
        }
        let m = inner.clone();
        let maintenance = thread::Builder::new()
            .name("iris-client-maint".into())
            .spawn(move || maintenance(&m))?;
        Ok(Client {
            inner,
            maintenance: Mutex::new(Some(maintenance)),
        })
    }

    /// The values of the last HELLO_OK.
    pub fn server_limits(&self) -> ServerLimits {
        self.inner.lock().limits
    }

    /// Whether a logged-in connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().conn.is_some()
    }

    /// Sends a message and returns its client_msg_id. The message stays in the outbox until
    /// its SEND_ACK ([`Event::SendAck`]) and is sent again, with the same id, on every
    /// reconnect before that. While disconnected it is only queued (sent at reconnect).
    /// When `max_unacked` sends wait, this blocks up to `outbox_wait_ms` for room, then
    /// fails with [`ClientError::OutboxFull`].
    pub fn send(&self, to: &[u8], kind: MsgKind, payload: &[u8]) -> Result<u64, ClientError> {
        check_user("recipient", to)?;
        let opts = &self.inner.opts;
        let deadline = Instant::now() + Duration::from_millis(opts.outbox_wait_ms);
        let mut st = self.inner.lock();
        let max_payload = st.limits.max_payload_bytes();
        if payload.len() > max_payload {
            return Err(ClientError::Invalid(format!(
                "payload of {} bytes, the server takes at most {max_payload}",
                payload.len()
            )));
        }
        loop {
            if st.closed {
                return Err(ClientError::Closed);
            }
            if st.outbox.len() < opts.max_unacked.max(1) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::OutboxFull {
                    max_unacked: opts.max_unacked,
                });
            }
            st = self
                .inner
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let client_msg_id = st.next_client_msg_id;
        st.next_client_msg_id = client_msg_id.wrapping_add(1);
        let frame: Arc<[u8]> = Arc::from(encode(&ClientFrame::Send {
            client_msg_id,
            recipient: to.to_vec(),
            kind,
            payload: payload.to_vec(),
        }));
        st.outbox.insert(client_msg_id, frame.clone());
        if let Some(conn) = &st.conn {
            let _ = conn.tx.send(WriterMsg::Shared(frame));
        }
        Ok(client_msg_id)
    }

    /// Sends waiting for their SEND_ACK.
    pub fn unacked_sends(&self) -> usize {
        self.inner.lock().outbox.len()
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` when none came. A returned
    /// [`Event::Deliver`] is acked (batched) unless `manual_ack`. Fails with
    /// [`ClientError::Disconnected`] when the connection is down and `auto_reconnect` is
    /// off (events received before the drop are returned first), with
    /// [`ClientError::Refused`] when auto reconnect gave up on a refused login.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            if let Some(event) = st.events.pop_front() {
                if let Event::Deliver { server_id, .. } = &event {
                    let id = *server_id;
                    if self.inner.opts.manual_ack {
                        st.seen.set(id, Mark::Handed);
                    } else {
                        st.seen.set(id, Mark::Acked);
                        if st.acks.push(id, Instant::now()) {
                            st.flush_acks();
                        } else {
                            self.inner.maint_cv.notify_all();
                        }
                    }
                }
                return Ok(Some(event));
            }
            if st.closed {
                return Err(ClientError::Closed);
            }
            if let Some((code, reason)) = &st.fatal {
                return Err(ClientError::Refused {
                    code: *code,
                    reason: reason.clone(),
                });
            }
            if st.conn.is_none() && !self.inner.opts.auto_reconnect {
                return Err(ClientError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            st = self
                .inner
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Acks deliveries (with `manual_ack`; harmless otherwise): sent at once, in frames of at
    /// most 1024 ids. Without a connection they are sent after the next login.
    pub fn ack(&self, ids: &[u64]) -> Result<(), ClientError> {
        let mut st = self.inner.lock();
        if st.closed {
            return Err(ClientError::Closed);
        }
        let now = Instant::now();
        for &id in ids {
            st.seen.set(id, Mark::Acked);
            st.acks.push(id, now);
        }
        st.flush_acks();
        Ok(())
    }

    /// Sends a delivered or read receipt for messages `to_sender` sent (their server ids), in
    /// frames of at most 1024 ids.
    pub fn receipt(
        &self,
        kind: ReceiptKind,
        to_sender: &[u8],
        ids: &[u64],
    ) -> Result<(), ClientError> {
        check_user("receipt sender", to_sender)?;
        if ids.is_empty() {
            return Err(ClientError::Invalid(
                "a receipt names at least one id".into(),
            ));
        }
        let st = self.inner.lock();
        let conn = st.live()?;
        for chunk in ids.chunks(MAX_ACK_IDS) {
            conn.write(encode(&ClientFrame::Receipt {
                kind,
                sender: to_sender.to_vec(),
                ids: chunk.to_vec(),
            }));
        }
        Ok(())
    }

    /// Tells `to` this user is typing (`true`) or stopped.
    pub fn typing(&self, to: &[u8], typing: bool) -> Result<(), ClientError> {
        check_user("typing target", to)?;
        self.write(ClientFrame::Typing {
            target: to.to_vec(),
            typing,
        })
    }

    /// Asks whether `user` is online; the answer comes as [`Event::Status`].
    pub fn status(&self, user: &[u8]) -> Result<(), ClientError> {
        check_user("user", user)?;
        self.write(ClientFrame::StatusQuery {
            user: user.to_vec(),
        })
    }

    /// Uploads this user's prekey bundle (a CBOR map, at most 8 KiB).
    pub fn prekeys_upload(&self, cbor: &[u8]) -> Result<(), ClientError> {
        if cbor.len() > MAX_PREKEY_BYTES {
            return Err(ClientError::Invalid(format!(
                "prekey bundle of {} bytes, at most {MAX_PREKEY_BYTES}",
                cbor.len()
            )));
        }
        self.write(ClientFrame::PrekeyUpload {
            bundle: cbor.to_vec(),
        })
    }

    /// Asks for `user`'s prekey bundle; the answer comes as [`Event::Prekeys`].
    pub fn prekeys_fetch(&self, user: &[u8]) -> Result<(), ClientError> {
        check_user("user", user)?;
        self.write(ClientFrame::PrekeyFetch {
            user: user.to_vec(),
        })
    }

    /// Sends a PING; returns its nonce, echoed by [`Event::Pong`].
    pub fn ping(&self) -> Result<u64, ClientError> {
        let mut st = self.inner.lock();
        st.ping_nonce += 1;
        let nonce = st.ping_nonce;
        st.live()?.write(encode(&ClientFrame::Ping { nonce }));
        Ok(nonce)
    }

    fn write(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.inner.lock().live()?.write(encode(&frame));
        Ok(())
    }

    /// Drops the current connection (if any) and logs in again now; un-acked sends are sent
    /// again with their client_msg_id, pending acks follow, and [`Event::Reconnected`] is
    /// queued.
    pub fn reconnect(&self) -> Result<ServerLimits, ClientError> {
        let _one = self
            .inner
            .connect_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(ClientError::Closed);
            }
            if let Some(old) = st.conn.take() {
                old.closer.close();
            }
            st.fatal = None;
        }
        establish(&self.inner)
    }

    /// Sends the pending acks, closes the connection (waiting, up to the write timeout, for
    /// queued frames to be written) and stops the background threads. Idempotent; also done
    /// on drop. Un-acked sends are dropped with the client.
    pub fn close(&self) {
        let conn = {
            let mut st = self.inner.lock();
            if st.closed {
                None
            } else {
                st.flush_acks();
                st.closed = true;
                st.conn.take()
            }
        };
        self.inner.cv.notify_all();
        self.inner.maint_cv.notify_all();
        if let Some(mut conn) = conn {
            let _ = conn.tx.send(WriterMsg::Close);
            if let Some(w) = conn.writer.take() {
                let _ = w.join();
            }
            conn.closer.close();
        }
        let handle = self
            .maintenance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether a refused login will be refused again (auto reconnect stops).
fn refusal_is_final(code: u16) -> bool {
    matches!(
        ErrorCode::from_code(code),
        Some(ErrorCode::BadToken | ErrorCode::UnsupportedVersion)
    )
}

/// The maintenance loop: ack flushes, scheduled resends, the idle check and auto reconnect.
fn maintenance(inner: &Arc<Inner>) {
    let opts = &inner.opts;
    let ack_flush = Duration::from_millis(opts.ack_flush_ms);
    let mut st = inner.lock();
    loop {
        if st.closed {
            return;
        }
        let now = Instant::now();
        if st.acks.deadline(ack_flush).is_some_and(|d| d <= now) {
            st.flush_acks();
        }
        if st.conn.is_some() {
            let due = st.outbox.take_due(now);
            if let Some(conn) = &st.conn {
                for frame in due {
                    let _ = conn.tx.send(WriterMsg::Shared(frame));
                }
            }
        }
        // The server closes a client that sent nothing for 3 intervals: a receiver that has
        // nothing to say PINGs after one silent interval.
        let ping_interval = Duration::from_millis(u64::from(st.limits.ping_interval_ms));
        let mut keepalive_at = None;
        if let (Some(conn), false) = (&st.conn, ping_interval.is_zero()) {
            let last =
                inner.epoch + Duration::from_millis(conn.last_write_ms.load(Ordering::Relaxed));
            if now >= last + ping_interval {
                conn.write(encode(&ClientFrame::Ping {
                    nonce: KEEPALIVE_NONCE,
                }));
                keepalive_at = Some(now + ping_interval);
            } else {
                keepalive_at = Some(last + ping_interval);
            }
        }
        let idle_limit = (st.limits.ping_interval_ms > 0).then(|| {
            Duration::from_millis(u64::from(st.limits.ping_interval_ms) * u64::from(IDLE_PINGS))
        });
        if let (Some(limit), Some(_)) = (idle_limit, &st.conn) {
            if now.duration_since(st.last_frame_at) > limit {
                tracing::debug!(?limit, "iris-client connection silent, dropping it");
                if let Some(conn) = st.conn.take() {
                    conn.closer.close();
                }
                st.reconnect_at = now;
                inner.cv.notify_all();
            }
        }
        if st.conn.is_none() && opts.auto_reconnect && st.fatal.is_none() && now >= st.reconnect_at
        {
            drop(st);
            let result = match inner.connect_lock.try_lock() {
                Ok(_one) => {
                    if inner.lock().conn.is_none() {
                        Some(establish(inner).map(|_| ()))
                    } else {
                        Some(Ok(()))
                    }
                }
                Err(_) => None, // a manual reconnect is running
            };
            st = inner.lock();
            if result.is_none() {
                st.reconnect_at =
                    Instant::now() + Duration::from_millis(opts.reconnect_min_ms.max(1));
            }
            if let Some(Err(e)) = result {
                if st.closed {
                    return;
                }
                tracing::debug!(error = %e, "iris-client reconnect failed");
                match e {
                    ClientError::Refused { code, reason } if refusal_is_final(code) => {
                        st.events.push_back(Event::Error {
                            code,
                            reason: reason.clone(),
                            reference: 0,
                        });
                        st.fatal = Some((code, reason));
                        inner.cv.notify_all();
                    }
                    _ => {
                        let min = Duration::from_millis(opts.reconnect_min_ms.max(1));
                        let max = Duration::from_millis(opts.reconnect_max_ms.max(1));
                        st.backoff = (st.backoff * 2).clamp(min, max.max(min));
                        st.reconnect_at = Instant::now() + st.backoff;
                    }
                }
            }
            continue;
        }
        let mut wake = now + Duration::from_secs(1);
        if let Some(d) = st.acks.deadline(ack_flush) {
            wake = wake.min(d);
        }
        if let Some(d) = st.outbox.next_due() {
            wake = wake.min(d);
        }
        if let Some(d) = keepalive_at {
            wake = wake.min(d);
        }
        if let Some(limit) = idle_limit {
            if st.conn.is_some() {
                wake = wake.min(st.last_frame_at + limit + Duration::from_millis(1));
            }
        }
        if st.conn.is_none() && opts.auto_reconnect && st.fatal.is_none() {
            wake = wake.min(st.reconnect_at);
        }
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        st = inner
            .maint_cv
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
