//! Client frames as borrowed views of the read buffer, and encoders for every frame.
//!
//! Decoding never copies payload bytes: a [`ClientFrame`] borrows from the connection's input
//! buffer (the decoder itself lives in [`mod@super::decode`]). Encoders append to a caller-owned
//! `Vec<u8>` so a shard can batch many frames into one write: the `encode_*` functions build the
//! server → client frames of `PROTOCOL.md`. The client side of the protocol is here too, for the
//! load generator and the tests: [`ClientFrame::encode`] builds client frames and
//! [`decode_server`] reads server frames.
//!
//! Every length field is written from the length of the slice it describes. A slice longer than
//! its field can express (more than 65535 bytes behind a `u16`, or 2³²−1 behind a `u32`) is
//! truncated to that maximum, so an encoder always produces a well-formed frame; callers keep
//! fields within the protocol limits.

use super::error::ProtoError;
use super::msgid::MsgId;

/// Client → server opcodes.
pub mod op {
    pub const LOGIN: u8 = 0x01;
    pub const SEND: u8 = 0x02;
    pub const ACK: u8 = 0x03;
    pub const BATCH_SEND: u8 = 0x04;
    pub const GET_STATUS: u8 = 0x05;
    pub const SEND_SEQ: u8 = 0x07;
    pub const CBOR_MSG: u8 = 0x10;
    pub const UPLOAD_PREKEYS: u8 = 0x20;
    pub const FETCH_PREKEYS: u8 = 0x21;
    pub const E2EE_MSG: u8 = 0x23;
    pub const GROUP_CREATE: u8 = 0x30;
    pub const GROUP_ADD: u8 = 0x31;
    pub const GROUP_LEAVE: u8 = 0x32;
    pub const GROUP_MSG: u8 = 0x33;
    pub const GROUP_ROSTER: u8 = 0x35;
    pub const SENDER_KEY_DIST: u8 = 0x36;
    pub const TYPING_START: u8 = 0x70;
    pub const TYPING_STOP: u8 = 0x71;
    pub const READ_RECEIPT: u8 = 0x74;
}

/// Server → client opcodes.
pub mod sop {
    pub const LOGIN_OK: u8 = 0x03;
    pub const STATUS: u8 = 0x06;
    pub const RELIABLE_MSG: u8 = 0x10;
    pub const PREKEY_RESPONSE: u8 = 0x22;
    pub const E2EE_DELIVERY: u8 = 0x24;
    pub const TYPING_RELAY: u8 = 0x72;
    pub const READ_RECEIPT_RELAY: u8 = 0x75;
    pub const ERROR: u8 = 0xFE;
    pub const RATE_LIMITED: u8 = 0xFF;
}

/// The text the server sends after `0x03` to accept a LOGIN.
pub const LOGIN_OK_TEXT: &[u8] = b"LOGIN_OK";
/// Raw text sent (without opcode) when a login is refused by auth, before the socket closes.
pub const AUTH_FAILED: &[u8] = b"AUTH_FAILED";
/// Raw text sent (without opcode) when a login is refused by rate limiting, before the close.
pub const RATE_LIMITED_TEXT: &[u8] = b"RATE_LIMITED";

