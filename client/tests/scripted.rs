//! The client against a server played by hand over a real socket: each test accepts the
//! client's TCP connections on a `TcpListener`, reads its frames with `iris-wire`'s decoder
//! and writes server frames byte for byte with its encoder. Covers login, the outbox and its
//! resends across reconnects, the idle check, ack batching, redelivery and rate limits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use iris_client::{Client, ClientError, ClientOptions, Event, LimitedAction, MsgKind};
use iris_wire::v2::{
    decode_client, encode_server, ClientFrame, Decoded, ErrorCode, ServerFrame,
    DEFAULT_MAX_FRAME_BYTES,
};

/// The server side of one client connection.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Hide the client's keepalive PINGs (nonce `u64::MAX`) from `read`.
    skip_keepalive: bool,
}

impl Peer {
    /// The next client frame, or `None` on EOF or after `timeout`.
    fn read(&mut self, timeout: Duration) -> Option<ClientFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            match decode_client(&self.buf, DEFAULT_MAX_FRAME_BYTES)
                .expect("client sent a bad frame")
            {
                Decoded::Frame { frame, consumed } => {
                    self.buf.drain(..consumed);
                    if self.skip_keepalive && frame == (ClientFrame::Ping { nonce: u64::MAX }) {
                        continue;
                    }
                    return Some(frame);
                }
                Decoded::Unknown { ty, .. } => panic!("client sent unknown type {ty:#x}"),
                Decoded::Incomplete { .. } => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// The next frame, which must come within 5 s.
    fn expect(&mut self) -> ClientFrame {
        self.read(Duration::from_secs(5))
            .expect("no frame from the client within 5 s")
    }

    /// Frames until `quiet` passes with none.
    fn drain(&mut self, quiet: Duration) -> Vec<ClientFrame> {
        let mut out = Vec::new();
        while let Some(f) = self.read(quiet) {
            out.push(f);
        }
        out
    }

    fn write(&mut self, frame: &ServerFrame) {
        let mut out = Vec::new();
        encode_server(frame, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    /// Reads the HELLO, answers HELLO_OK, returns the HELLO's token and resume_after.
    fn login(&mut self, ping_interval_ms: u32) -> (Vec<u8>, u64) {
        let (token, resume_after) = match self.expect() {
            ClientFrame::Hello {
                token,
                resume_after,
                ..
            } => (token, resume_after),
            other => panic!("first frame not HELLO: {other:?}"),
        };
        self.write(&hello_ok(ping_interval_ms));
        (token, resume_after)
    }
}

fn hello_ok(ping_interval_ms: u32) -> ServerFrame {
    ServerFrame::HelloOk {
        version: 2,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES as u32,
        ping_interval_ms,
        send_rate_per_sec: 100,
        send_burst: 200,
        session_id: 42,
        server_time_unix_ms: 1_700_000_000_000,
    }
}

struct Script {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Script {
    fn new() -> Script {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        Script { listener, addr }
    }

    fn accept(&self) -> Peer {
        let (stream, _) = self.listener.accept().unwrap();
        Peer {
            stream,
            buf: Vec::new(),
            skip_keepalive: true,
        }
    }

    /// Connects a client (on a thread) and logs it in; returns both sides.
    fn connect(&self, opts: ClientOptions, ping_interval_ms: u32) -> (Client, Peer) {
        let addr = self.addr;
        let client = std::thread::spawn(move || Client::connect(addr, opts));
        let mut peer = self.accept();
        peer.login(ping_interval_ms);
        (client.join().unwrap().expect("login"), peer)
    }
}

fn opts(user: &str) -> ClientOptions {
    let mut o = ClientOptions::new(user);
    o.auto_reconnect = false;
    o.first_client_msg_id = Some(1000);
    o
}

fn send_of(frame: &ClientFrame) -> (u64, Vec<u8>, Vec<u8>) {
    match frame {
        ClientFrame::Send {
            client_msg_id,
            recipient,
            payload,
            ..
        } => (*client_msg_id, recipient.clone(), payload.clone()),
        other => panic!("not a SEND: {other:?}"),
    }
}

fn next_event(c: &Client) -> Event {
    c.recv(Duration::from_secs(5))
        .expect("recv")
        .expect("no event within 5 s")
}

fn deliver(id: u64) -> ServerFrame {
    ServerFrame::Deliver {
        server_id: id,
        sender: b"bob".to_vec(),
        server_time_unix_ms: 1_700_000_000_000,
        kind: MsgKind::Plain,
        payload: format!("m{id}").into_bytes(),
    }
}

fn acked_ids(frames: &[ClientFrame]) -> Vec<u64> {
    frames
        .iter()
        .flat_map(|f| match f {
            ClientFrame::Ack { ids } => ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn login_sends_token_and_exposes_hello_ok() {
    let s = Script::new();
    let addr = s.addr;
    let t = std::thread::spawn(move || {
        let mut o = opts("alice");
        o.jwt = Some("xyz".into());
        o.resume_after = 77;
        Client::connect(addr, o)
    });
    let mut peer = s.accept();
    match peer.expect() {
        ClientFrame::Hello {
            client_name,
            token,
            resume_after,
            ..
        } => {
            assert_eq!(client_name, b"iris-client");
            assert_eq!(token, b"alice:xyz");
            assert_eq!(resume_after, 77);
        }
        other => panic!("{other:?}"),
    }
    peer.write(&hello_ok(30_000));
    let c = t.join().unwrap().unwrap();
    let limits = c.server_limits();
    assert_eq!(limits.session_id, 42);
    assert_eq!(limits.send_burst, 200);
    assert_eq!(limits.max_payload_bytes(), 1024 * 1024);
    assert!(c.is_connected());
}

#[test]
fn refused_login_is_a_refused_error() {
    let s = Script::new();
    let addr = s.addr;
    let t = std::thread::spawn(move || Client::connect(addr, opts("mallory")));
    let mut peer = s.accept();
    peer.expect();
    peer.write(&ServerFrame::error(ErrorCode::BadToken, 0));
    match t.join().unwrap() {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, 1005);
            assert_eq!(reason, "bad_token");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn silent_server_is_a_hello_timeout() {
    let s = Script::new();
    let addr = s.addr;
    let t = std::thread::spawn(move || {
        let mut o = opts("alice");
        o.hello_timeout_ms = 300;
        let start = Instant::now();
        (Client::connect(addr, o), start.elapsed())
    });
    let _peer = s.accept();
    let (r, took) = t.join().unwrap();
    assert!(matches!(r, Err(ClientError::HelloTimeout(_))), "{r:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn sends_count_up_and_leave_the_outbox_on_send_ack() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 30_000);
    let a = c.send(b"bob", MsgKind::Plain, b"one").unwrap();
    let b = c.send(b"bob", MsgKind::Plain, b"two").unwrap();
    assert_eq!((a, b), (1000, 1001));
    assert_eq!(c.unacked_sends(), 2);
    assert_eq!(
        send_of(&peer.expect()),
        (1000, b"bob".to_vec(), b"one".to_vec())
    );
    assert_eq!(
        send_of(&peer.expect()),
        (1001, b"bob".to_vec(), b"two".to_vec())
    );
    peer.write(&ServerFrame::SendAck {
        client_msg_id: 1001,
        server_id: 9001,
        server_time_unix_ms: 5,
    });
    assert_eq!(
        next_event(&c),
        Event::SendAck {
            client_msg_id: 1001,
            server_id: 9001,
            server_time_unix_ms: 5
        }
    );
    assert_eq!(c.unacked_sends(), 1);
    // A second SEND_ACK for the same id (the answer to a resend) is not a second tick.
    peer.write(&ServerFrame::SendAck {
        client_msg_id: 1001,
        server_id: 9001,
        server_time_unix_ms: 5,
    });
    peer.write(&ServerFrame::SendAck {
        client_msg_id: 1000,
        server_id: 9000,
        server_time_unix_ms: 5,
    });
    match next_event(&c) {
        Event::SendAck { client_msg_id, .. } => assert_eq!(client_msg_id, 1000),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.unacked_sends(), 0);
    // Out-of-range arguments are refused before anything is written.
    assert!(matches!(
        c.send(b"", MsgKind::Plain, b"x"),
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        c.send(&[b'u'; 257], MsgKind::Plain, b"x"),
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        c.send(b"bob", MsgKind::Plain, &vec![0u8; 1024 * 1024 + 1]),
        Err(ClientError::Invalid(_))
    ));
    assert!(peer.read(Duration::from_millis(100)).is_none());
}

#[test]
fn manual_reconnect_resends_unacked_sends_with_the_same_ids() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 30_000);
    for p in [b"a", b"b", b"c"] {
        c.send(b"bob", MsgKind::Plain, p).unwrap();
    }
    let first: Vec<_> = (0..3).map(|_| send_of(&peer.expect())).collect();
    peer.write(&ServerFrame::SendAck {
        client_msg_id: 1001,
        server_id: 7,
        server_time_unix_ms: 1,
    });
    // A delivery the client acks, so the next HELLO resumes after it.
    peer.write(&deliver(500));
    assert!(matches!(
        next_event(&c),
        Event::SendAck {
            client_msg_id: 1001,
            ..
        }
    ));
    assert!(matches!(
        next_event(&c),
        Event::Deliver { server_id: 500, .. }
    ));
    assert_eq!(acked_ids(&[peer.expect()]), vec![500]);
    // The connection dies.
    drop(peer);
    match c.recv(Duration::from_secs(5)) {
        Err(ClientError::Disconnected) => {}
        other => panic!("{other:?}"),
    }
    assert!(!c.is_connected());
    // Queued while down, sent after the resends.
    let d = c.send(b"bob", MsgKind::Plain, b"d").unwrap();
    assert_eq!(d, 1003);

    let t = std::thread::spawn({
        let c = std::sync::Arc::new(c);
        move || {
            let r = c.reconnect();
            (r, c)
        }
    });
    let mut peer = s.accept();
    let (_, resume_after) = peer.login(30_000);
    let (r, c) = t.join().unwrap();
    r.unwrap();
    assert_eq!(resume_after, 500);
    let resent: Vec<_> = (0..3).map(|_| send_of(&peer.expect())).collect();
    assert_eq!(
        resent,
        vec![
            first[0].clone(),
            first[2].clone(),
            (1003, b"bob".to_vec(), b"d".to_vec())
        ]
    );
    assert_eq!(next_event(&c), Event::Reconnected);
    assert_eq!(c.unacked_sends(), 3);
    for id in [1000, 1002, 1003] {
        peer.write(&ServerFrame::SendAck {
            client_msg_id: id,
            server_id: id + 1,
            server_time_unix_ms: 1,
        });
    }
    for _ in 0..3 {
        assert!(matches!(next_event(&c), Event::SendAck { .. }));
    }
    assert_eq!(c.unacked_sends(), 0);
}

#[test]
fn auto_reconnect_after_eof_resends_and_reports_reconnected() {
    let s = Script::new();
    let mut o = opts("alice");
    o.auto_reconnect = true;
    o.reconnect_min_ms = 50;
    let (c, mut peer) = s.connect(o, 30_000);
    c.send(b"bob", MsgKind::Plain, b"x").unwrap();
    assert_eq!(send_of(&peer.expect()).0, 1000);
    let dropped = Instant::now();
    drop(peer);
    let mut peer = s.accept();
    peer.login(30_000);
    assert_eq!(
        send_of(&peer.expect()),
        (1000, b"bob".to_vec(), b"x".to_vec())
    );
    assert!(dropped.elapsed() < Duration::from_secs(2));
    assert_eq!(next_event(&c), Event::Reconnected);
    assert!(c.is_connected());
}

#[test]
fn auto_reconnect_backs_off_while_the_server_refuses_and_stops_on_bad_token() {
    let s = Script::new();
    let mut o = opts("alice");
    o.auto_reconnect = true;
    o.reconnect_min_ms = 20;
    let (c, peer) = s.connect(o, 30_000);
    drop(peer);
    // Two attempts answered with a retryable error, then a final refusal.
    for code in [
        ErrorCode::ShuttingDown,
        ErrorCode::ShuttingDown,
        ErrorCode::BadToken,
    ] {
        let mut p = s.accept();
        assert!(matches!(p.expect(), ClientFrame::Hello { .. }));
        p.write(&ServerFrame::error(code, 0));
    }
    match next_event(&c) {
        Event::Error { code, .. } => assert_eq!(code, 1005),
        other => panic!("{other:?}"),
    }
    match c.recv(Duration::from_secs(1)) {
        Err(ClientError::Refused { code: 1005, .. }) => {}
        other => panic!("{other:?}"),
    }
    // No further attempt.
    s.listener.set_nonblocking(true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.listener.accept().is_err(), "reconnected after bad_token");
}

#[test]
fn silent_connection_is_dropped_after_three_ping_intervals() {
    let s = Script::new();
    let mut o = opts("alice");
    o.auto_reconnect = true;
    o.reconnect_min_ms = 10;
    let (c, mut peer) = s.connect(o, 100);
    let start = Instant::now();
    // The server stays silent; the client gives up on it and logs in again.
    let mut peer2 = s.accept();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        peer.read(Duration::from_secs(1)).is_none(),
        "old connection not closed"
    );
    peer2.login(30_000);
    assert_eq!(next_event(&c), Event::Reconnected);
}

#[test]
fn server_ping_is_answered_and_keeps_the_connection() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 200);
    for nonce in 1..=6u64 {
        std::thread::sleep(Duration::from_millis(150));
        peer.write(&ServerFrame::Ping { nonce });
        assert_eq!(peer.expect(), ClientFrame::Pong { nonce });
    }
    // 900 ms > 3 intervals, but frames kept coming.
    assert!(c.is_connected());
    let nonce = c.ping().unwrap();
    assert_eq!(peer.expect(), ClientFrame::Ping { nonce });
    peer.write(&ServerFrame::Pong { nonce });
    assert_eq!(next_event(&c), Event::Pong { nonce });
}

#[test]
fn deliveries_are_acked_in_batches_once_received() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 30_000);
    for id in 1..=300u64 {
        peer.write(&deliver(id));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        peer.read(Duration::from_millis(50)).is_none(),
        "acked before the app took the messages"
    );
    for id in 1..=300u64 {
        match next_event(&c) {
            Event::Deliver {
                server_id,
                payload,
                sender,
                ..
            } => {
                assert_eq!(server_id, id);
                assert_eq!(sender, b"bob");
                assert_eq!(payload, format!("m{id}").into_bytes());
            }
            other => panic!("{other:?}"),
        }
    }
    let frames = peer.drain(Duration::from_millis(300));
    assert_eq!(acked_ids(&frames), (1..=300).collect::<Vec<u64>>());
    // 256 at once, the other 44 after ack_flush_ms.
    assert_eq!(frames.len(), 2, "{frames:?}");
}

#[test]
fn a_redelivery_is_not_returned_twice_but_acked_again() {
    let s = Script::new();
    let mut o = opts("alice");
    o.auto_reconnect = true;
    o.reconnect_min_ms = 10;
    let (c, mut peer) = s.connect(o, 30_000);
    peer.write(&deliver(10));
    assert!(matches!(
        next_event(&c),
        Event::Deliver { server_id: 10, .. }
    ));
    assert_eq!(acked_ids(&[peer.expect()]), vec![10]);
    // The ack is lost with the connection: the server redelivers 10 after the login.
    drop(peer);
    let mut peer = s.accept();
    peer.login(30_000);
    assert_eq!(next_event(&c), Event::Reconnected);
    peer.write(&deliver(10));
    peer.write(&deliver(11));
    peer.write(&deliver(11));
    assert!(matches!(
        next_event(&c),
        Event::Deliver { server_id: 11, .. }
    ));
    assert_eq!(c.recv(Duration::from_millis(200)).unwrap(), None);
    let mut acked = acked_ids(&peer.drain(Duration::from_millis(200)));
    acked.sort_unstable();
    // The second 11 is acked again too if it arrived after the app took the first.
    acked.dedup();
    assert_eq!(acked, vec![10, 11]);
}

#[test]
fn manual_ack_sends_nothing_until_ack() {
    let s = Script::new();
    let mut o = opts("alice");
    o.manual_ack = true;
    let (c, mut peer) = s.connect(o, 30_000);
    peer.write(&deliver(1));
    peer.write(&deliver(2));
    next_event(&c);
    next_event(&c);
    assert!(peer.read(Duration::from_millis(200)).is_none());
    c.ack(&[2, 1]).unwrap();
    assert_eq!(peer.expect(), ClientFrame::Ack { ids: vec![2, 1] });
}

#[test]
fn full_outbox_fails_after_the_wait_and_frees_on_send_ack() {
    let s = Script::new();
    let mut o = opts("alice");
    o.max_unacked = 2;
    o.outbox_wait_ms = 200;
    let (c, mut peer) = s.connect(o, 30_000);
    c.send(b"bob", MsgKind::Plain, b"1").unwrap();
    c.send(b"bob", MsgKind::Plain, b"2").unwrap();
    let start = Instant::now();
    match c.send(b"bob", MsgKind::Plain, b"3") {
        Err(ClientError::OutboxFull { max_unacked: 2 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(190));
    peer.expect();
    peer.expect();
    // A SEND_ACK while a sender waits lets it through.
    let c = std::sync::Arc::new(c);
    let t = std::thread::spawn({
        let c = c.clone();
        move || c.send(b"bob", MsgKind::Plain, b"3")
    });
    std::thread::sleep(Duration::from_millis(50));
    peer.write(&ServerFrame::SendAck {
        client_msg_id: 1000,
        server_id: 1,
        server_time_unix_ms: 1,
    });
    assert_eq!(t.join().unwrap().unwrap(), 1002);
    assert_eq!(send_of(&peer.expect()).0, 1002);
}

#[test]
fn rate_limited_send_is_sent_again_after_retry_after() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 30_000);
    let id = c.send(b"bob", MsgKind::Plain, b"x").unwrap();
    peer.expect();
    let limited = Instant::now();
    peer.write(&ServerFrame::RateLimited {
        what: LimitedAction::Send,
        retry_after_ms: 150,
        reference: id,
    });
    assert!(matches!(next_event(&c), Event::RateLimited { reference, .. } if reference == id));
    assert_eq!(send_of(&peer.expect()).0, id);
    assert!(
        limited.elapsed() >= Duration::from_millis(140),
        "{:?}",
        limited.elapsed()
    );
    assert_eq!(c.unacked_sends(), 1);
}

#[test]
fn refused_send_leaves_the_outbox_and_store_unavailable_is_retried() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 30_000);
    let a = c.send(b"bob", MsgKind::Cbor, b"not cbor").unwrap();
    let b = c.send(b"bob", MsgKind::Plain, b"later").unwrap();
    peer.expect();
    peer.expect();
    peer.write(&ServerFrame::error(ErrorCode::BadPayload, a));
    peer.write(&ServerFrame::error(ErrorCode::StoreUnavailable, b));
    assert!(matches!(next_event(&c), Event::Error { code: 1013, reference, .. } if reference == a));
    assert!(matches!(next_event(&c), Event::Error { code: 2000, reference, .. } if reference == b));
    assert_eq!(c.unacked_sends(), 1);
    assert_eq!(
        send_of(&peer.read(Duration::from_secs(3)).expect("retry")).0,
        b
    );
}

