//! A protocol v2 client on a raw socket for the tests: it writes the bytes `iris-wire` encodes
//! and decodes every frame the server sends with `iris-wire`, so a test sees the wire exactly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use iris_wire::v2::{decode_server, encode_client, ClientFrame, Decoded, MsgKind, ServerFrame};

use crate::Server;

/// A v2 connection on a raw socket.
pub struct V2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl V2 {
    pub fn connect(addr: SocketAddr) -> V2 {
        let stream = TcpStream::connect(addr).expect("connect v2");
        stream.set_nodelay(true).unwrap();
        V2 {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and says HELLO as `user`; returns the connection and its HELLO_OK.
    pub fn hello(server: &Server, user: &str) -> (V2, ServerFrame) {
        V2::hello_resume(server, user, 0)
    }

    /// [`V2::hello`] with HELLO's `resume_after`.
    pub fn hello_resume(server: &Server, user: &str, resume_after: u64) -> (V2, ServerFrame) {
        let mut c = V2::connect(server.v2.expect("server serves v2"));
        c.write(&ClientFrame::Hello {
            client_name: b"v2-test".to_vec(),
            client_version: b"1".to_vec(),
            token: user.as_bytes().to_vec(),
            resume_after,
        });
        let ok = c.recv();
        assert!(matches!(ok, ServerFrame::HelloOk { .. }), "{ok:?}");
        (c, ok)
    }

    pub fn write(&mut self, f: &ClientFrame) {
        let mut b = Vec::new();
        encode_client(f, &mut b);
        self.stream.write_all(&b).expect("write");
    }

    pub fn write_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).expect("write");
    }

    pub fn send(&mut self, client_msg_id: u64, to: &str, payload: &[u8]) {
        self.send_kind(client_msg_id, to, MsgKind::Plain, payload);
    }

    /// A SEND of `kind`.
    pub fn send_kind(&mut self, client_msg_id: u64, to: &str, kind: MsgKind, payload: &[u8]) {
        self.write(&ClientFrame::Send {
            client_msg_id,
            recipient: to.as_bytes().to_vec(),
            kind,
            payload: payload.to_vec(),
        });
    }

    /// The next frame within `d`, or `None`; panics on a closed socket.
    pub fn recv_within(&mut self, d: Duration) -> Option<ServerFrame> {
        let deadline = Instant::now() + d;
        loop {
            match decode_server(&self.buf, 1 << 24).expect("server frame decodes") {
                Decoded::Frame { frame, consumed } => {
                    self.buf.drain(..consumed);
                    return Some(frame);
                }
                Decoded::Unknown { ty, .. } => panic!("unknown server frame type {ty:#x}"),
                Decoded::Incomplete { .. } => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("server closed the connection; buffered {:?}", self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    pub fn recv(&mut self) -> ServerFrame {
        self.recv_within(Duration::from_secs(10))
            .expect("a frame within 10 s")
    }

    /// Frames until the server closes (at most `d`).
    pub fn until_closed(&mut self, d: Duration) -> Vec<ServerFrame> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        loop {
            while let Ok(Decoded::Frame { frame, consumed }) = decode_server(&self.buf, 1 << 24) {
                self.buf.drain(..consumed);
                out.push(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "not closed; frames {out:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return out,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next DELIVER, skipping nothing else: any other frame fails the test.
    pub fn deliver(&mut self) -> (u64, Vec<u8>, MsgKind, Vec<u8>) {
        match self.recv() {
            ServerFrame::Deliver {
                server_id,
                sender,
                kind,
                payload,
                ..
            } => (server_id, sender, kind, payload),
            other => panic!("expected DELIVER, got {other:?}"),
        }
    }

    pub fn send_ack(&mut self) -> (u64, u64) {
        match self.recv() {
            ServerFrame::SendAck {
                client_msg_id,
                server_id,
                ..
            } => (client_msg_id, server_id),
            other => panic!("expected SEND_ACK, got {other:?}"),
        }
    }
}
