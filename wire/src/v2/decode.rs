//! Decoders: [`decode_client`] and [`decode_server`] read the frame at the head of a buffer.
//!
//! Both are stateless: call them with every byte received and not consumed yet. The steps:
//!
//! 1. Fewer than 4 bytes: [`Decoded::Incomplete`] (`total: None`).
//! 2. The `len` field: 0 is [`WireError::EmptyFrame`]; above `max_frame` is
//!    [`WireError::FrameTooLarge`], decided from the 4 length bytes alone, before any of the
//!    body is buffered.
//! 3. Fewer than `4 + len` bytes: [`Decoded::Incomplete`] with `total: Some(4 + len)`, so the
//!    caller may reserve the frame's room. Nothing of the body is looked at before the whole
//!    frame is there, so a frame split over any number of reads decodes exactly as if it came
//!    whole, and every strict prefix of a frame is `Incomplete`.
//! 4. An unknown type byte: [`Decoded::Unknown`] with the frame's size; the caller skips it and
//!    answers `ERROR unknown_type` (the connection stays open).
//! 5. The body is parsed field by field and must end exactly at the frame's end. A mismatch is
//!    [`WireError::BadFrame`] (close). A well-delimited frame with a value out of range
//!    (user name length, kind, id count, bundle or payload size) is refused with an error whose
//!    [`WireError::skip`] is the frame's size: skip it, answer ERROR, keep the connection.
//!
//! `max_frame` bounds `len` (type byte and body). A server passes
//! [`super::MAX_HELLO_FRAME_BYTES`] until it has sent HELLO_OK, then the `max_frame_bytes` it
//! announced; a client passes the `max_frame_bytes` of HELLO_OK (before it,
//! [`super::DEFAULT_MAX_FRAME_BYTES`] is plenty for a HELLO_OK or an ERROR).

use super::error::WireError;
use super::frame::{
    ty, ClientFrame, LimitedAction, MsgKind, ReceiptKind, ServerFrame, FRAME_OVERHEAD_BYTES,
    LEN_BYTES, MAX_ACK_IDS, MAX_PREKEY_BYTES, MAX_USER_BYTES, VERSION,
};

/// What the head of a buffer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<F> {
    /// Not a whole frame yet: read more and call again. `total` is the size of the frame
    /// (length field included) once its length field has arrived.
    Incomplete {
        /// `4 + len`, when known.
        total: Option<usize>,
    },
    /// A frame, and the bytes it takes at the head of the buffer (`4 + len`).
    Frame {
        /// The frame.
        frame: F,
        /// Bytes to consume.
        consumed: usize,
    },
    /// A whole frame of a type byte this decoder does not know: skip `consumed` bytes and
    /// answer `ERROR unknown_type`.
    Unknown {
        /// The type byte.
        ty: u8,
        /// Bytes to skip.
        consumed: usize,
    },
}

/// Decodes the client frame at the head of `buf` (see the module documentation). Never
/// panics; a `consumed` or `skip` is always between 5 and `buf.len()`.
pub fn decode_client(buf: &[u8], max_frame: usize) -> Result<Decoded<ClientFrame>, WireError> {
    let (t, body, consumed) = match head(buf, max_frame)? {
        Head::Incomplete(total) => return Ok(Decoded::Incomplete { total }),
        Head::Whole { ty, body, consumed } => (ty, body, consumed),
    };
    let mut r = Reader { b: body, ty: t };
    let frame = match t {
        ty::HELLO => {
            let version = r.u8()?;
            if version != VERSION {
                return Err(WireError::UnsupportedVersion { version });
            }
            ClientFrame::Hello {
                client_name: r.str()?.to_vec(),
                client_version: r.str()?.to_vec(),
                token: r.str()?.to_vec(),
                resume_after: r.u64()?,
            }
        }
        ty::SEND => {
            let client_msg_id = r.u64()?;
            let recipient = r.str()?;
            if recipient.len() > MAX_USER_BYTES {
                return Err(WireError::RecipientTooLong {
                    client_msg_id,
                    len: recipient.len(),
                    consumed,
                });
            }
            check_user(recipient, t, client_msg_id, consumed)?;
            let kind = msg_kind(r.u8()?, t, client_msg_id, consumed)?;
            let payload = r.blob()?;
            check_payload(payload, max_frame, client_msg_id, consumed)?;
            ClientFrame::Send {
                client_msg_id,
                recipient: recipient.to_vec(),
                kind,
                payload: payload.to_vec(),
            }
        }
        ty::ACK => ClientFrame::Ack {
            ids: r.ids(consumed)?,
        },
        ty::RECEIPT => {
            let kind = receipt_kind(r.u8()?, t, consumed)?;
            let sender = r.user(consumed)?;
            ClientFrame::Receipt {
                kind,
                sender,
                ids: r.ids(consumed)?,
            }
        }
        ty::TYPING => ClientFrame::Typing {
            target: r.user(consumed)?,
            typing: r.flag()?,
        },
        ty::STATUS_QUERY => ClientFrame::StatusQuery {
            user: r.user(consumed)?,
        },
        ty::PING => ClientFrame::Ping { nonce: r.u64()? },
        ty::PONG => ClientFrame::Pong { nonce: r.u64()? },
        ty::PREKEY_FETCH => ClientFrame::PrekeyFetch {
            user: r.user(consumed)?,
        },
        ty::PREKEY_UPLOAD => ClientFrame::PrekeyUpload {
            bundle: r.bundle(consumed)?,
        },
        _ => return Ok(Decoded::Unknown { ty: t, consumed }),
    };
    r.end()?;
    Ok(Decoded::Frame { frame, consumed })
}