/// One client → server frame, borrowing its fields from the input buffer.
///
/// Produced by [`super::decode::decode`] only after every check of `PROTOCOL.md` passed: targets
/// are non-empty and within limits, batch blobs are exactly filled by their entries, CBOR
/// payloads are well-formed maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// 0x01: the user name (`user` or `user:token`), delimited by the read (see `decode`).
    Login { body: &'a [u8] },
    /// 0x02: a message to `target`.
    Send { target: &'a [u8], msg: &'a [u8] },
    /// 0x03: the ack of a delivered message.
    Ack { id: MsgId },
    /// 0x04: messages to `target`; iterate the validated blob with [`batch_entries`].
    BatchSend { target: &'a [u8], blob: &'a [u8] },
    /// 0x05: the presence of `target`, answered with 0x06.
    GetStatus { target: &'a [u8] },
    /// 0x07: a message with a per-sender ordering hint, delivered like 0x02.
    SendSeq {
        target: &'a [u8],
        seq: u64,
        msg: &'a [u8],
    },
    /// 0x10: a CBOR map delivered as a message.
    CborMsg { target: &'a [u8], cbor: &'a [u8] },
    /// 0x20: the sender's prekey bundle (a CBOR map).
    UploadPrekeys { bundle: &'a [u8] },
    /// 0x21: asks for `user`'s prekey bundle, answered with 0x22.
    FetchPrekeys { user: &'a [u8] },
    /// 0x23: an end-to-end encrypted message; delivered as a 0x24 frame inside a 0x10.
    E2eeMsg {
        recipient: &'a [u8],
        header: &'a [u8],
        ciphertext: &'a [u8],
    },
    /// Any well-formed group frame (0x30, 0x31, 0x32, 0x33, 0x35, 0x36). `raw` is the whole frame,
    /// opcode included, so it can be skipped, forwarded or re-encoded as is.
    Group { op: u8, raw: &'a [u8] },
    /// 0x70 (`on`) / 0x71 (`!on`): typing notification for `target`.
    Typing { target: &'a [u8], on: bool },
    /// 0x74: `id` (the message id as the client knows it) was read; relay to `sender`.
    ReadReceipt { id: &'a [u8], sender: &'a [u8] },
}

impl ClientFrame<'_> {
    /// The opcode of this frame.
    pub fn opcode(&self) -> u8 {
        match self {
            ClientFrame::Login { .. } => op::LOGIN,
            ClientFrame::Send { .. } => op::SEND,
            ClientFrame::Ack { .. } => op::ACK,
            ClientFrame::BatchSend { .. } => op::BATCH_SEND,
            ClientFrame::GetStatus { .. } => op::GET_STATUS,
            ClientFrame::SendSeq { .. } => op::SEND_SEQ,
            ClientFrame::CborMsg { .. } => op::CBOR_MSG,
            ClientFrame::UploadPrekeys { .. } => op::UPLOAD_PREKEYS,
            ClientFrame::FetchPrekeys { .. } => op::FETCH_PREKEYS,
            ClientFrame::E2eeMsg { .. } => op::E2EE_MSG,
            ClientFrame::Group { op, .. } => *op,
            ClientFrame::Typing { on: true, .. } => op::TYPING_START,
            ClientFrame::Typing { on: false, .. } => op::TYPING_STOP,
            ClientFrame::ReadReceipt { .. } => op::READ_RECEIPT,
        }
    }

    /// Appends the wire form of this frame (client side: load generator and tests).
    ///
    /// `Group` appends `raw` unchanged. A LOGIN has no length: the server delimits it by the
    /// read, so a client must wait for LOGIN_OK before sending more (or accept the rule of
    /// [`mod@super::decode`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ClientFrame::Login { body } => {
                out.push(op::LOGIN);
                out.extend_from_slice(body);
            }
            ClientFrame::Send { target, msg } => {
                out.push(op::SEND);
                put16(out, target);
                put16(out, msg);
            }
            ClientFrame::Ack { id } => {
                out.push(op::ACK);
                out.extend_from_slice(&id.encode());
            }
            ClientFrame::BatchSend { target, blob } => {
                out.push(op::BATCH_SEND);
                put16(out, target);
                put32(out, blob);
            }
            ClientFrame::GetStatus { target } => {
                out.push(op::GET_STATUS);
                put16(out, target);
            }
            ClientFrame::SendSeq { target, seq, msg } => {
                out.push(op::SEND_SEQ);
                put16(out, target);
                out.extend_from_slice(&seq.to_be_bytes());
                put16(out, msg);
            }
            ClientFrame::CborMsg { target, cbor } => {
                out.push(op::CBOR_MSG);
                put16(out, target);
                put32(out, cbor);
            }
            ClientFrame::UploadPrekeys { bundle } => {
                out.push(op::UPLOAD_PREKEYS);
                put32(out, bundle);
            }
            ClientFrame::FetchPrekeys { user } => {
                out.push(op::FETCH_PREKEYS);
                put16(out, user);
            }
            ClientFrame::E2eeMsg {
                recipient,
                header,
                ciphertext,
            } => {
                out.push(op::E2EE_MSG);
                put16(out, recipient);
                put16(out, header);
                put32(out, ciphertext);
            }
            ClientFrame::Group { raw, .. } => out.extend_from_slice(raw),
            ClientFrame::Typing { target, .. } => {
                out.push(self.opcode());
                put16(out, target);
            }
            ClientFrame::ReadReceipt { id, sender } => {
                out.push(op::READ_RECEIPT);
                put16(out, id);
                put16(out, sender);
            }
        }
    }
}

/// Iterator over the messages of a BATCH_SEND blob (repeated `u16 len | msg`).
///
/// It never panics: on a truncated entry it stops, and [`BatchEntries::remainder`] is then
/// non-empty. A blob that [`super::decode::decode`] accepted yields all its entries and leaves
/// an empty remainder.
#[derive(Debug, Clone)]
pub struct BatchEntries<'a> {
    rest: &'a [u8],
}

