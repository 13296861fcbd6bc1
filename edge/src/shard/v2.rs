//! Protocol v2 on a shard (docs/PROTOCOL-v2.md): the per-connection v2 state and the writer
//! side, which turns what the rest of the shard produces into v2 frames.
//!
//! The shard speaks v1 internally: deliveries, relays, status answers, errors and LOGIN_OK are
//! v1 server frames built once and handed to every session they are for, whatever its protocol.
//! A v2 connection's output path ([`transcode`]) reads those v1 frames and writes their v2
//! equivalents (a v1 `0x10 RELIABLE_MSG` becomes `DELIVER`, `0x72` `TYPING`, `0x75` a read
//! `RECEIPT`, `0xFE` `ERROR`, `0xFF` `RATE_LIMITED`, `0x22` `PREKEYS`, LOGIN_OK `HELLO_OK`).
//! Messages carry their sender and kind beside the v1 frame ([`super::Meta`]), so a v2
//! recipient's DELIVER names its sender; drained messages carry theirs from the store.
//!
//! One internal frame exists only between shards: [`DELIVERED_RECEIPT_RELAY`], a v2 "delivered"
//! receipt, laid out like v1's `0x75`; v1 has no such frame, so v1 connections never write it.
//!
//! The reading side (HELLO, SEND with its durability confirmation, ACK, ...) lives in
//! `conn.rs` beside v1's, and the confirmations in `mod.rs` ([`super::Shard::confirmed`]).

use std::collections::VecDeque;
use std::time::Instant;

use iris_wire::v2::{
    encode_server, ErrorCode, LimitedAction, MsgKind, ReceiptKind, ServerFrame, VERSION,
};

use super::Shard;
use crate::protocol::frame::sop;
use crate::protocol::MsgId;

/// Internal relay opcode of a v2 "delivered" receipt (same layout as v1's `0x75`); never
/// written to a v1 connection.
pub const DELIVERED_RECEIPT_RELAY: u8 = 0x76;

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    V1,
    V2,
}

/// What a v2 connection keeps besides the shared connection state.
#[derive(Debug)]
pub struct V2State {
    /// HELLO accepted (the session may be still registering).
    pub hello: bool,
    /// Users of the PREKEY_FETCHes not answered yet, in order (the core answers in order).
    pub prekey_users: VecDeque<Vec<u8>>,
    /// SEND token bucket (`v2.send_rate_per_sec`).
    pub sends: Option<crate::ratelimit::TokenBucket>,
    /// SENDs waiting for the core's confirmation.
    pub unconfirmed: u32,
    /// The last time a byte arrived from the client.
    pub last_in: Instant,
    /// The nonce of the last server PING.
    pub ping_nonce: u64,
}

impl V2State {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            hello: false,
            prekey_users: VecDeque::new(),
            sends: None,
            unconfirmed: 0,
            last_in: Instant::now(),
            ping_nonce: 0,
        })
    }
}

/// Unix milliseconds of a message id's accept time (`idgen.rs` layout).
pub fn id_time_ms(id: u64) -> u64 {
    (id >> iris_bus::hops::ID_LOW_BITS)
        .saturating_mul(iris_bus::hops::ID_TICK_MICROS)
        .saturating_add(iris_bus::hops::ID_EPOCH_MICROS)
        / 1000
}

/// The wire byte of a v1 message's kind, see [`super::Meta::kind`].
pub fn kind_of(b: u8) -> MsgKind {
    MsgKind::from_u8(b).unwrap_or(MsgKind::Plain)
}

/// The kind of a drained message (the store keeps no kind): 2 when the payload is a whole
/// E2EE inner frame (`0x24`, as v1 and v2 E2EE sends store it), else 0. A CBOR message sent
/// as kind 1 is drained as kind 0 (docs/PROTOCOL-v2.md).
pub fn stored_kind(payload: &[u8]) -> u8 {
    let is_e2ee = payload.first() == Some(&crate::protocol::frame::sop::E2EE_DELIVERY)
        && crate::protocol::frame::decode_e2ee_delivery(payload).is_ok();
    if is_e2ee {
        2
    } else {
        0
    }
}

/// Appends a DELIVER. A kind 2 message is stored as v1's `0x24` inner frame (what v1
/// recipients get); a v2 recipient gets its `u16 hlen | header | u32 clen | ciphertext`
/// (docs/PROTOCOL-v2.md "v1 ↔ v2"), the sender being DELIVER's own field.
pub fn encode_deliver(out: &mut Vec<u8>, id: u64, sender: &[u8], kind: u8, payload: &[u8]) {
    let payload = match (kind, crate::protocol::frame::decode_e2ee_delivery(payload)) {
        (2, Ok(e)) => {
            let mut body = Vec::with_capacity(6 + e.header.len() + e.ciphertext.len());
            body.extend_from_slice(&(e.header.len() as u16).to_be_bytes());
            body.extend_from_slice(e.header);
            body.extend_from_slice(&(e.ciphertext.len() as u32).to_be_bytes());
            body.extend_from_slice(e.ciphertext);
            body
        }
        _ => payload.to_vec(),
    };
    encode_server(
        &ServerFrame::Deliver {
            server_id: id,
            sender: sender.to_vec(),
            server_time_unix_ms: id_time_ms(id),
            kind: kind_of(kind),
            payload,
        },
        out,
    );
}