/// Decodes the server frame at the head of `buf` (see the module documentation). Never
/// panics; a `consumed` or `skip` is always between 5 and `buf.len()`.
pub fn decode_server(buf: &[u8], max_frame: usize) -> Result<Decoded<ServerFrame>, WireError> {
    let (t, body, consumed) = match head(buf, max_frame)? {
        Head::Incomplete(total) => return Ok(Decoded::Incomplete { total }),
        Head::Whole { ty, body, consumed } => (ty, body, consumed),
    };
    let mut r = Reader { b: body, ty: t };
    let frame = match t {
        ty::HELLO_OK => ServerFrame::HelloOk {
            version: r.u8()?,
            max_frame_bytes: r.u32()?,
            ping_interval_ms: r.u32()?,
            send_rate_per_sec: r.u32()?,
            send_burst: r.u32()?,
            session_id: r.u64()?,
            server_time_unix_ms: r.u64()?,
        },
        ty::SEND_ACK => ServerFrame::SendAck {
            client_msg_id: r.u64()?,
            server_id: r.u64()?,
            server_time_unix_ms: r.u64()?,
        },
        ty::DELIVER => {
            let server_id = r.u64()?;
            let sender = r.user(consumed)?;
            let server_time_unix_ms = r.u64()?;
            let kind = msg_kind(r.u8()?, t, 0, consumed)?;
            let payload = r.blob()?;
            check_payload(payload, max_frame, 0, consumed)?;
            ServerFrame::Deliver {
                server_id,
                sender,
                server_time_unix_ms,
                kind,
                payload: payload.to_vec(),
            }
        }
        ty::S_RECEIPT => {
            let kind = receipt_kind(r.u8()?, t, consumed)?;
            ServerFrame::Receipt {
                kind,
                reader: r.user(consumed)?,
                unix_ms: r.u64()?,
                ids: r.ids(consumed)?,
            }
        }
        ty::S_TYPING => ServerFrame::Typing {
            sender: r.user(consumed)?,
            typing: r.flag()?,
        },
        ty::STATUS => ServerFrame::Status {
            user: r.user(consumed)?,
            online: r.flag()?,
            last_seen_unix_secs: r.u64()?,
        },
        ty::S_PING => ServerFrame::Ping { nonce: r.u64()? },
        ty::S_PONG => ServerFrame::Pong { nonce: r.u64()? },
        ty::PREKEYS => ServerFrame::Prekeys {
            user: r.user(consumed)?,
            bundle: r.bundle(consumed)?,
        },
        ty::RATE_LIMITED => ServerFrame::RateLimited {
            what: LimitedAction::from_u8(r.u8()?).ok_or(WireError::BadFrame { ty: t })?,
            retry_after_ms: r.u32()?,
            reference: r.u64()?,
        },
        ty::ERROR => {
            let code = r.u16()?;
            let reason = r.str()?;
            if !reason.is_ascii() {
                return Err(WireError::BadFrame { ty: t });
            }
            ServerFrame::Error {
                code,
                reason: String::from_utf8_lossy(reason).into_owned(),
                reference: r.u64()?,
            }
        }
        _ => return Ok(Decoded::Unknown { ty: t, consumed }),
    };
    r.end()?;
    Ok(Decoded::Frame { frame, consumed })
}