impl<'a> BatchEntries<'a> {
    /// The bytes not consumed yet (after the end: empty iff the blob was well-formed).
    pub fn remainder(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for BatchEntries<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, tail) = self.rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        let entry = tail.get(..len)?;
        self.rest = tail.get(len..)?;
        Some(entry)
    }
}

impl std::iter::FusedIterator for BatchEntries<'_> {}

/// The entries of a BATCH_SEND blob.
pub fn batch_entries(blob: &[u8]) -> BatchEntries<'_> {
    BatchEntries { rest: blob }
}

/// Appends one entry (`u16 len | msg`) to a BATCH_SEND blob under construction.
pub fn push_batch_entry(blob: &mut Vec<u8>, msg: &[u8]) {
    put16(blob, msg);
}

/// LOGIN_OK: `0x03` then the ASCII bytes `LOGIN_OK`.
pub fn encode_login_ok(out: &mut Vec<u8>) {
    out.push(sop::LOGIN_OK);
    out.extend_from_slice(LOGIN_OK_TEXT);
}

/// RELIABLE_MSG: `0x10 | u16 16 | id | u32 len | payload`.
pub fn encode_reliable(out: &mut Vec<u8>, id: MsgId, payload: &[u8]) {
    out.push(sop::RELIABLE_MSG);
    put16(out, &id.encode());
    put32(out, payload);
}

/// STATUS: `0x06 | u16 ulen | user | u8 online | u64 last_seen` (Unix seconds).
pub fn encode_status(out: &mut Vec<u8>, user: &[u8], online: bool, last_seen: u64) {
    out.push(sop::STATUS);
    put16(out, user);
    out.push(u8::from(online));
    out.extend_from_slice(&last_seen.to_be_bytes());
}

/// TYPING_RELAY: `0x72 | u16 slen | sender | u8 on`.
pub fn encode_typing(out: &mut Vec<u8>, sender: &[u8], on: bool) {
    out.push(sop::TYPING_RELAY);
    put16(out, sender);
    out.push(u8::from(on));
}

/// READ_RECEIPT_RELAY: `0x75 | u16 ilen | id | u16 rlen | reader | u64 unix_ms`.
pub fn encode_receipt_relay(out: &mut Vec<u8>, id: &[u8], reader: &[u8], unix_ms: u64) {
    out.push(sop::READ_RECEIPT_RELAY);
    put16(out, id);
    put16(out, reader);
    out.extend_from_slice(&unix_ms.to_be_bytes());
}

/// ERROR: `0xFE | u16 len | reason` (ASCII).
pub fn encode_error(out: &mut Vec<u8>, reason: &str) {
    out.push(sop::ERROR);
    put16(out, reason.as_bytes());
}

/// RATE_LIMITED: `0xFF | u32 retry_after_ms`.
pub fn encode_rate_limited(out: &mut Vec<u8>, retry_after_ms: u32) {
    out.push(sop::RATE_LIMITED);
    out.extend_from_slice(&retry_after_ms.to_be_bytes());
}

