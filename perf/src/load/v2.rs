//! Protocol v2 framing for the load generator (`docs/PROTOCOL-v2.md`), without an allocation per
//! message.
//!
//! `iris_wire::v2` is the reference codec, but its frames own their fields (`Vec<u8>`), which
//! would cost the generator two allocations per message. The hot frames have their own helpers
//! here, tested byte for byte against `iris_wire`:
//!
//! - [`push_send`] appends a SEND (kind 0) from borrowed recipient and payload;
//! - [`push_acks`] appends ACK frames holding a list of server ids (1024 per frame at most);
//! - [`push_pong`] appends a PONG;
//! - [`next_frame`] reads the frame at the head of a buffer: DELIVER and SEND_ACK are read in
//!   place ([`In::Deliver`] borrows its payload), every other type goes through
//!   `iris_wire::v2::decode_server` ([`In::Other`]).
//!
//! HELLO is written with `iris_wire::v2::encode_client` (once per login).

use iris_wire::v2::{
    decode_server, ty, ClientFrame, Decoded, ServerFrame, WireError, DEFAULT_MAX_FRAME_BYTES,
    LEN_BYTES, MAX_ACK_IDS, MAX_USER_BYTES,
};

/// Name this client gives in HELLO.
pub const CLIENT_NAME: &[u8] = b"iris-load";

/// Largest frame accepted from the server: the default `max_frame_bytes`.
pub const MAX_FRAME: usize = DEFAULT_MAX_FRAME_BYTES;

/// Bytes of a SEND frame with this recipient and payload length.
pub fn send_len(recipient: usize, payload: usize) -> usize {
    LEN_BYTES + 1 + 8 + 2 + recipient + 1 + 4 + payload
}

