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

use iris_core::api::{KIND_UNRECORDED, RESUME_IDS_MAX};

use super::Shard;
use crate::protocol::frame::{self, sop, ServerFrame as V1Frame};
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
    /// HELLO's `resume_after` (0: none), sent with the session's first drain request.
    pub resume_after: u64,
    /// The ids of the messages written to this connection and not acked on it, in write order
    /// (the last [`RESUME_IDS_MAX`]): sent to the core when the session ends, for the next
    /// session's `resume_after` (docs/PROTOCOL-v2.md).
    pub written: VecDeque<u64>,
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
            resume_after: 0,
            written: VecDeque::new(),
        })
    }

    /// Message `id` was written to the connection's output queue (after everything before it).
    /// True when the list was full and its oldest id was forgotten.
    pub fn wrote(&mut self, id: u64) -> bool {
        let full = self.written.len() == RESUME_IDS_MAX;
        if full {
            self.written.pop_front();
        }
        self.written.push_back(id);
        full
    }

    /// The client acked `ids`: they need no resume. One pass over the list whatever the ids
    /// (an ACK of ids never written costs no more than one of written ones).
    pub fn acked(&mut self, ids: &[u64]) {
        if self.written.is_empty() {
            return;
        }
        match ids {
            [one] => self.written.retain(|w| w != one),
            _ => {
                let ids: std::collections::HashSet<u64> = ids.iter().copied().collect();
                self.written.retain(|w| !ids.contains(w));
            }
        }
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

/// The kind of a message as the store or the bus gave it: `kind` itself, except for
/// [`KIND_UNRECORDED`] (a message stored by a build that kept no kind), whose kind is derived
/// from the payload ([`stored_kind`]).
pub fn resolve_kind(kind: u8, payload: &[u8]) -> u8 {
    if kind == KIND_UNRECORDED {
        stored_kind(payload)
    } else {
        kind
    }
}

/// The kind of a message stored without one ([`KIND_UNRECORDED`]): 2 when the payload is a
/// whole E2EE inner frame (`0x24`, as v1 and v2 E2EE sends store it), else 0 (a CBOR message
/// of such a store comes as kind 0).
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

/// Reads the v1 server frames in `v1` (with the shard's own v1 decoder,
/// [`frame::decode_server`]) and appends their v2 equivalents to `out`. A frame that does not
/// decode (none is expected) ends the transcoding of this batch.
pub fn transcode(shard: &Shard, conn: u64, v2: &mut V2State, mut v1: &[u8], out: &mut Vec<u8>) {
    while !v1.is_empty() {
        // The internal "delivered" receipt has v1's 0x75 layout: decoded as one.
        let delivered = v1[0] == DELIVERED_RECEIPT_RELAY;
        let relabelled;
        let buf = if delivered {
            let mut b = v1.to_vec();
            b[0] = sop::READ_RECEIPT_RELAY;
            relabelled = b;
            &relabelled[..]
        } else {
            v1
        };
        let Ok(Some((frame, used))) = frame::decode_server(buf) else {
            return;
        };
        let f = match frame {
            V1Frame::LoginOk => ServerFrame::HelloOk {
                version: VERSION,
                max_frame_bytes: shard.cfg.v2.max_frame_bytes,
                ping_interval_ms: shard.cfg.v2.ping_interval_ms,
                send_rate_per_sec: shard.cfg.v2.send_rate_per_sec,
                send_burst: shard.cfg.v2.send_burst,
                session_id: (conn << 8) | shard.id as u64,
                server_time_unix_ms: crate::idgen::now_micros() / 1000,
            },
            V1Frame::Reliable { id, payload } => match MsgId::parse(id) {
                Some(id) => ServerFrame::Deliver {
                    server_id: id.0,
                    sender: Vec::new(),
                    server_time_unix_ms: id_time_ms(id.0),
                    kind: MsgKind::Plain,
                    payload: payload.to_vec(),
                },
                None => return,
            },
            V1Frame::Status {
                user,
                online,
                last_seen,
            } => ServerFrame::Status {
                user: user.to_vec(),
                online,
                last_seen_unix_secs: last_seen,
            },
            V1Frame::Typing { sender, on } => ServerFrame::Typing {
                sender: sender.to_vec(),
                typing: on,
            },
            V1Frame::ReceiptRelay {
                id,
                reader,
                unix_ms,
            } => match MsgId::parse(id) {
                Some(id) => ServerFrame::Receipt {
                    kind: if delivered {
                        ReceiptKind::Delivered
                    } else {
                        ReceiptKind::Read
                    },
                    reader: reader.to_vec(),
                    unix_ms,
                    ids: vec![id.0],
                },
                // A v1 client's receipt of an id it made up: nothing to name.
                None => {
                    v1 = &v1[used..];
                    continue;
                }
            },
            V1Frame::Error { reason } => ServerFrame::error(error_for_reason(reason), 0),
            V1Frame::RateLimited { retry_after_ms } => ServerFrame::RateLimited {
                what: LimitedAction::Send,
                retry_after_ms,
                reference: 0,
            },
            V1Frame::PrekeyResponse { cbor } => {
                let user = v2.prekey_users.pop_front().unwrap_or_default();
                let bundle = if cbor == crate::protocol::cbor::NOT_FOUND_BUNDLE {
                    Vec::new()
                } else {
                    cbor.to_vec()
                };
                ServerFrame::Prekeys { user, bundle }
            }
        };
        v1 = &v1[used..];
        encode_server(&f, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_wire::v2::{decode_server, Decoded};

    #[test]
    fn id_time_is_the_accept_time() {
        let mut g = crate::idgen::IdGen::new(0, 0, 1, 0, Default::default());
        let now = crate::idgen::now_micros() / 1000;
        let t = id_time_ms(g.next_id());
        assert!(t.abs_diff(now) < 1000, "{t} vs {now}");
    }

    #[test]
    fn a_drained_e2ee_frame_is_kind_2_and_delivered_as_the_v2_body() {
        let mut inner = Vec::new();
        frame::encode_e2ee_delivery(&mut inner, b"carol", b"h", b"cipher");
        assert_eq!(stored_kind(&inner), 2);
        assert_eq!(stored_kind(b"plain bytes"), 0);
        assert_eq!(resolve_kind(KIND_UNRECORDED, &inner), 2);
        assert_eq!(resolve_kind(KIND_UNRECORDED, b"\xa0"), 0);
        assert_eq!(resolve_kind(1, b"\xa0"), 1);
        assert_eq!(resolve_kind(0, &inner), 0, "a recorded kind is kept");
        let mut out = Vec::new();
        encode_deliver(&mut out, 1 << 18, b"carol", 2, &inner);
        match decode_server(&out, 1 << 20) {
            Ok(Decoded::Frame {
                frame:
                    ServerFrame::Deliver {
                        sender, payload, ..
                    },
                ..
            }) => {
                assert_eq!(sender, b"carol");
                assert_eq!(payload, b"\x00\x01h\x00\x00\x00\x06cipher");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The written list keeps write order, drops acked ids, and holds the last
    /// `RESUME_IDS_MAX` ids.
    #[test]
    fn the_written_list_keeps_order_drops_acked_ids_and_is_bounded() {
        let mut v2 = V2State::new();
        for id in [5, 3, 9, 7] {
            assert!(!v2.wrote(id));
        }
        v2.acked(&[3]);
        v2.acked(&[7, 42, 5]);
        assert_eq!(Vec::from(v2.written.clone()), vec![9]);
        let forgotten = (0..RESUME_IDS_MAX as u64 + 10)
            .filter(|id| v2.wrote(1000 + id))
            .count();
        assert_eq!(forgotten, 11, "the 9 and 10 of the new ids");
        assert_eq!(v2.written.len(), RESUME_IDS_MAX);
        assert_eq!(v2.written.front(), Some(&1010));
        assert_eq!(v2.written.back(), Some(&(1000 + RESUME_IDS_MAX as u64 + 9)));
    }

    #[test]
    fn v1_reasons_map_to_their_v2_codes() {
        assert_eq!(
            error_for_reason(b"recipient_inbox_full"),
            ErrorCode::RecipientInboxFull
        );
        assert_eq!(
            error_for_reason(b"store_unavailable"),
            ErrorCode::StoreUnavailable
        );
        assert_eq!(error_for_reason(b"not_logged_in"), ErrorCode::HelloRequired);
        assert_eq!(error_for_reason(b"something else"), ErrorCode::BadFrame);
    }
}