/// The v2 error for a v1 `0xFE` reason (the shard's refusals and protocol errors).
pub fn error_for_reason(reason: &[u8]) -> ErrorCode {
    if let Some(c) = ErrorCode::ALL
        .iter()
        .find(|c| c.reason().as_bytes() == reason)
    {
        return *c;
    }
    match reason {
        b"not_logged_in" => ErrorCode::HelloRequired,
        b"login_timeout" | b"hello_timeout" => ErrorCode::IdleTimeout,
        b"group_service_unavailable" => ErrorCode::ServiceUnavailable,
        _ => ErrorCode::BadFrame,
    }
}

/// Reads the v1 server frames in `v1` and appends their v2 equivalents to `out`. A frame this
/// does not know (none is expected) is dropped.
pub fn transcode(shard: &Shard, conn: u64, v2: &mut V2State, mut v1: &[u8], out: &mut Vec<u8>) {
    while let Some((&opcode, rest)) = v1.split_first() {
        let Some((frame, used)) = parse_v1(opcode, rest) else {
            return;
        };
        v1 = &rest[used..];
        let f = match frame {
            V1Out::LoginOk => ServerFrame::HelloOk {
                version: VERSION,
                max_frame_bytes: shard.cfg.v2.max_frame_bytes,
                ping_interval_ms: shard.cfg.v2.ping_interval_ms,
                send_rate_per_sec: shard.cfg.v2.send_rate_per_sec,
                send_burst: shard.cfg.v2.send_burst,
                session_id: (conn << 8) | shard.id as u64,
                server_time_unix_ms: crate::idgen::now_micros() / 1000,
            },
            V1Out::Reliable { id, payload } => ServerFrame::Deliver {
                server_id: id,
                sender: Vec::new(),
                server_time_unix_ms: id_time_ms(id),
                kind: MsgKind::Plain,
                payload: payload.to_vec(),
            },
            V1Out::Status {
                user,
                online,
                last_seen,
            } => ServerFrame::Status {
                user: user.to_vec(),
                online,
                last_seen_unix_secs: last_seen,
            },
            V1Out::Typing { sender, on } => ServerFrame::Typing {
                sender: sender.to_vec(),
                typing: on,
            },
            V1Out::Receipt {
                delivered,
                id,
                reader,
                unix_ms,
            } => {
                let Some(id) = MsgId::parse(id) else {
                    continue; // a v1 client's receipt of an id it made up: nothing to name
                };
                ServerFrame::Receipt {
                    kind: if delivered {
                        ReceiptKind::Delivered
                    } else {
                        ReceiptKind::Read
                    },
                    reader: reader.to_vec(),
                    unix_ms,
                    ids: vec![id.0],
                }
            }
            V1Out::Error(reason) => ServerFrame::error(error_for_reason(reason), 0),
            V1Out::RateLimited(ms) => ServerFrame::RateLimited {
                what: LimitedAction::Send,
                retry_after_ms: ms,
                reference: 0,
            },
            V1Out::Prekeys(body) => {
                let user = v2.prekey_users.pop_front().unwrap_or_default();
                let bundle = if body == crate::protocol::cbor::NOT_FOUND_BUNDLE {
                    Vec::new()
                } else {
                    body.to_vec()
                };
                ServerFrame::Prekeys { user, bundle }
            }
        };
        encode_server(&f, out);
    }
}

