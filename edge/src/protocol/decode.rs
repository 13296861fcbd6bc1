//! The incremental decoder of client frames.
//!
//! [`decode`] is stateless: the server calls it with every byte received and not consumed yet,
//! and gets either a frame and the number of bytes it takes, [`Decoded::Incomplete`] (a state,
//! not an error: read more and call again), or a [`ProtoError`] to answer with `0xFE`.
//!
//! # Completeness before parsing, rejection as early as possible
//!
//! Every frame except LOGIN is self-delimiting: an opcode, then fields that are each a `u16` or
//! `u32` length and that many bytes, or fixed-size (the 16-byte id of an ACK, the `u64` of
//! SEND_SEQ). The decoder walks the fields left to right. A length is checked against its limit
//! ([`Limits`]) as soon as its own bytes have arrived, so an oversized frame is refused before
//! its megabytes are buffered; the contents of a field (CBOR well-formedness, batch entries) are
//! checked as soon as that field is complete, and the digits of an ACK id as they arrive. Whatever
//! the field, a frame is returned only when all of its bytes are present. Because every check
//! depends only on bytes before the point where it runs, a frame split over any number of reads
//! decodes exactly as if it came whole, errors included. [`frame_len_hint`] gives the total size
//! once all length fields are known, so the server can bound its input buffer.
//!
//! # LOGIN
//!
//! LOGIN (`0x01`) has no length: in v1 its body is "all bytes of this read". The server calls
//! [`decode`] on a LOGIN only once the read that carried it has settled, with `buf` = every byte
//! received and not yet consumed. The body is then `buf[1..k]`, where `k` is the **smallest**
//! index in `2..=buf.len()` such that `buf[k..]` is a non-empty sequence of complete, valid,
//! non-LOGIN frames ending exactly at `buf.len()`; if there is no such `k`, `k = buf.len()` and
//! the body is the whole rest. `buf == [0x01]` is incomplete. Only `k <= max_login_bytes + 1` are
//! tried (a longer body is [`ProtoError::LoginTooLong`] anyway), and a position already known not
//! to start such a sequence is not walked again, so each byte position starts at most one frame
//! parse whatever the input.
//!
//! So a client that sends LOGIN and a frame back to back without waiting for LOGIN_OK does not
//! lose the frame, and a user name never loses bytes to a frame: with the default limits,
//! printable text (`user`, `user:token`) never starts a complete valid frame. The opcodes that are
//! printable characters (`' '`, `'!'`, `'#'`, `'0'`..=`'6'`, `'p'`, `'q'`, `'t'`) are all followed
//! by a length field, and two printable bytes, or a printable byte followed by the opcode
//! (≥ `0x02`) of the next frame, make a `u16` length of at least 512 (over `max_target_bytes`);
//! four such bytes make a `u32` length over the 8 KiB prekey limit. A LOGIN followed by an
//! incomplete or invalid frame, or by a second LOGIN, takes the whole read as its body.

use std::collections::HashSet;

use super::cbor;
use super::error::ProtoError;
use super::frame::{batch_entries, op, ClientFrame};
use super::msgid::{hex_value, MsgId, MSG_ID_LEN};

/// Size limits of client frames (all in bytes except `max_batch_entries`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// LOGIN body (`user` or `user:token`). Default 256.
    pub max_login_bytes: usize,
    /// Targets, users, group ids and names, read-receipt ids. Default 256.
    pub max_target_bytes: usize,
    /// BATCH_SEND blob. Default 1 MiB.
    pub max_batch_bytes: usize,
    /// Entries of a BATCH_SEND blob. Default 1000.
    pub max_batch_entries: usize,
    /// CBOR_MSG payload. Default 256 KiB.
    pub max_cbor_bytes: usize,
    /// UPLOAD_PREKEYS bundle. Default 8 KiB.
    pub max_prekeys_bytes: usize,
    /// E2EE_MSG and GROUP_MSG header. Default 1 KiB.
    pub max_e2ee_header_bytes: usize,
    /// E2EE_MSG and GROUP_MSG ciphertext, SENDER_KEY_DIST key. Default 64 KiB.
    pub max_e2ee_ciphertext_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_login_bytes: 256,
            max_target_bytes: 256,
            max_batch_bytes: 1024 * 1024,
            max_batch_entries: 1000,
            max_cbor_bytes: 256 * 1024,
            max_prekeys_bytes: 8 * 1024,
            max_e2ee_header_bytes: 1024,
            max_e2ee_ciphertext_bytes: 64 * 1024,
        }
    }
}

/// The result of [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete frame and the number of bytes it takes at the head of the buffer.
    Frame(ClientFrame<'a>, usize),
    /// More bytes are needed.
    Incomplete,
}

/// The largest legal client frame under `limits`: a BATCH_SEND of `max_batch_bytes` to a
/// target of `max_target_bytes` (`op | u16 tlen | target | u32 blen | blob`). Every other frame
/// (LOGIN, CBOR_MSG, E2EE_MSG, GROUP_MSG, ...) is smaller at the default limits;
/// `max_input_bytes` may not be below this.
pub fn largest_frame(limits: &Limits) -> usize {
    let batch = 1 + 2 + limits.max_target_bytes + 4 + limits.max_batch_bytes;
    let cbor = 1 + 2 + limits.max_target_bytes + 4 + limits.max_cbor_bytes;
    let e2ee = 1
        + 2
        + limits.max_target_bytes
        + 2
        + limits.max_e2ee_header_bytes
        + 4
        + limits.max_e2ee_ciphertext_bytes;
    batch.max(cbor).max(e2ee).max(1 + limits.max_login_bytes)
}

/// Decodes the client frame at the head of `buf` (see the module documentation).
///
/// Never panics, whatever `buf` holds; a consumed count is always between 1 and `buf.len()`.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, ProtoError> {
    match buf.first() {
        None => Ok(Decoded::Incomplete),
        Some(&op::LOGIN) => decode_login(buf, limits),
        Some(_) => match decode_framed(buf, limits) {
            Ok((frame, n)) => Ok(Decoded::Frame(frame, n)),
            Err(Stop::Incomplete) => Ok(Decoded::Incomplete),
            Err(Stop::Bad(e)) => Err(e),
        },
    }
}