/// PREKEY_RESPONSE: `0x22 | u32 len | cbor` (a bundle, or [`super::cbor::NOT_FOUND_BUNDLE`]).
pub fn encode_prekey_response(out: &mut Vec<u8>, cbor: &[u8]) {
    out.push(sop::PREKEY_RESPONSE);
    put32(out, cbor);
}

/// E2EE delivery, the payload of the RELIABLE_MSG that carries an E2EE_MSG to its recipient:
/// `0x24 | u16 slen | sender | u16 hlen | header | u32 clen | ciphertext`.
pub fn encode_e2ee_delivery(out: &mut Vec<u8>, sender: &[u8], header: &[u8], ciphertext: &[u8]) {
    out.push(sop::E2EE_DELIVERY);
    put16(out, sender);
    put16(out, header);
    put32(out, ciphertext);
}

/// The fields of an E2EE delivery (the 0x24 frame inside a RELIABLE_MSG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2eeDelivery<'a> {
    pub sender: &'a [u8],
    pub header: &'a [u8],
    pub ciphertext: &'a [u8],
}

/// Reads an E2EE delivery (the payload of a RELIABLE_MSG starting with 0x24, client side). The
/// payload must be exactly one such frame.
pub fn decode_e2ee_delivery(payload: &[u8]) -> Result<E2eeDelivery<'_>, ProtoError> {
    let mut c = Cursor::new(payload);
    match c.u8() {
        Some(sop::E2EE_DELIVERY) => {}
        Some(other) => return Err(ProtoError::UnknownOpcode(other)),
        None => return Err(ProtoError::BadFrame),
    }
    let fields = (|| {
        Some(E2eeDelivery {
            sender: c.bytes16()?,
            header: c.bytes16()?,
            ciphertext: c.bytes32()?,
        })
    })();
    match fields {
        Some(d) if c.pos() == payload.len() => Ok(d),
        _ => Err(ProtoError::BadFrame),
    }
}

/// One server → client frame (client side: load generator and tests).
///
/// The raw-text login refusals ([`AUTH_FAILED`], [`RATE_LIMITED_TEXT`]) carry no opcode; a
/// client checks for them before calling [`decode_server`] on the answer to a LOGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame<'a> {
    /// `03 LOGIN_OK`.
    LoginOk,
    /// 0x10: a message to ack with `03 | id`.
    Reliable { id: &'a [u8], payload: &'a [u8] },
    /// 0x06: presence of `user`.
    Status {
        user: &'a [u8],
        online: bool,
        last_seen: u64,
    },
    /// 0x72: `sender` started (`on`) or stopped typing.
    Typing { sender: &'a [u8], on: bool },
    /// 0x75: `reader` read message `id` at `unix_ms`.
    ReceiptRelay {
        id: &'a [u8],
        reader: &'a [u8],
        unix_ms: u64,
    },
    /// 0xFE: an ASCII reason.
    Error { reason: &'a [u8] },
    /// 0xFF: slow down.
    RateLimited { retry_after_ms: u32 },
    /// 0x22: a prekey bundle (CBOR map).
    PrekeyResponse { cbor: &'a [u8] },
}

impl ServerFrame<'_> {
    /// Appends the wire form of this frame (the `encode_*` function of its kind; a `Reliable`
    /// id is written as given, whatever its length).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ServerFrame::LoginOk => encode_login_ok(out),
            ServerFrame::Reliable { id, payload } => {
                out.push(sop::RELIABLE_MSG);
                put16(out, id);
                put32(out, payload);
            }
            ServerFrame::Status {
                user,
                online,
                last_seen,
            } => encode_status(out, user, *online, *last_seen),
            ServerFrame::Typing { sender, on } => encode_typing(out, sender, *on),
            ServerFrame::ReceiptRelay {
                id,
                reader,
                unix_ms,
            } => encode_receipt_relay(out, id, reader, *unix_ms),
            ServerFrame::Error { reason } => {
                out.push(sop::ERROR);
                put16(out, reason);
            }
            ServerFrame::RateLimited { retry_after_ms } => {
                encode_rate_limited(out, *retry_after_ms)
            }
            ServerFrame::PrekeyResponse { cbor } => encode_prekey_response(out, cbor),
        }
    }
}