/// Appends `SEND client_msg_id recipient kind=0 payload`. `recipient` must be 1 to 256 bytes
/// (the caller's user names are).
pub fn push_send(out: &mut Vec<u8>, client_msg_id: u64, recipient: &[u8], payload: &[u8]) {
    debug_assert!(!recipient.is_empty() && recipient.len() <= MAX_USER_BYTES);
    let len = send_len(recipient.len(), payload.len()) - LEN_BYTES;
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(ty::SEND);
    out.extend_from_slice(&client_msg_id.to_be_bytes());
    out.extend_from_slice(&(recipient.len() as u16).to_be_bytes());
    out.extend_from_slice(recipient);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends ACK frames for `ids`, at most [`MAX_ACK_IDS`] per frame (nothing for no ids).
pub fn push_acks(out: &mut Vec<u8>, ids: &[u64]) {
    for chunk in ids.chunks(MAX_ACK_IDS) {
        let len = 1 + 2 + 8 * chunk.len();
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(ty::ACK);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        for id in chunk {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
}

/// Appends `PONG nonce`.
pub fn push_pong(out: &mut Vec<u8>, nonce: u64) {
    out.extend_from_slice(&9u32.to_be_bytes());
    out.push(ty::PONG);
    out.extend_from_slice(&nonce.to_be_bytes());
}

/// Appends `HELLO version=2 iris-load <version> token resume_after=0`.
pub fn push_hello(out: &mut Vec<u8>, token: &[u8]) {
    iris_wire::v2::encode_client(
        &ClientFrame::Hello {
            client_name: CLIENT_NAME.to_vec(),
            client_version: env!("CARGO_PKG_VERSION").as_bytes().to_vec(),
            token: token.to_vec(),
            resume_after: 0,
        },
        out,
    );
}

/// A server frame read by [`next_frame`].
#[derive(Debug, PartialEq, Eq)]
pub enum In<'a> {
    /// DELIVER, read in place.
    Deliver {
        server_id: u64,
        kind: u8,
        payload: &'a [u8],
    },
    /// SEND_ACK.
    SendAck { client_msg_id: u64, server_id: u64 },
    /// Any other known frame, decoded by `iris_wire`.
    Other(ServerFrame),
    /// A type byte `iris_wire` does not know (skipped).
    Unknown(u8),
}

/// Reads the frame at the head of `buf`: `Ok(None)` if it is not all there yet, else the frame
/// and the bytes it takes. A DELIVER or SEND_ACK whose fields do not fill its frame exactly
/// goes through `iris_wire`, which says why it is refused.
pub fn next_frame(buf: &[u8]) -> Result<Option<(In<'_>, usize)>, WireError> {
    if let (Some(&[a, b, c, d]), Some(&t)) = (buf.get(..LEN_BYTES), buf.get(LEN_BYTES)) {
        let total = u32::from_be_bytes([a, b, c, d]) as usize + LEN_BYTES;
        if let Some(frame) = buf.get(LEN_BYTES + 1..total) {
            if let Some(f) = fast(t, frame) {
                return Ok(Some((f, total)));
            }
        }
    }
    match decode_server(buf, MAX_FRAME)? {
        Decoded::Incomplete { .. } => Ok(None),
        Decoded::Frame { frame, consumed } => Ok(Some((In::Other(frame), consumed))),
        Decoded::Unknown { ty, consumed } => Ok(Some((In::Unknown(ty), consumed))),
    }
}

/// DELIVER and SEND_ACK bodies read in place, if well formed.
fn fast(t: u8, body: &[u8]) -> Option<In<'_>> {
    let u64_at = |i: usize| -> Option<u64> {
        Some(u64::from_be_bytes(body.get(i..i + 8)?.try_into().ok()?))
    };
    match t {
        ty::SEND_ACK if body.len() == 24 => Some(In::SendAck {
            client_msg_id: u64_at(0)?,
            server_id: u64_at(8)?,
        }),
        ty::DELIVER => {
            // u64 id | u16 slen | sender | u64 time | u8 kind | u32 plen | payload
            let server_id = u64_at(0)?;
            let slen = usize::from(u16::from_be_bytes(body.get(8..10)?.try_into().ok()?));
            if slen == 0 || slen > MAX_USER_BYTES {
                return None;
            }
            let k = 10 + slen + 8;
            let kind = *body.get(k)?;
            if kind > 2 {
                return None;
            }
            let plen = u32::from_be_bytes(body.get(k + 1..k + 5)?.try_into().ok()?) as usize;
            let payload = body.get(k + 5..)?;
            (payload.len() == plen && plen <= MAX_FRAME - iris_wire::v2::FRAME_OVERHEAD_BYTES)
                .then_some(In::Deliver {
                    server_id,
                    kind,
                    payload,
                })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_wire::v2::{encode_client, encode_server, MsgKind};

    #[test]
    fn send_matches_iris_wire() {
        let mut ours = Vec::new();
        push_send(&mut ours, 7, b"bob", b"hi there");
        let mut theirs = Vec::new();
        encode_client(
            &ClientFrame::Send {
                client_msg_id: 7,
                recipient: b"bob".to_vec(),
                kind: MsgKind::Plain,
                payload: b"hi there".to_vec(),
            },
            &mut theirs,
        );
        assert_eq!(ours, theirs);
        assert_eq!(ours.len(), send_len(3, 8));
        // The example of PROTOCOL-v2.md ("c-send").
        let mut ex = Vec::new();
        push_send(&mut ex, 1, b"bob", b"hi");
        assert_eq!(
            ex,
            [
                0, 0, 0, 0x15, 0x02, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, b'b', b'o', b'b', 0, 0, 0, 0, 2,
                b'h', b'i'
            ]
        );
    }

    #[test]
    fn acks_are_chunked_by_1024_and_match_iris_wire() {
        let ids: Vec<u64> = (1..=2500u64).map(|i| i << 20 | 3).collect();
        let mut ours = Vec::new();
        push_acks(&mut ours, &ids);
        let mut theirs = Vec::new();
        for chunk in ids.chunks(1024) {
            encode_client(
                &ClientFrame::Ack {
                    ids: chunk.to_vec(),
                },
                &mut theirs,
            );
        }
        assert_eq!(ours, theirs);
        // Three frames: 1024 + 1024 + 452 ids.
        assert_eq!(ours.len(), 3 * 7 + 8 * 2500);
        let mut none = Vec::new();
        push_acks(&mut none, &[]);
        assert!(none.is_empty());
        // Every frame decodes as the server would read it.
        let mut at = 0;
        let mut n = 0;
        while at < ours.len() {
            match iris_wire::v2::decode_client(&ours[at..], MAX_FRAME).unwrap() {
                Decoded::Frame {
                    frame: ClientFrame::Ack { ids: got },
                    consumed,
                } => {
                    assert_eq!(got, ids[n..n + got.len()]);
                    n += got.len();
                    at += consumed;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(n, ids.len());
    }

    #[test]
    fn pong_and_hello_match_iris_wire() {
        let mut ours = Vec::new();
        push_pong(&mut ours, 9);
        let mut theirs = Vec::new();
        encode_client(&ClientFrame::Pong { nonce: 9 }, &mut theirs);
        assert_eq!(ours, theirs);
        let mut hello = Vec::new();
        push_hello(&mut hello, b"alice");
        match iris_wire::v2::decode_client(&hello, 4096).unwrap() {
            Decoded::Frame {
                frame:
                    ClientFrame::Hello {
                        token,
                        resume_after,
                        client_name,
                        ..
                    },
                consumed,
            } => {
                assert_eq!((token.as_slice(), resume_after), (&b"alice"[..], 0));
                assert_eq!(client_name, CLIENT_NAME);
                assert_eq!(consumed, hello.len());
            }
            other => panic!("{other:?}"),
        }
    }

    fn server(f: &ServerFrame) -> Vec<u8> {
        let mut b = Vec::new();
        encode_server(f, &mut b);
        b
    }

    #[test]
    fn reads_deliver_and_send_ack_in_place_split_anywhere() {
        let deliver = ServerFrame::Deliver {
            server_id: 0x0730_aa7a_d000_0001,
            sender: b"alice".to_vec(),
            server_time_unix_ms: 1_735_689_600_000,
            kind: MsgKind::Plain,
            payload: b"hello world".to_vec(),
        };
        let ack = ServerFrame::SendAck {
            client_msg_id: 42,
            server_id: 99,
            server_time_unix_ms: 5,
        };
        let ping = ServerFrame::Ping { nonce: 3 };
        let mut all = server(&deliver);
        all.extend(server(&ack));
        all.extend(server(&ping));
        all.extend([0, 0, 0, 2, 0xC0, 1]); // an unknown type, skipped
        for cut in 0..all.len() {
            // Every strict prefix of the first frame is incomplete.
            if cut < server(&deliver).len() {
                assert_eq!(next_frame(&all[..cut]).unwrap(), None, "cut {cut}");
            }
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((f, n)) = next_frame(&all[at..]).unwrap() {
            got.push(format!("{f:?}"));
            at += n;
        }
        assert_eq!(at, all.len());
        assert_eq!(
            got,
            [
                format!(
                    "{:?}",
                    In::Deliver {
                        server_id: 0x0730_aa7a_d000_0001,
                        kind: 0,
                        payload: b"hello world"
                    }
                ),
                format!(
                    "{:?}",
                    In::SendAck {
                        client_msg_id: 42,
                        server_id: 99
                    }
                ),
                format!("{:?}", In::Other(ping)),
                format!("{:?}", In::Unknown(0xC0)),
            ]
        );
    }

    #[test]
    fn bad_frames_are_refused_by_iris_wire() {
        // A DELIVER whose payload length runs past the frame.
        let mut b = server(&ServerFrame::Deliver {
            server_id: 1,
            sender: b"a".to_vec(),
            server_time_unix_ms: 0,
            kind: MsgKind::Plain,
            payload: b"xy".to_vec(),
        });
        let n = b.len();
        b[n - 3] = 9; // plen 2 -> 9
        assert!(next_frame(&b).is_err());
        // A SEND_ACK one byte short.
        let mut s = server(&ServerFrame::SendAck {
            client_msg_id: 1,
            server_id: 2,
            server_time_unix_ms: 3,
        });
        s.pop();
        s[3] -= 1;
        assert!(next_frame(&s).is_err());
        // An empty frame.
        assert!(next_frame(&[0, 0, 0, 0, 0]).is_err());
        // Errors and refusals decode through iris_wire.
        let e = server(&ServerFrame::error(iris_wire::v2::ErrorCode::BadToken, 0));
        match next_frame(&e).unwrap() {
            Some((In::Other(ServerFrame::Error { code, .. }), n)) => {
                assert_eq!((code, n), (1005, e.len()))
            }
            other => panic!("{other:?}"),
        }
    }
}