/// The total size of the frame at the head of `buf` once all its length fields have arrived;
/// `None` before that, for a LOGIN (delimited by the read, at most `max_login_bytes + 1`) and for
/// an unknown opcode. It does not validate: call it after [`decode`] said `Incomplete`, which
/// guarantees the lengths are within [`Limits`].
pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
    let fields = layout(*buf.first()?)?;
    let mut pos = 1usize;
    for field in fields {
        let n = match field.len {
            Len::Fixed(n) => n,
            Len::U16 => {
                let b = buf.get(pos..pos.checked_add(2)?)?;
                pos += 2;
                usize::from(u16::from_be_bytes(b.try_into().ok()?))
            }
            Len::U32 => {
                let b = buf.get(pos..pos.checked_add(4)?)?;
                pos += 4;
                usize::try_from(u32::from_be_bytes(b.try_into().ok()?)).ok()?
            }
        };
        pos = pos.checked_add(n)?;
    }
    Some(pos)
}

/// Why a frame is not returned: not all there yet, or bad.
enum Stop {
    Incomplete,
    Bad(ProtoError),
}

impl From<ProtoError> for Stop {
    fn from(e: ProtoError) -> Self {
        Stop::Bad(e)
    }
}

/// How a field is delimited.
#[derive(Clone, Copy)]
enum Len {
    U16,
    U32,
    Fixed(usize),
}

/// What a field holds, which decides its checks.
#[derive(Clone, Copy)]
enum Kind {
    /// Target, user, group id or name: 1..=max_target_bytes, else `BadTarget`.
    Target,
    /// Any bytes (message bodies, the u64 of SEND_SEQ).
    Any,
    /// Read-receipt message id: 1..=max_target_bytes, else `BadFrame`.
    ReceiptId,
    /// ACK id: 16 hex digits, else `BadAck`.
    AckId,
    /// BATCH_SEND blob: ≤ max_batch_bytes, 1..=max_batch_entries entries filling it exactly.
    Batch,
    /// CBOR_MSG payload: a CBOR map ≤ max_cbor_bytes.
    CborMsg,
    /// Prekey bundle: a CBOR map ≤ max_prekeys_bytes.
    Prekeys,
    /// E2EE header: a CBOR map ≤ max_e2ee_header_bytes.
    E2eeHeader,
    /// Group message header: ≤ max_e2ee_header_bytes (not interpreted).
    GroupHeader,
    /// Ciphertext or sender key: ≤ max_e2ee_ciphertext_bytes.
    Ciphertext,
}

#[derive(Clone, Copy)]
struct Field {
    len: Len,
    kind: Kind,
}

const fn field(len: Len, kind: Kind) -> Field {
    Field { len, kind }
}

const TARGET: Field = field(Len::U16, Kind::Target);
const MSG: Field = field(Len::U16, Kind::Any);
const L_SEND: &[Field] = &[TARGET, MSG];
const L_ACK: &[Field] = &[field(Len::Fixed(MSG_ID_LEN), Kind::AckId)];
const L_BATCH: &[Field] = &[TARGET, field(Len::U32, Kind::Batch)];
const L_TARGET: &[Field] = &[TARGET];
const L_SEND_SEQ: &[Field] = &[TARGET, field(Len::Fixed(8), Kind::Any), MSG];
const L_CBOR: &[Field] = &[TARGET, field(Len::U32, Kind::CborMsg)];
const L_UPLOAD: &[Field] = &[field(Len::U32, Kind::Prekeys)];
const L_E2EE: &[Field] = &[
    TARGET,
    field(Len::U16, Kind::E2eeHeader),
    field(Len::U32, Kind::Ciphertext),
];
const L_GROUP_ADD: &[Field] = &[TARGET, TARGET];
const L_GROUP_MSG: &[Field] = &[
    TARGET,
    field(Len::U16, Kind::GroupHeader),
    field(Len::U32, Kind::Ciphertext),
];
const L_SENDER_KEY: &[Field] = &[TARGET, field(Len::U32, Kind::Ciphertext)];
const L_RECEIPT: &[Field] = &[field(Len::U16, Kind::ReceiptId), TARGET];

/// The fields after the opcode, for every self-delimiting client opcode (not LOGIN).
fn layout(opcode: u8) -> Option<&'static [Field]> {
    Some(match opcode {
        op::SEND => L_SEND,
        op::ACK => L_ACK,
        op::BATCH_SEND => L_BATCH,
        op::GET_STATUS => L_TARGET,
        op::SEND_SEQ => L_SEND_SEQ,
        op::CBOR_MSG => L_CBOR,
        op::UPLOAD_PREKEYS => L_UPLOAD,
        op::FETCH_PREKEYS => L_TARGET,
        op::E2EE_MSG => L_E2EE,
        op::GROUP_CREATE | op::GROUP_LEAVE | op::GROUP_ROSTER => L_TARGET,
        op::GROUP_ADD => L_GROUP_ADD,
        op::GROUP_MSG => L_GROUP_MSG,
        op::SENDER_KEY_DIST => L_SENDER_KEY,
        op::TYPING_START | op::TYPING_STOP => L_TARGET,
        op::READ_RECEIPT => L_RECEIPT,
        _ => return None,
    })
}

/// The check of a field's length, as soon as the length is known.
fn check_len(kind: Kind, n: usize, limits: &Limits) -> Result<(), ProtoError> {
    let within = |max: usize| {
        if n > max {
            Err(ProtoError::FrameTooLarge)
        } else {
            Ok(())
        }
    };
    match kind {
        Kind::Target if n == 0 || n > limits.max_target_bytes => Err(ProtoError::BadTarget),
        Kind::ReceiptId if n == 0 || n > limits.max_target_bytes => Err(ProtoError::BadFrame),
        Kind::Target | Kind::ReceiptId | Kind::Any | Kind::AckId => Ok(()),
        Kind::Batch => {
            within(limits.max_batch_bytes)?;
            if n == 0 {
                Err(ProtoError::TooManyEntries)
            } else {
                Ok(())
            }
        }
        Kind::CborMsg => within(limits.max_cbor_bytes),
        Kind::Prekeys => within(limits.max_prekeys_bytes),
        Kind::E2eeHeader | Kind::GroupHeader => within(limits.max_e2ee_header_bytes),
        Kind::Ciphertext => within(limits.max_e2ee_ciphertext_bytes),
    }
}

/// The check of a field's contents, as soon as the field is complete.
fn check_content(kind: Kind, bytes: &[u8], limits: &Limits) -> Result<(), ProtoError> {
    match kind {
        Kind::AckId => check_hex(bytes),
        Kind::Batch => check_batch(bytes, limits.max_batch_entries),
        Kind::CborMsg | Kind::Prekeys | Kind::E2eeHeader => cbor::check_map(bytes),
        Kind::Target | Kind::ReceiptId | Kind::Any | Kind::GroupHeader | Kind::Ciphertext => Ok(()),
    }
}