/// Decodes the server frame at the head of `buf`: `Ok(None)` while it is incomplete, else the
/// frame and the number of bytes it takes. Unknown opcodes are [`ProtoError::UnknownOpcode`],
/// impossible contents (a state byte other than 0 or 1, `03` not followed by `LOGIN_OK`)
/// [`ProtoError::BadFrame`]. Never panics.
pub fn decode_server(buf: &[u8]) -> Result<Option<(ServerFrame<'_>, usize)>, ProtoError> {
    let Some(&opcode) = buf.first() else {
        return Ok(None);
    };
    let mut c = Cursor::new(buf);
    c.u8();
    let frame = match opcode {
        sop::LOGIN_OK => {
            let got = buf.get(1..).unwrap_or_default();
            let n = got.len().min(LOGIN_OK_TEXT.len());
            if got.get(..n) != LOGIN_OK_TEXT.get(..n) {
                return Err(ProtoError::BadFrame);
            }
            c.bytes(LOGIN_OK_TEXT.len()).map(|_| ServerFrame::LoginOk)
        }
        sop::RELIABLE_MSG => (|| {
            Some(ServerFrame::Reliable {
                id: c.bytes16()?,
                payload: c.bytes32()?,
            })
        })(),
        sop::STATUS => match (|| Some((c.bytes16()?, c.u8()?, c.u64()?)))() {
            Some((user, state, last_seen)) => Some(ServerFrame::Status {
                user,
                online: flag(state)?,
                last_seen,
            }),
            None => None,
        },
        sop::TYPING_RELAY => match (|| Some((c.bytes16()?, c.u8()?)))() {
            Some((sender, state)) => Some(ServerFrame::Typing {
                sender,
                on: flag(state)?,
            }),
            None => None,
        },
        sop::READ_RECEIPT_RELAY => (|| {
            Some(ServerFrame::ReceiptRelay {
                id: c.bytes16()?,
                reader: c.bytes16()?,
                unix_ms: c.u64()?,
            })
        })(),
        sop::ERROR => c.bytes16().map(|reason| ServerFrame::Error { reason }),
        sop::RATE_LIMITED => c
            .u32()
            .map(|retry_after_ms| ServerFrame::RateLimited { retry_after_ms }),
        sop::PREKEY_RESPONSE => c.bytes32().map(|cbor| ServerFrame::PrekeyResponse { cbor }),
        other => return Err(ProtoError::UnknownOpcode(other)),
    };
    Ok(frame.map(|f| (f, c.pos())))
}

fn flag(state: u8) -> Result<bool, ProtoError> {
    match state {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::BadFrame),
    }
}

/// Writes `u16 len | bytes`, truncating `bytes` to 65535.
fn put16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes.get(..usize::from(len)).unwrap_or_default());
}

/// Writes `u32 len | bytes`, truncating `bytes` to 2³²−1.
fn put32(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    out.extend_from_slice(bytes.get(..n).unwrap_or(bytes));
}