#[test]
fn close_flushes_pending_acks() {
    let s = Script::new();
    let mut o = opts("alice");
    o.ack_flush_ms = 60_000;
    let (c, mut peer) = s.connect(o, 30_000);
    peer.write(&deliver(5));
    next_event(&c);
    c.close();
    assert_eq!(acked_ids(&peer.drain(Duration::from_millis(500))), vec![5]);
    assert!(matches!(c.recv(Duration::ZERO), Err(ClientError::Closed)));
    assert!(matches!(
        c.send(b"bob", MsgKind::Plain, b"x"),
        Err(ClientError::Closed)
    ));
}

#[test]
fn a_client_with_nothing_to_say_pings_once_per_interval() {
    let s = Script::new();
    let (c, mut peer) = s.connect(opts("alice"), 200);
    peer.skip_keepalive = false;
    // The server keeps talking (so it never PINGs); the client answers nothing else.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1000) {
        peer.write(&ServerFrame::Typing {
            sender: b"bob".to_vec(),
            typing: true,
        });
        if let Some(f) = peer.read(Duration::from_millis(50)) {
            assert_eq!(f, ClientFrame::Ping { nonce: u64::MAX });
            peer.write(&ServerFrame::Pong { nonce: u64::MAX });
            pings += 1;
        }
    }
    // One per 200 ms interval of silence: 4 or 5 in a second, never none.
    assert!((3..=6).contains(&pings), "{pings} keepalive pings");
    // Their PONGs are not events.
    let mut events = 0;
    while let Some(e) = c.recv(Duration::from_millis(50)).unwrap() {
        assert!(matches!(e, Event::Typing { .. }), "{e:?}");
        events += 1;
    }
    assert!(events > 5);
}