fn check_hex(bytes: &[u8]) -> Result<(), ProtoError> {
    if bytes.iter().all(|&c| hex_value(c).is_some()) {
        Ok(())
    } else {
        Err(ProtoError::BadAck)
    }
}

/// A blob must be 1..=max_entries entries `u16 len | msg` that fill it exactly.
fn check_batch(blob: &[u8], max_entries: usize) -> Result<(), ProtoError> {
    let mut entries = batch_entries(blob);
    let mut count = 0usize;
    for _ in entries.by_ref() {
        count += 1;
        if count > max_entries {
            return Err(ProtoError::TooManyEntries);
        }
    }
    if !entries.remainder().is_empty() {
        Err(ProtoError::BadFrame)
    } else if count == 0 {
        Err(ProtoError::TooManyEntries)
    } else {
        Ok(())
    }
}

/// Decodes a self-delimiting frame (any opcode but LOGIN) at the head of `buf`.
fn decode_framed<'a>(buf: &'a [u8], limits: &Limits) -> Result<(ClientFrame<'a>, usize), Stop> {
    let opcode = *buf.first().ok_or(Stop::Incomplete)?;
    let fields = layout(opcode).ok_or(ProtoError::UnknownOpcode(opcode))?;
    let mut pos = 1usize;
    let mut parts: [&'a [u8]; 3] = [&[]; 3];
    for (i, f) in fields.iter().enumerate() {
        let n = match f.len {
            Len::Fixed(n) => {
                // Check the bytes that are there already (an ACK with a non-hex byte is
                // refused without waiting for the rest).
                if let Kind::AckId = f.kind {
                    let have = buf.get(pos..).unwrap_or_default();
                    check_hex(have.get(..n).unwrap_or(have))?;
                }
                n
            }
            Len::U16 => {
                let b = buf.get(pos..pos + 2).ok_or(Stop::Incomplete)?;
                pos += 2;
                usize::from(u16::from_be_bytes(
                    b.try_into().map_err(|_| ProtoError::BadFrame)?,
                ))
            }
            Len::U32 => {
                let b = buf.get(pos..pos + 4).ok_or(Stop::Incomplete)?;
                pos += 4;
                let n = u32::from_be_bytes(b.try_into().map_err(|_| ProtoError::BadFrame)?);
                usize::try_from(n).map_err(|_| ProtoError::FrameTooLarge)?
            }
        };
        check_len(f.kind, n, limits)?;
        let end = pos.checked_add(n).ok_or(ProtoError::FrameTooLarge)?;
        let bytes = buf.get(pos..end).ok_or(Stop::Incomplete)?;
        check_content(f.kind, bytes, limits)?;
        if let Some(slot) = parts.get_mut(i) {
            *slot = bytes;
        }
        pos = end;
    }
    let raw = buf.get(..pos).ok_or(Stop::Incomplete)?;
    let [a, b, c] = parts;
    let frame = match opcode {
        op::SEND => ClientFrame::Send { target: a, msg: b },
        op::ACK => ClientFrame::Ack {
            id: MsgId::parse(a).ok_or(ProtoError::BadAck)?,
        },
        op::BATCH_SEND => ClientFrame::BatchSend { target: a, blob: b },
        op::GET_STATUS => ClientFrame::GetStatus { target: a },
        op::SEND_SEQ => ClientFrame::SendSeq {
            target: a,
            seq: u64::from_be_bytes(b.try_into().map_err(|_| ProtoError::BadFrame)?),
            msg: c,
        },
        op::CBOR_MSG => ClientFrame::CborMsg { target: a, cbor: b },
        op::UPLOAD_PREKEYS => ClientFrame::UploadPrekeys { bundle: a },
        op::FETCH_PREKEYS => ClientFrame::FetchPrekeys { user: a },
        op::E2EE_MSG => ClientFrame::E2eeMsg {
            recipient: a,
            header: b,
            ciphertext: c,
        },
        op::GROUP_CREATE
        | op::GROUP_ADD
        | op::GROUP_LEAVE
        | op::GROUP_MSG
        | op::GROUP_ROSTER
        | op::SENDER_KEY_DIST => ClientFrame::Group { op: opcode, raw },
        op::TYPING_START | op::TYPING_STOP => ClientFrame::Typing {
            target: a,
            on: opcode == op::TYPING_START,
        },
        op::READ_RECEIPT => ClientFrame::ReadReceipt { id: a, sender: b },
        other => return Err(ProtoError::UnknownOpcode(other).into()),
    };
    Ok((frame, pos))
}

/// LOGIN: the body ends where the rest of `buf` is exactly a run of complete valid frames, or at
/// the end of `buf` (see the module documentation).
fn decode_login<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, ProtoError> {
    if buf.len() < 2 {
        return Ok(Decoded::Incomplete);
    }
    let last_k = (buf.len() - 1).min(limits.max_login_bytes.saturating_add(1));
    // Positions known not to start a run of frames that ends at buf.len(). Allocated only
    // when a candidate's run has more than one frame (never for a login alone).
    let mut dead = HashSet::new();
    for k in 2..=last_k {
        if frames_fill(buf, k, limits, &mut dead) {
            let body = buf.get(1..k).unwrap_or_default();
            return Ok(Decoded::Frame(ClientFrame::Login { body }, k));
        }
    }
    let body = buf.get(1..).unwrap_or_default();
    if body.len() > limits.max_login_bytes {
        return Err(ProtoError::LoginTooLong);
    }
    Ok(Decoded::Frame(ClientFrame::Login { body }, buf.len()))
}

/// Whether `buf[start..]` (non-empty) is one or more complete, valid, non-LOGIN frames ending
/// exactly at `buf.len()`. Every position reached after the first frame goes into `dead`: if the
/// run fails they are all dead ends, and if it succeeds the search stops.
fn frames_fill(buf: &[u8], start: usize, limits: &Limits, dead: &mut HashSet<usize>) -> bool {
    if dead.contains(&start) {
        return false;
    }
    let mut pos = start;
    loop {
        if pos > start && !dead.insert(pos) {
            return false;
        }
        let Some(rest) = buf.get(pos..) else {
            return false;
        };
        if rest.first() == Some(&op::LOGIN) {
            return false;
        }
        match decode_framed(rest, limits) {
            Ok((_, n)) => pos += n,
            Err(_) => return false,
        }
        if pos == buf.len() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::cbor::NOT_FOUND_BUNDLE;
    use crate::protocol::frame::{batch_entries, push_batch_entry};
    use crate::protocol::testutil::{any_frame, framed, login_body, raw_group, LARGE, SMALL};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn lim() -> Limits {
        Limits::default()
    }

    fn dec(buf: &[u8]) -> Result<Decoded<'_>, ProtoError> {
        decode(buf, &lim())
    }

    /// `u16 len | b`.
    fn l16(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    /// `u32 len | b`.
    fn l32(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn enc(f: &ClientFrame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out);
        out
    }

    /// Decodes a whole frame that must fill `buf`, after checking that every strict prefix is
    /// incomplete (with the header hint right once known).
    fn whole(buf: &[u8]) -> ClientFrame<'_> {
        for cut in 0..buf.len() {
            assert_eq!(dec(&buf[..cut]), Ok(Decoded::Incomplete), "prefix {cut}");
            if let Some(n) = frame_len_hint(&buf[..cut]) {
                assert_eq!(n, buf.len(), "hint at prefix {cut}");
            }
        }
        match dec(buf) {
            Ok(Decoded::Frame(f, n)) => {
                assert_eq!(n, buf.len());
                assert_eq!(frame_len_hint(buf), Some(buf.len()));
                f
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// `buf` is an error `e`, and so is every longer buffer (checked with trailing zeros).
    fn bad(buf: &[u8], e: ProtoError) {
        assert_eq!(dec(buf), Err(e.clone()), "{buf:02x?}");
        let mut longer = buf.to_vec();
        longer.extend_from_slice(&[0; 8]);
        assert_eq!(dec(&longer), Err(e));
    }

    /// All frames of a buffer decoded one after another (re-encoded, to own them).
    fn drain(buf: &[u8]) -> Result<(Vec<Vec<u8>>, usize), ProtoError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            match decode(&buf[at..], &lim())? {
                Decoded::Frame(f, n) => {
                    assert!(n >= 1 && n <= buf.len() - at);
                    out.push(enc(&f));
                    at += n;
                }
                Decoded::Incomplete => break,
            }
        }
        Ok((out, at))
    }

    const ALL_OPS: [u8; 19] = [
        op::LOGIN,
        op::SEND,
        op::ACK,
        op::BATCH_SEND,
        op::GET_STATUS,
        op::SEND_SEQ,
        op::CBOR_MSG,
        op::UPLOAD_PREKEYS,
        op::FETCH_PREKEYS,
        op::E2EE_MSG,
        op::GROUP_CREATE,
        op::GROUP_ADD,
        op::GROUP_LEAVE,
        op::GROUP_MSG,
        op::GROUP_ROSTER,
        op::SENDER_KEY_DIST,
        op::TYPING_START,
        op::TYPING_STOP,
        op::READ_RECEIPT,
    ];

    #[test]
    fn default_limits() {
        let l = Limits::default();
        assert_eq!(l.max_login_bytes, 256);
        assert_eq!(l.max_target_bytes, 256);
        assert_eq!(l.max_batch_bytes, 1 << 20);
        assert_eq!(l.max_batch_entries, 1000);
        assert_eq!(l.max_cbor_bytes, 256 << 10);
        assert_eq!(l.max_prekeys_bytes, 8 << 10);
        assert_eq!(l.max_e2ee_header_bytes, 1 << 10);
        assert_eq!(l.max_e2ee_ciphertext_bytes, 64 << 10);
    }

    #[test]
    fn empty_buffer_is_incomplete() {
        assert_eq!(dec(&[]), Ok(Decoded::Incomplete));
        assert_eq!(frame_len_hint(&[]), None);
    }

    #[test]
    fn unknown_opcodes_are_refused_at_once() {
        for b in 0..=255u8 {
            if ALL_OPS.contains(&b) {
                assert_eq!(dec(&[b]), Ok(Decoded::Incomplete), "op {b:#x}");
            } else {
                assert_eq!(dec(&[b]), Err(ProtoError::UnknownOpcode(b)), "op {b:#x}");
                assert_eq!(frame_len_hint(&[b, 0, 0, 0, 0]), None);
            }
        }
        // The gaps inside the known ranges and the server opcodes.
        for b in [
            0x00, 0x06, 0x08, 0x22, 0x24, 0x34, 0x37, 0x72, 0x75, 0xfe, 0xff,
        ] {
            bad(&[b], ProtoError::UnknownOpcode(b));
        }
        assert_eq!(ProtoError::UnknownOpcode(0x34).reason(), "unknown_opcode");
    }

    // ---- SEND ----

    #[test]
    fn send() {
        let buf = cat(&[&[op::SEND], &l16(b"bob"), &l16(b"hello")]);
        assert_eq!(
            whole(&buf),
            ClientFrame::Send {
                target: b"bob",
                msg: b"hello"
            }
        );
        let buf = cat(&[&[op::SEND], &l16(b"bob"), &l16(b"")]);
        assert_eq!(
            whole(&buf),
            ClientFrame::Send {
                target: b"bob",
                msg: b""
            }
        );
        let t = vec![b't'; 256];
        let m = vec![7u8; 65535];
        let buf = cat(&[&[op::SEND], &l16(&t), &l16(&m)]);
        assert_eq!(
            dec(&buf),
            Ok(Decoded::Frame(
                ClientFrame::Send {
                    target: &t,
                    msg: &m
                },
                buf.len()
            ))
        );
    }

    #[test]
    fn send_bad_target_is_refused_from_the_length() {
        bad(&[op::SEND, 0, 0], ProtoError::BadTarget);
        bad(&[op::SEND, 1, 1], ProtoError::BadTarget);
        bad(&[op::SEND, 0xff, 0xff], ProtoError::BadTarget);
        let t = vec![b't'; 257];
        bad(
            &cat(&[&[op::SEND], &l16(&t), &l16(b"x")]),
            ProtoError::BadTarget,
        );
    }

    // ---- ACK ----

    #[test]
    fn ack() {
        let buf = cat(&[&[op::ACK], b"00000000000000ff"]);
        assert_eq!(whole(&buf), ClientFrame::Ack { id: MsgId(255) });
        let buf = cat(&[&[op::ACK], b"DEADBEEF00000000"]);
        assert_eq!(
            whole(&buf),
            ClientFrame::Ack {
                id: MsgId(0xdead_beef_0000_0000)
            }
        );
        assert_eq!(frame_len_hint(&[op::ACK]), Some(1 + MSG_ID_LEN));
    }

    #[test]
    fn ack_with_non_hex_digits_is_refused_early() {
        bad(&[op::ACK, b'g'], ProtoError::BadAck);
        bad(b"\x030000000z", ProtoError::BadAck);
        bad(b"\x03000000000000000 ", ProtoError::BadAck);
        bad(b"\x03\x00\x10000000000000000", ProtoError::BadAck);
        assert_eq!(ProtoError::BadAck.reason(), "bad_ack");
    }

    #[test]
    fn acks_followed_by_other_frames_all_parse() {
        let mut buf = Vec::new();
        for i in 0..3u64 {
            ClientFrame::Ack { id: MsgId(i << 40) }.encode(&mut buf);
        }
        ClientFrame::Send {
            target: b"bob",
            msg: b"hi",
        }
        .encode(&mut buf);
        ClientFrame::Ack { id: MsgId(9) }.encode(&mut buf);
        ClientFrame::GetStatus { target: b"carol" }.encode(&mut buf);
        let (frames, used) = drain(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(
            frames,
            vec![
                enc(&ClientFrame::Ack { id: MsgId(0) }),
                enc(&ClientFrame::Ack { id: MsgId(1 << 40) }),
                enc(&ClientFrame::Ack { id: MsgId(2 << 40) }),
                enc(&ClientFrame::Send {
                    target: b"bob",
                    msg: b"hi"
                }),
                enc(&ClientFrame::Ack { id: MsgId(9) }),
                enc(&ClientFrame::GetStatus { target: b"carol" }),
            ]
        );
    }

    // ---- BATCH_SEND ----

    fn blob(entries: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        entries.iter().for_each(|e| push_batch_entry(&mut b, e));
        b
    }

    fn batch(target: &[u8], blob: &[u8]) -> Vec<u8> {
        cat(&[&[op::BATCH_SEND], &l16(target), &l32(blob)])
    }

    #[test]
    fn batch_send() {
        let b = blob(&[b"one", b"", b"three"]);
        let buf = batch(b"bob", &b);
        let f = whole(&buf);
        assert_eq!(
            f,
            ClientFrame::BatchSend {
                target: b"bob",
                blob: &b
            }
        );
        let ClientFrame::BatchSend { blob: got, .. } = f else {
            unreachable!()
        };
        let entries: Vec<&[u8]> = batch_entries(got).collect();
        assert_eq!(entries, vec![&b"one"[..], b"", b"three"]);
    }

    #[test]
    fn batch_at_the_limits() {
        // 1000 entries.
        let msgs: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let b = blob(&refs);
        let buf = batch(b"bob", &b);
        assert!(
            matches!(dec(&buf), Ok(Decoded::Frame(ClientFrame::BatchSend { .. }, n)) if n == buf.len())
        );
        assert_eq!(batch_entries(&b).count(), 1000);
        // Exactly 1 MiB: 16 entries of 65534 bytes.
        let big = vec![1u8; 65534];
        let b = blob(&[big.as_slice(); 16]);
        assert_eq!(b.len(), 1 << 20);
        let buf = batch(b"bob", &b);
        assert!(
            matches!(dec(&buf), Ok(Decoded::Frame(ClientFrame::BatchSend { .. }, n)) if n == buf.len())
        );
    }

    #[test]
    fn batch_errors() {
        // 1001 entries.
        let b = blob(&[&b"x"[..]; 1001]);
        bad(&batch(b"bob", &b), ProtoError::TooManyEntries);
        // Zero entries: refused from the length alone.
        bad(
            &[op::BATCH_SEND, 0, 1, b'b', 0, 0, 0, 0],
            ProtoError::TooManyEntries,
        );
        // Over 1 MiB: refused from the length alone, without waiting for the blob.
        let mut head = vec![op::BATCH_SEND, 0, 1, b'b'];
        head.extend_from_slice(&((1u32 << 20) + 1).to_be_bytes());
        bad(&head, ProtoError::FrameTooLarge);
        head.truncate(4);
        head.extend_from_slice(&u32::MAX.to_be_bytes());
        bad(&head, ProtoError::FrameTooLarge);
        // Entries that overrun or underfill the blob.
        bad(&batch(b"bob", &[0, 5, b'a', b'b']), ProtoError::BadFrame);
        bad(&batch(b"bob", &[0]), ProtoError::BadFrame);
        let mut b = blob(&[b"ok", b"ok"]);
        b.push(0);
        bad(&batch(b"bob", &b), ProtoError::BadFrame);
        // Bad target, before anything else.
        bad(&[op::BATCH_SEND, 0, 0], ProtoError::BadTarget);
        assert_eq!(ProtoError::TooManyEntries.reason(), "too_many_entries");
    }

    // ---- GET_STATUS, FETCH_PREKEYS, TYPING ----

    #[test]
    fn single_target_frames() {
        let buf = cat(&[&[op::GET_STATUS], &l16(b"alice")]);
        assert_eq!(whole(&buf), ClientFrame::GetStatus { target: b"alice" });
        let buf = cat(&[&[op::FETCH_PREKEYS], &l16(b"alice")]);
        assert_eq!(whole(&buf), ClientFrame::FetchPrekeys { user: b"alice" });
        let buf = cat(&[&[op::TYPING_START], &l16(b"bob")]);
        assert_eq!(
            whole(&buf),
            ClientFrame::Typing {
                target: b"bob",
                on: true
            }
        );
        let buf = cat(&[&[op::TYPING_STOP], &l16(b"bob")]);
        assert_eq!(
            whole(&buf),
            ClientFrame::Typing {
                target: b"bob",
                on: false
            }
        );
        let t = vec![0u8; 256];
        let buf = cat(&[&[op::GET_STATUS], &l16(&t)]);
        assert_eq!(whole(&buf), ClientFrame::GetStatus { target: &t });
        for o in [
            op::GET_STATUS,
            op::FETCH_PREKEYS,
            op::TYPING_START,
            op::TYPING_STOP,
        ] {
            bad(&[o, 0, 0], ProtoError::BadTarget);
            bad(&[o, 1, 1], ProtoError::BadTarget);
        }
    }

    // ---- SEND_SEQ ----

    #[test]
    fn send_seq() {
        let buf = cat(&[
            &[op::SEND_SEQ],
            &l16(b"bob"),
            &0x0102_0304_0506_0708u64.to_be_bytes(),
            &l16(b"hi"),
        ]);
        assert_eq!(
            whole(&buf),
            ClientFrame::SendSeq {
                target: b"bob",
                seq: 0x0102_0304_0506_0708,
                msg: b"hi"
            }
        );
        bad(&[op::SEND_SEQ, 0, 0], ProtoError::BadTarget);
        bad(&[op::SEND_SEQ, 2, 0], ProtoError::BadTarget);
    }

    // ---- CBOR_MSG ----

    #[test]
    fn cbor_msg() {
        let buf = cat(&[&[op::CBOR_MSG], &l16(b"bob"), &l32(NOT_FOUND_BUNDLE)]);
        assert_eq!(
            whole(&buf),
            ClientFrame::CborMsg {
                target: b"bob",
                cbor: NOT_FOUND_BUNDLE
            }
        );
        // Exactly 256 KiB: {0: h'…'}.
        let mut m = vec![0xa1, 0x00, 0x5a];
        let n = (256 << 10) - 7;
        m.extend_from_slice(&(n as u32).to_be_bytes());
        m.resize(256 << 10, 0xaa);
        let buf = cat(&[&[op::CBOR_MSG], &l16(b"bob"), &l32(&m)]);
        assert!(matches!(
            dec(&buf),
            Ok(Decoded::Frame(ClientFrame::CborMsg { .. }, _))
        ));
    }

    #[test]
    fn cbor_msg_errors() {
        for not_map in [
            &b""[..],
            b"\x80",
            b"\x00",
            b"\xa1\x00",
            b"\xa0\x00",
            b"\xff",
        ] {
            bad(
                &cat(&[&[op::CBOR_MSG], &l16(b"bob"), &l32(not_map)]),
                ProtoError::BadCbor,
            );
        }
        let mut head = cat(&[&[op::CBOR_MSG], &l16(b"bob")]);
        head.extend_from_slice(&((256u32 << 10) + 1).to_be_bytes());
        bad(&head, ProtoError::FrameTooLarge);
        bad(&[op::CBOR_MSG, 0, 0], ProtoError::BadTarget);
        assert_eq!(ProtoError::BadCbor.reason(), "bad_cbor");
        assert_eq!(ProtoError::FrameTooLarge.reason(), "frame_too_large");
    }

    // ---- UPLOAD_PREKEYS ----

    #[test]
    fn upload_prekeys() {
        let buf = cat(&[&[op::UPLOAD_PREKEYS], &l32(NOT_FOUND_BUNDLE)]);
        assert_eq!(
            whole(&buf),
            ClientFrame::UploadPrekeys {
                bundle: NOT_FOUND_BUNDLE
            }
        );
        let mut m = vec![0xa1, 0x00, 0x59];
        m.extend_from_slice(&((8u16 << 10) - 5).to_be_bytes());
        m.resize(8 << 10, 1);
        let buf = cat(&[&[op::UPLOAD_PREKEYS], &l32(&m)]);
        assert_eq!(whole(&buf), ClientFrame::UploadPrekeys { bundle: &m });
        bad(
            &cat(&[&[op::UPLOAD_PREKEYS], &((8u32 << 10) + 1).to_be_bytes()]),
            ProtoError::FrameTooLarge,
        );
        bad(
            &cat(&[&[op::UPLOAD_PREKEYS], &l32(b"\x81\x00")]),
            ProtoError::BadCbor,
        );
        bad(
            &cat(&[&[op::UPLOAD_PREKEYS], &l32(b"")]),
            ProtoError::BadCbor,
        );
    }

    // ---- E2EE_MSG ----

    #[test]
    fn e2ee_msg() {
        let buf = cat(&[
            &[op::E2EE_MSG],
            &l16(b"bob"),
            &l16(b"\xa0"),
            &l32(b"secret"),
        ]);
        assert_eq!(
            whole(&buf),
            ClientFrame::E2eeMsg {
                recipient: b"bob",
                header: b"\xa0",
                ciphertext: b"secret"
            }
        );
        // Both limits exactly.
        let mut h = vec![0xa1, 0x00, 0x59];
        h.extend_from_slice(&(1024u16 - 5).to_be_bytes());
        h.resize(1024, 2);
        let c = vec![3u8; 64 << 10];
        let buf = cat(&[&[op::E2EE_MSG], &l16(b"bob"), &l16(&h), &l32(&c)]);
        assert!(
            matches!(dec(&buf), Ok(Decoded::Frame(ClientFrame::E2eeMsg { .. }, n)) if n == buf.len())
        );
    }

    #[test]
    fn e2ee_msg_errors() {
        bad(&[op::E2EE_MSG, 0, 0], ProtoError::BadTarget);
        bad(
            &[op::E2EE_MSG, 0, 1, b'b', 0x04, 0x01],
            ProtoError::FrameTooLarge,
        );
        // A bad header is refused before the ciphertext arrives.
        bad(
            &cat(&[&[op::E2EE_MSG], &l16(b"bob"), &l16(b"\x80")]),
            ProtoError::BadCbor,
        );
        bad(
            &cat(&[&[op::E2EE_MSG], &l16(b"bob"), &l16(b"")]),
            ProtoError::BadCbor,
        );
        let mut head = cat(&[&[op::E2EE_MSG], &l16(b"bob"), &l16(b"\xa0")]);
        head.extend_from_slice(&((64u32 << 10) + 1).to_be_bytes());
        bad(&head, ProtoError::FrameTooLarge);
    }

    // ---- groups ----

    #[test]
    fn groups_parse_as_raw_frames() {
        let frames = [
            raw_group(op::GROUP_CREATE, &[b"friends"], &[]),
            raw_group(op::GROUP_ADD, &[b"g1", b"carol"], &[]),
            raw_group(op::GROUP_LEAVE, &[b"g1"], &[]),
            raw_group(op::GROUP_MSG, &[b"g1", b"hdr"], &[b"ct"]),
            raw_group(op::GROUP_ROSTER, &[b"g1"], &[]),
            raw_group(op::SENDER_KEY_DIST, &[b"g1"], &[b"key"]),
        ];
        for f in &frames {
            let buf = f.encoded();
            let got = whole(&buf);
            assert_eq!(got, f.as_frame());
            let ClientFrame::Group { op: o, raw } = got else {
                panic!("not a group frame")
            };
            assert_eq!(o, buf[0]);
            assert_eq!(raw, &buf[..]);
        }
        // GROUP_MSG and SENDER_KEY_DIST at their limits.
        let h = vec![0u8; 1024];
        let c = vec![0u8; 64 << 10];
        let f = raw_group(op::GROUP_MSG, &[b"g", &h], &[&c]);
        assert!(matches!(
            dec(&f.encoded()),
            Ok(Decoded::Frame(ClientFrame::Group { .. }, _))
        ));
        let f = raw_group(op::SENDER_KEY_DIST, &[b"g"], &[&c]);
        assert!(matches!(
            dec(&f.encoded()),
            Ok(Decoded::Frame(ClientFrame::Group { .. }, _))
        ));
    }

    #[test]
    fn group_errors() {
        for o in [
            op::GROUP_CREATE,
            op::GROUP_ADD,
            op::GROUP_LEAVE,
            op::GROUP_MSG,
            op::GROUP_ROSTER,
            op::SENDER_KEY_DIST,
        ] {
            bad(&[o, 0, 0], ProtoError::BadTarget);
            bad(&[o, 1, 1], ProtoError::BadTarget);
        }
        bad(&[op::GROUP_ADD, 0, 1, b'g', 0, 0], ProtoError::BadTarget);
        bad(
            &[op::GROUP_MSG, 0, 1, b'g', 0x04, 0x01],
            ProtoError::FrameTooLarge,
        );
        bad(
            &[op::GROUP_MSG, 0, 1, b'g', 0, 0, 0, 1, 0, 1],
            ProtoError::FrameTooLarge,
        );
        bad(
            &[op::SENDER_KEY_DIST, 0, 1, b'g', 0, 1, 0, 1],
            ProtoError::FrameTooLarge,
        );
        bad(&[0x34, 0, 1, b'g'], ProtoError::UnknownOpcode(0x34));
    }

    // ---- READ_RECEIPT ----

    #[test]
    fn read_receipt() {
        let buf = cat(&[
            &[op::READ_RECEIPT],
            &l16(b"00000000000000ff"),
            &l16(b"alice"),
        ]);
        assert_eq!(
            whole(&buf),
            ClientFrame::ReadReceipt {
                id: b"00000000000000ff",
                sender: b"alice"
            }
        );
        let id = vec![b'9'; 256];
        let buf = cat(&[&[op::READ_RECEIPT], &l16(&id), &l16(b"a")]);
        assert_eq!(
            whole(&buf),
            ClientFrame::ReadReceipt {
                id: &id,
                sender: b"a"
            }
        );
        bad(&[op::READ_RECEIPT, 0, 0], ProtoError::BadFrame);
        bad(&[op::READ_RECEIPT, 1, 1], ProtoError::BadFrame);
        bad(&[op::READ_RECEIPT, 0, 1, b'i', 0, 0], ProtoError::BadTarget);
        bad(&[op::READ_RECEIPT, 0, 1, b'i', 1, 1], ProtoError::BadTarget);
        assert_eq!(ProtoError::BadFrame.reason(), "bad_frame");
        assert_eq!(ProtoError::BadTarget.reason(), "bad_target");
    }

    // ---- LOGIN ----

    fn login(buf: &[u8]) -> (&[u8], usize) {
        match dec(buf) {
            Ok(Decoded::Frame(ClientFrame::Login { body }, n)) => (body, n),
            other => panic!("expected a login, got {other:?}"),
        }
    }

    #[test]
    fn login_alone_is_the_whole_read() {
        assert_eq!(dec(&[op::LOGIN]), Ok(Decoded::Incomplete));
        assert_eq!(frame_len_hint(&[op::LOGIN, b'a']), None);
        assert_eq!(login(b"\x01alice"), (&b"alice"[..], 6));
        assert_eq!(login(b"\x01a"), (&b"a"[..], 2));
        for name in [
            &b"alice123"[..],
            b"bob 2",
            b"user:eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl",
            b"0123456789",
            b"p q t ! # 0 1 2 3 4 5 6",
            b"  leading and trailing  ",
            b":",
            b"a:b:c",
        ] {
            let buf = cat(&[&[op::LOGIN], name]);
            assert_eq!(login(&buf), (name, buf.len()));
        }
        // Any bytes that are not followed by a complete frame.
        assert_eq!(login(b"\x01\x02\x00\x01"), (&b"\x02\x00\x01"[..], 4));
        assert_eq!(login(b"\x01\x00\xff"), (&b"\x00\xff"[..], 3));
    }

    #[test]
    fn login_then_send_in_one_read() {
        let send = enc(&ClientFrame::Send {
            target: b"bob",
            msg: b"hi",
        });
        for name in [
            &b"alice"[..],
            b"alice123",
            b"al ice",
            b"user:tok.en-_1",
            b"0",
            b"p",
        ] {
            let buf = cat(&[&[op::LOGIN], name, &send]);
            assert_eq!(login(&buf), (name, 1 + name.len()));
            let (frames, used) = drain(&buf).unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(frames, vec![cat(&[&[op::LOGIN], name]), send.clone()]);
        }
    }

    #[test]
    fn login_then_three_acks() {
        let mut buf = b"\x01alice".to_vec();
        for i in 1..=3 {
            ClientFrame::Ack { id: MsgId(i) }.encode(&mut buf);
        }
        assert_eq!(login(&buf), (&b"alice"[..], 6));
        let (frames, used) = drain(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[3], enc(&ClientFrame::Ack { id: MsgId(3) }));
    }

    #[test]
    fn login_followed_by_an_incomplete_invalid_or_login_frame_keeps_it() {
        // Not a complete frame: the read is the login (then likely refused by the server).
        let buf = b"\x01alice\x02\x00\x03bo";
        assert_eq!(login(buf), (&buf[1..], buf.len()));
        // An invalid frame (empty target) does not split the login either.
        let buf = b"\x01alice\x05\x00\x00";
        assert_eq!(login(buf), (&buf[1..], buf.len()));
        // A valid frame followed by garbage: the run must end at the end of the read.
        let buf = b"\x01alice\x05\x00\x01bz";
        assert_eq!(login(buf), (&buf[1..], buf.len()));
        // A second LOGIN is never split off (it has no length of its own).
        let buf = b"\x01alice\x01bob";
        assert_eq!(login(buf), (&buf[1..], buf.len()));
    }

    #[test]
    fn login_length_limit() {
        let name = vec![b'a'; 256];
        let buf = cat(&[&[op::LOGIN], &name]);
        assert_eq!(login(&buf), (&name[..], 257));
        let name = vec![b'a'; 257];
        bad(&cat(&[&[op::LOGIN], &name]), ProtoError::LoginTooLong);
        // Too long even if a frame follows.
        let send = enc(&ClientFrame::Send {
            target: b"bob",
            msg: b"hi",
        });
        assert_eq!(
            dec(&cat(&[&[op::LOGIN], &name, &send])),
            Err(ProtoError::LoginTooLong)
        );
        // 256 then a frame: fine.
        let name = vec![b'a'; 256];
        let buf = cat(&[&[op::LOGIN], &name, &send]);
        assert_eq!(login(&buf), (&name[..], 257));
        // Smaller configured limit.
        let small = Limits {
            max_login_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(decode(b"\x01abcde", &small), Err(ProtoError::LoginTooLong));
        assert!(matches!(
            decode(b"\x01abcd", &small),
            Ok(Decoded::Frame(ClientFrame::Login { body: b"abcd" }, 5))
        ));
        assert_eq!(ProtoError::LoginTooLong.reason(), "login_too_long");
    }

    #[test]
    fn login_search_stays_cheap_on_adversarial_input() {
        // Every candidate start is a valid ACK run that fails only at the very end.
        let mut buf = vec![op::LOGIN];
        for _ in 0..20_000 {
            buf.extend_from_slice(b"\x030000000000000000");
        }
        buf.push(0x99);
        let t = std::time::Instant::now();
        assert_eq!(dec(&buf), Err(ProtoError::LoginTooLong));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    // ---- frame_len_hint ----

    #[test]
    fn len_hint_needs_every_length_field() {
        assert_eq!(frame_len_hint(&[op::SEND]), None);
        assert_eq!(frame_len_hint(&[op::SEND, 0, 3, b'b']), None);
        assert_eq!(frame_len_hint(&[op::SEND, 0, 3, b'b', b'o', b'b', 0]), None);
        assert_eq!(
            frame_len_hint(&[op::SEND, 0, 3, b'b', b'o', b'b', 1, 0]),
            Some(1 + 2 + 3 + 2 + 256)
        );
        assert_eq!(
            frame_len_hint(&[op::SEND_SEQ, 0, 1, b'b', 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]),
            Some(1 + 2 + 1 + 8 + 2 + 5)
        );
        assert_eq!(
            frame_len_hint(&[op::BATCH_SEND, 0, 1, b'b', 0, 0x10, 0, 0]),
            Some(1 + 2 + 1 + 4 + (1 << 20))
        );
        assert_eq!(frame_len_hint(&[op::UPLOAD_PREKEYS, 0, 0, 0]), None);
        assert_eq!(frame_len_hint(&[op::UPLOAD_PREKEYS, 0, 0, 0, 9]), Some(14));
    }

    // ---- properties ----

    /// Feeds `chunks` to an accumulating buffer the way a server does, decoding after each.
    fn feed(chunks: &[&[u8]]) -> Result<(Vec<Vec<u8>>, usize), ProtoError> {
        let mut acc: Vec<u8> = Vec::new();
        let mut frames = Vec::new();
        for chunk in chunks {
            acc.extend_from_slice(chunk);
            while let Decoded::Frame(f, n) = decode(&acc, &lim())? {
                assert!(n >= 1 && n <= acc.len());
                frames.push(enc(&f));
                acc.drain(..n);
            }
        }
        Ok((frames, acc.len()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_frame_round_trips(f in any_frame(LARGE)) {
            let buf = f.encoded();
            prop_assert_eq!(dec(&buf), Ok(Decoded::Frame(f.as_frame(), buf.len())));
        }

        #[test]
        fn framed_frames_ignore_what_follows(f in framed(LARGE), tail in vec(any::<u8>(), 0..32)) {
            let buf = f.encoded();
            prop_assert_eq!(frame_len_hint(&buf), Some(buf.len()));
            let mut longer = buf.clone();
            longer.extend_from_slice(&tail);
            prop_assert_eq!(dec(&longer), Ok(Decoded::Frame(f.as_frame(), buf.len())));
        }

        #[test]
        fn split_at_every_byte_parses_the_same(frames in vec(framed(SMALL), 1..6)) {
            let want: Vec<Vec<u8>> = frames.iter().map(|f| f.encoded()).collect();
            let all = want.concat();
            for cut in 0..=all.len() {
                let (got, left) = feed(&[&all[..cut], &all[cut..]]).unwrap();
                prop_assert_eq!(&got, &want, "cut at {}", cut);
                prop_assert_eq!(left, 0);
            }
            // One byte at a time.
            let bytes: Vec<&[u8]> = all.chunks(1).collect();
            prop_assert_eq!(feed(&bytes).unwrap(), (want, 0));
        }

        #[test]
        fn random_multi_splits_parse_the_same(
            frames in vec(framed(LARGE), 1..8),
            cuts in vec(any::<proptest::sample::Index>(), 0..12),
        ) {
            let want: Vec<Vec<u8>> = frames.iter().map(|f| f.encoded()).collect();
            let all = want.concat();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(all.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in at {
                chunks.push(&all[prev..c]);
                prev = c;
            }
            chunks.push(&all[prev..]);
            prop_assert_eq!(feed(&chunks).unwrap(), (want, 0));
        }

        #[test]
        fn login_first_then_frames_in_one_buffer(
            name in login_body(),
            frames in vec(framed(LARGE), 0..6),
        ) {
            let mut want = vec![cat(&[&[op::LOGIN], &name])];
            want.extend(frames.iter().map(|f| f.encoded()));
            let all = want.concat();
            let (got, used) = drain(&all).unwrap();
            prop_assert_eq!(used, all.len());
            prop_assert_eq!(got, want);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(buf in vec(any::<u8>(), 0..600)) {
            check_any(&buf);
        }

        #[test]
        fn decode_never_panics_on_plausible_bytes(
            opcode in proptest::sample::select(ALL_OPS.to_vec()),
            rest in vec(prop_oneof![Just(0u8), Just(1), Just(0xa0), Just(0x80), any::<u8>()], 0..300),
        ) {
            let buf = cat(&[&[opcode], &rest]);
            check_any(&buf);
        }

        #[test]
        fn mutated_frames_split_like_whole(
            frames in vec(framed(SMALL), 1..4),
            flips in vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut buf: Vec<u8> = frames.iter().flat_map(|f| f.encoded()).collect();
            for (i, v) in &flips {
                let i = i.index(buf.len());
                buf[i] = *v;
            }
            check_any(&buf);
            let cut = cut.index(buf.len() + 1);
            if buf.first() != Some(&op::LOGIN) {
                // A prefix either waits for more or already gives the whole-buffer answer.
                let part = dec(&buf[..cut]);
                if part != Ok(Decoded::Incomplete) {
                    prop_assert_eq!(part, dec(&buf));
                }
            }
        }
    }

    /// Decoding anything: no panic, consumed within 1..=len, draining terminates.
    fn check_any(buf: &[u8]) {
        if let Ok(Decoded::Frame(_, n)) = dec(buf) {
            assert!(n >= 1 && n <= buf.len());
        }
        let _ = frame_len_hint(buf);
        let _ = drain(buf);
        // Non-LOGIN: every prefix is incomplete or agrees with the whole buffer.
        if buf.first() != Some(&op::LOGIN) {
            let whole = dec(buf);
            for cut in 0..buf.len() {
                let part = dec(&buf[..cut]);
                if part != Ok(Decoded::Incomplete) {
                    assert_eq!(part, whole, "prefix {cut} of {buf:02x?}");
                }
            }
        }
    }
}