/// A bounds-checked reader of big-endian fields; `None` means "not enough bytes".
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// `u16 len | bytes`.
    pub(crate) fn bytes16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// `u32 len | bytes`.
    pub(crate) fn bytes32(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.bytes(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::cbor::NOT_FOUND_BUNDLE;
    use crate::protocol::testutil::{any_frame, server_frame, LARGE};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn out(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut o = Vec::new();
        f(&mut o);
        o
    }

    #[test]
    fn server_encoders_are_byte_exact() {
        assert_eq!(out(encode_login_ok), b"\x03LOGIN_OK");
        assert_eq!(
            out(|o| encode_reliable(o, MsgId(0xab), b"hi")),
            b"\x10\x00\x1000000000000000ab\x00\x00\x00\x02hi"
        );
        assert_eq!(
            out(|o| encode_status(o, b"bob", true, 0)),
            b"\x06\x00\x03bob\x01\x00\x00\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!(
            out(|o| encode_status(o, b"bob", false, 0x0102_0304)),
            b"\x06\x00\x03bob\x00\x00\x00\x00\x00\x01\x02\x03\x04"
        );
        assert_eq!(
            out(|o| encode_typing(o, b"al", true)),
            b"\x72\x00\x02al\x01"
        );
        assert_eq!(
            out(|o| encode_typing(o, b"al", false)),
            b"\x72\x00\x02al\x00"
        );
        assert_eq!(
            out(|o| encode_receipt_relay(o, b"id", b"r", 5)),
            b"\x75\x00\x02id\x00\x01r\x00\x00\x00\x00\x00\x00\x00\x05"
        );
        assert_eq!(
            out(|o| encode_error(o, "group_service_unavailable")),
            b"\xfe\x00\x19group_service_unavailable"
        );
        assert_eq!(
            out(|o| encode_rate_limited(o, 1500)),
            b"\xff\x00\x00\x05\xdc"
        );
        let mut want = b"\x22\x00\x00\x00\x12".to_vec();
        want.extend_from_slice(NOT_FOUND_BUNDLE);
        assert_eq!(out(|o| encode_prekey_response(o, NOT_FOUND_BUNDLE)), want);
        assert_eq!(
            out(|o| encode_e2ee_delivery(o, b"al", b"\xa0", b"ct")),
            b"\x24\x00\x02al\x00\x01\xa0\x00\x00\x00\x02ct"
        );
        assert_eq!(AUTH_FAILED, b"AUTH_FAILED");
        assert_eq!(RATE_LIMITED_TEXT, b"RATE_LIMITED");
    }

    #[test]
    fn encoders_append() {
        let mut o = vec![9];
        encode_login_ok(&mut o);
        encode_rate_limited(&mut o, 1);
        assert_eq!(o, b"\x09\x03LOGIN_OK\xff\x00\x00\x00\x01");
    }

    #[test]
    fn client_encoder_is_byte_exact() {
        let e = |f: ClientFrame<'_>| out(|o| f.encode(o));
        assert_eq!(e(ClientFrame::Login { body: b"al" }), b"\x01al");
        assert_eq!(
            e(ClientFrame::Send {
                target: b"bob",
                msg: b"hi"
            }),
            b"\x02\x00\x03bob\x00\x02hi"
        );
        assert_eq!(
            e(ClientFrame::Ack { id: MsgId(1) }),
            b"\x030000000000000001"
        );
        assert_eq!(
            e(ClientFrame::SendSeq {
                target: b"b",
                seq: 2,
                msg: b""
            }),
            b"\x07\x00\x01b\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00"
        );
        assert_eq!(
            e(ClientFrame::Typing {
                target: b"b",
                on: false
            }),
            b"\x71\x00\x01b"
        );
        assert_eq!(
            e(ClientFrame::Group {
                op: op::GROUP_LEAVE,
                raw: b"\x32\x00\x01g"
            }),
            b"\x32\x00\x01g"
        );
        assert_eq!(ClientFrame::Group { op: 0x33, raw: b"" }.opcode(), 0x33);
        assert_eq!(ClientFrame::Ack { id: MsgId(0) }.opcode(), op::ACK);
    }

    #[test]
    fn oversized_fields_are_truncated_to_a_well_formed_frame() {
        let msg = vec![1u8; 70_000];
        let buf = out(|o| {
            ClientFrame::Send {
                target: b"b",
                msg: &msg,
            }
            .encode(o)
        });
        assert_eq!(buf.len(), 1 + 2 + 1 + 2 + 65535);
        assert_eq!(&buf[4..6], &[0xff, 0xff]);
    }

    #[test]
    fn batch_entries_stop_on_bad_input() {
        let mut blob = Vec::new();
        push_batch_entry(&mut blob, b"ab");
        push_batch_entry(&mut blob, b"");
        assert_eq!(blob, b"\x00\x02ab\x00\x00");
        let mut it = batch_entries(&blob);
        assert_eq!(it.next(), Some(&b"ab"[..]));
        assert_eq!(it.next(), Some(&b""[..]));
        assert_eq!(it.next(), None);
        assert_eq!(it.remainder(), b"");
        let mut it = batch_entries(b"\x00\x01a\x00\x05ab");
        assert_eq!(it.next(), Some(&b"a"[..]));
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
        assert_eq!(it.remainder(), b"\x00\x05ab");
        assert_eq!(batch_entries(b"\x00").count(), 0);
        assert_eq!(batch_entries(b"").count(), 0);
    }

    #[test]
    fn decode_server_errors() {
        assert_eq!(decode_server(b""), Ok(None));
        assert_eq!(decode_server(b"\x03"), Ok(None));
        assert_eq!(decode_server(b"\x03LOGIN"), Ok(None));
        assert_eq!(decode_server(b"\x03LOGOUT__"), Err(ProtoError::BadFrame));
        assert_eq!(decode_server(b"\x03X"), Err(ProtoError::BadFrame));
        assert_eq!(
            decode_server(b"\x03LOGIN_OKrest"),
            Ok(Some((ServerFrame::LoginOk, 9)))
        );
        assert_eq!(
            decode_server(b"\x06\x00\x01b\x02\x00\x00\x00\x00\x00\x00\x00\x00"),
            Err(ProtoError::BadFrame)
        );
        assert_eq!(
            decode_server(b"\x72\x00\x01b\x07"),
            Err(ProtoError::BadFrame)
        );
        assert_eq!(decode_server(b"\x72\x00\x01b"), Ok(None));
        assert_eq!(
            decode_server(AUTH_FAILED),
            Err(ProtoError::UnknownOpcode(b'A'))
        );
        assert_eq!(decode_server(b"\x01"), Err(ProtoError::UnknownOpcode(1)));
    }

    #[test]
    fn e2ee_delivery_reads_back() {
        let buf = out(|o| encode_e2ee_delivery(o, b"alice", b"\xa0", b"ct"));
        assert_eq!(
            decode_e2ee_delivery(&buf),
            Ok(E2eeDelivery {
                sender: b"alice",
                header: b"\xa0",
                ciphertext: b"ct"
            })
        );
        assert_eq!(
            decode_e2ee_delivery(&buf[..buf.len() - 1]),
            Err(ProtoError::BadFrame)
        );
        let mut longer = buf.clone();
        longer.push(0);
        assert_eq!(decode_e2ee_delivery(&longer), Err(ProtoError::BadFrame));
        assert_eq!(decode_e2ee_delivery(b""), Err(ProtoError::BadFrame));
        assert_eq!(
            decode_e2ee_delivery(b"\x23"),
            Err(ProtoError::UnknownOpcode(0x23))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn server_frames_round_trip(f in server_frame(), tail in vec(any::<u8>(), 0..16)) {
            let mut buf = Vec::new();
            f.as_frame().encode(&mut buf);
            let len = buf.len();
            for cut in 0..len {
                prop_assert_eq!(decode_server(&buf[..cut]), Ok(None));
            }
            prop_assert_eq!(decode_server(&buf), Ok(Some((f.as_frame(), len))));
            buf.extend_from_slice(&tail);
            prop_assert_eq!(decode_server(&buf), Ok(Some((f.as_frame(), len))));
        }

        #[test]
        fn server_frame_sequences_decode_in_order(fs in vec(server_frame(), 1..8)) {
            let mut buf = Vec::new();
            fs.iter().for_each(|f| f.as_frame().encode(&mut buf));
            let mut at = 0;
            for f in &fs {
                let (got, n) = decode_server(&buf[at..]).unwrap().unwrap();
                prop_assert_eq!(got, f.as_frame());
                at += n;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn decode_server_never_panics(buf in vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, n))) = decode_server(&buf) {
                prop_assert!(n >= 1 && n <= buf.len());
            }
            let _ = decode_e2ee_delivery(&buf);
        }

        #[test]
        fn client_encode_opcode_matches(f in any_frame(LARGE)) {
            let buf = f.encoded();
            prop_assert_eq!(buf.first().copied(), Some(f.as_frame().opcode()));
        }
    }
}