/// One v1 server frame, borrowed.
enum V1Out<'a> {
    LoginOk,
    Reliable {
        id: u64,
        payload: &'a [u8],
    },
    Status {
        user: &'a [u8],
        online: bool,
        last_seen: u64,
    },
    Typing {
        sender: &'a [u8],
        on: bool,
    },
    Receipt {
        delivered: bool,
        id: &'a [u8],
        reader: &'a [u8],
        unix_ms: u64,
    },
    Error(&'a [u8]),
    RateLimited(u32),
    Prekeys(&'a [u8]),
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the body of the v1 server frame `opcode` at the head of `b`: the frame and the body
/// bytes it took.
fn parse_v1(opcode: u8, b: &[u8]) -> Option<(V1Out<'_>, usize)> {
    match opcode {
        sop::LOGIN_OK => {
            let n = crate::protocol::frame::LOGIN_OK_TEXT.len();
            (b.get(..n)? == crate::protocol::frame::LOGIN_OK_TEXT).then_some((V1Out::LoginOk, n))
        }
        sop::RELIABLE_MSG => {
            let idlen = u16_at(b, 0)?;
            let id = MsgId::parse(b.get(2..2 + idlen)?)?;
            let mlen = u32_at(b, 2 + idlen)? as usize;
            let at = 6 + idlen;
            let payload = b.get(at..at + mlen)?;
            Some((V1Out::Reliable { id: id.0, payload }, at + mlen))
        }
        sop::STATUS => {
            let ulen = u16_at(b, 0)?;
            let user = b.get(2..2 + ulen)?;
            let online = *b.get(2 + ulen)? == 1;
            let last_seen = u64_at(b, 3 + ulen)?;
            Some((
                V1Out::Status {
                    user,
                    online,
                    last_seen,
                },
                11 + ulen,
            ))
        }
        sop::TYPING_RELAY => {
            let slen = u16_at(b, 0)?;
            let sender = b.get(2..2 + slen)?;
            let on = *b.get(2 + slen)? == 1;
            Some((V1Out::Typing { sender, on }, 3 + slen))
        }
        sop::READ_RECEIPT_RELAY | DELIVERED_RECEIPT_RELAY => {
            let ilen = u16_at(b, 0)?;
            let id = b.get(2..2 + ilen)?;
            let rlen = u16_at(b, 2 + ilen)?;
            let reader = b.get(4 + ilen..4 + ilen + rlen)?;
            let unix_ms = u64_at(b, 4 + ilen + rlen)?;
            Some((
                V1Out::Receipt {
                    delivered: opcode == DELIVERED_RECEIPT_RELAY,
                    id,
                    reader,
                    unix_ms,
                },
                12 + ilen + rlen,
            ))
        }
        sop::ERROR => {
            let len = u16_at(b, 0)?;
            Some((V1Out::Error(b.get(2..2 + len)?), 2 + len))
        }
        sop::RATE_LIMITED => Some((V1Out::RateLimited(u32_at(b, 0)?), 4)),
        sop::PREKEY_RESPONSE => {
            let len = u32_at(b, 0)? as usize;
            Some((V1Out::Prekeys(b.get(4..4 + len)?), 4 + len))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame;

    #[test]
    fn v1_frames_are_parsed_whole() {
        let mut v1 = Vec::new();
        frame::encode_reliable(&mut v1, MsgId(0x1234), b"hello");
        frame::encode_status(&mut v1, b"bob", true, 0);
        frame::encode_typing(&mut v1, b"carol", true);
        frame::encode_receipt_relay(&mut v1, MsgId(7).to_string().as_bytes(), b"dave", 99);
        frame::encode_error(&mut v1, "recipient_inbox_full");
        frame::encode_rate_limited(&mut v1, 1000);
        frame::encode_login_ok(&mut v1);
        let mut b = &v1[..];
        let mut seen = Vec::new();
        while let Some((&o, rest)) = b.split_first() {
            let (f, n) = parse_v1(o, rest).expect("a whole frame");
            seen.push(match f {
                V1Out::Reliable { id, payload } => format!("msg {id} {payload:?}"),
                V1Out::Status { user, online, .. } => format!("status {user:?} {online}"),
                V1Out::Typing { sender, on } => format!("typing {sender:?} {on}"),
                V1Out::Receipt { id, unix_ms, .. } => format!("receipt {id:?} {unix_ms}"),
                V1Out::Error(r) => format!("error {}", String::from_utf8_lossy(r)),
                V1Out::RateLimited(ms) => format!("limited {ms}"),
                V1Out::LoginOk => "login ok".to_owned(),
                V1Out::Prekeys(_) => "prekeys".to_owned(),
            });
            b = &rest[n..];
        }
        assert_eq!(seen.len(), 7, "{seen:?}");
        assert_eq!(seen[0], format!("msg {} {:?}", 0x1234, b"hello"));
        assert_eq!(seen[4], "error recipient_inbox_full");
        assert_eq!(seen[5], "limited 1000");
        assert_eq!(seen[6], "login ok");
    }

    #[test]
    fn a_truncated_v1_frame_is_not_parsed() {
        let mut v1 = Vec::new();
        frame::encode_reliable(&mut v1, MsgId(1), b"hello");
        for cut in 1..v1.len() {
            assert!(parse_v1(v1[0], &v1[1..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn id_time_is_the_accept_time() {
        let mut g = crate::idgen::IdGen::new(0, 0, 1, 0, Default::default());
        let now = crate::idgen::now_micros() / 1000;
        let t = id_time_ms(g.next_id());
        assert!(t.abs_diff(now) < 1000, "{t} vs {now}");
    }
}