#[test]
fn iris_chat_sends_lines_prints_ticks_and_marks_messages_read() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let s = Script::new();
    let mut chat = Command::new(env!("CARGO_BIN_EXE_iris-chat"))
        .args(["--server", &s.addr.to_string(), "--user", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peer = s.accept();
    let (token, _) = peer.login(30_000);
    assert_eq!(token, b"alice");
    let mut stdin = chat.stdin.take().unwrap();
    stdin.write_all(b"/to bob\nhello bob\n").unwrap();
    let (id, to, text) = send_of(&peer.expect());
    assert_eq!(
        (to.as_slice(), text.as_slice()),
        (&b"bob"[..], &b"hello bob"[..])
    );
    peer.write(&ServerFrame::SendAck {
        client_msg_id: id,
        server_id: 777,
        server_time_unix_ms: 1,
    });
    peer.write(&ServerFrame::Deliver {
        server_id: 888,
        sender: b"bob".to_vec(),
        server_time_unix_ms: 3_723_000, // 01:02:03 UTC
        kind: MsgKind::Plain,
        payload: b"hi alice".to_vec(),
    });
    // The message is shown, so it is read: a RECEIPT to bob, and the ACK.
    let mut frames = [peer.expect(), peer.expect()];
    frames.sort_by_key(|f| f.ty());
    assert_eq!(frames[0], ClientFrame::Ack { ids: vec![888] });
    assert_eq!(
        frames[1],
        ClientFrame::Receipt {
            kind: iris_client::ReceiptKind::Read,
            sender: b"bob".to_vec(),
            ids: vec![888]
        }
    );
    peer.write(&ServerFrame::Receipt {
        kind: iris_client::ReceiptKind::Read,
        reader: b"bob".to_vec(),
        unix_ms: 5,
        ids: vec![777],
    });
    std::thread::sleep(Duration::from_millis(200));
    stdin.write_all(b"/quit\n").unwrap();
    let status = chat.wait().unwrap();
    let out: Vec<String> = std::io::BufReader::new(chat.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(status.success(), "{status:?} {out:?}");
    assert!(out.contains(&"  ✓ hello bob".to_owned()), "{out:?}");
    assert!(
        out.contains(&"[01:02:03] bob: hi alice".to_owned()),
        "{out:?}"
    );
    assert!(
        out.contains(&"  ✓✓ hello bob (read by bob)".to_owned()),
        "{out:?}"
    );
}