/// The head of a buffer: not all there, or a whole frame's type, body and size.
enum Head<'a> {
    Incomplete(Option<usize>),
    Whole {
        ty: u8,
        body: &'a [u8],
        consumed: usize,
    },
}

/// Steps 1–3 of the module documentation.
fn head(buf: &[u8], max_frame: usize) -> Result<Head<'_>, WireError> {
    let Some(&[a, b, c, d]) = buf.get(..LEN_BYTES) else {
        return Ok(Head::Incomplete(None));
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    let too_large = WireError::FrameTooLarge {
        len,
        max: max_frame,
    };
    let n = usize::try_from(len).map_err(|_| too_large.clone())?;
    if n > max_frame {
        return Err(too_large);
    }
    let total = n.checked_add(LEN_BYTES).ok_or(too_large)?;
    match (buf.get(LEN_BYTES), buf.get(LEN_BYTES + 1..total)) {
        (Some(&ty), Some(body)) => Ok(Head::Whole {
            ty,
            body,
            consumed: total,
        }),
        _ => Ok(Head::Incomplete(Some(total))),
    }
}

/// A user name's length is 1..=[`MAX_USER_BYTES`].
fn check_user(user: &[u8], ty: u8, reference: u64, consumed: usize) -> Result<(), WireError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(WireError::BadUser {
            ty,
            len: user.len(),
            reference,
            consumed,
        });
    }
    Ok(())
}

/// A payload leaves [`FRAME_OVERHEAD_BYTES`] of the maximum frame.
fn check_payload(
    payload: &[u8],
    max_frame: usize,
    reference: u64,
    consumed: usize,
) -> Result<(), WireError> {
    let max = max_frame.saturating_sub(FRAME_OVERHEAD_BYTES);
    if payload.len() > max {
        return Err(WireError::PayloadTooLarge {
            reference,
            len: payload.len(),
            max,
            consumed,
        });
    }
    Ok(())
}

fn msg_kind(b: u8, ty: u8, reference: u64, consumed: usize) -> Result<MsgKind, WireError> {
    MsgKind::from_u8(b).ok_or(WireError::UnknownKind {
        ty,
        kind: b,
        reference,
        consumed,
    })
}

fn receipt_kind(b: u8, ty: u8, consumed: usize) -> Result<ReceiptKind, WireError> {
    ReceiptKind::from_u8(b).ok_or(WireError::UnknownKind {
        ty,
        kind: b,
        reference: 0,
        consumed,
    })
}

/// Reads the fields of a whole body; running short is [`WireError::BadFrame`].
struct Reader<'a> {
    b: &'a [u8],
    ty: u8,
}

impl<'a> Reader<'a> {
    fn bad(&self) -> WireError {
        WireError::BadFrame { ty: self.ty }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.b.len() {
            return Err(self.bad());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let b = self.take(N)?;
        b.try_into().map_err(|_| self.bad())
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A 0/1 byte.
    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.bad()),
        }
    }

    /// `u16 len | bytes`.
    fn str(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// `u32 len | bytes`.
    fn blob(&mut self) -> Result<&'a [u8], WireError> {
        let n = usize::try_from(self.u32()?).map_err(|_| self.bad())?;
        self.take(n)
    }

    /// A user name (str, 1..=256 bytes) outside SEND.
    fn user(&mut self, consumed: usize) -> Result<Vec<u8>, WireError> {
        let u = self.str()?;
        check_user(u, self.ty, 0, consumed)?;
        Ok(u.to_vec())
    }

    /// A prekey bundle (blob, at most [`MAX_PREKEY_BYTES`]).
    fn bundle(&mut self, consumed: usize) -> Result<Vec<u8>, WireError> {
        let b = self.blob()?;
        if b.len() > MAX_PREKEY_BYTES {
            return Err(WireError::PrekeysTooLarge {
                len: b.len(),
                consumed,
            });
        }
        Ok(b.to_vec())
    }

    /// An id list: `u16 count` (1..=[`MAX_ACK_IDS`]) then `count × u64`.
    fn ids(&mut self, consumed: usize) -> Result<Vec<u64>, WireError> {
        let count = self.u16()?;
        if count == 0 || usize::from(count) > MAX_ACK_IDS {
            return Err(WireError::BadIdCount {
                ty: self.ty,
                count,
                consumed,
            });
        }
        (0..count).map(|_| self.u64()).collect()
    }

    /// The body must end here.
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad())
        }
    }
}
