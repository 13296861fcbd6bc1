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
//! its megabytes are buffered; the contents of a field (CBOR well-formedness, batch entries, hex
//! digits of an ack) are checked as soon as that field is complete. Whatever the field, the frame
//! is returned only when all of its bytes are present. Because every check depends only on bytes
//! before the point where it runs, a frame split over any number of reads decodes exactly as if it
//! came whole, errors included. [`frame_len_hint`] gives the total size once all length fields are
//! known, so the server can bound its input buffer.
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
//! to start such a sequence is not walked twice, so the work stays linear in `buf`.
//!
//! So a client that sends LOGIN and a frame back to back without waiting for LOGIN_OK does not
//! lose the frame, and user names never lose bytes: a printable name (`user` or `user:token`) can
//! never be the start of a valid frame, because every opcode that is also a printable character
//! (`' '`, `'!'`, `'#'`, `'0'`..`'6'`, `'p'`, `'q'`, `'t'`) is followed by a length field that
//! printable text, or the opcode of the next frame, would make at least 512 (over every limit
//! but `max_target_bytes` > 511).

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
mod tests;
