//! [`Event`]: what [`crate::Client::recv`] returns.

use iris_wire::v2::{LimitedAction, MsgKind, ReceiptKind};

/// Something the server said, or a change of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A message for this user. Acked automatically once returned by `recv` (unless
    /// `manual_ack`); a redelivery of the same `server_id` is not returned again.
    Deliver {
        /// The message's server id.
        server_id: u64,
        /// Who sent it.
        sender: Vec<u8>,
        /// Payload kind.
        kind: MsgKind,
        /// Payload.
        payload: Vec<u8>,
        /// The server's accept time.
        server_time_unix_ms: u64,
    },
    /// A send is durable on the server (the "sent" tick); it left the outbox.
    SendAck {
        /// What [`crate::Client::send`] returned.
        client_msg_id: u64,
        /// The message's server id (receipts name it).
        server_id: u64,
        /// The server's accept time.
        server_time_unix_ms: u64,
    },
    /// A receipt for messages this user sent.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// Who delivered/read them.
        reader: Vec<u8>,
        /// When, Unix milliseconds.
        unix_ms: u64,
        /// Server ids of this user's messages.
        ids: Vec<u64>,
    },
    /// A peer started or stopped typing.
    Typing {
        /// Who.
        sender: Vec<u8>,
        /// Typing now.
        typing: bool,
    },
    /// The answer to [`crate::Client::status`].
    Status {
        /// The user asked about.
        user: Vec<u8>,
        /// Connected now.
        online: bool,
        /// Last disconnect, Unix seconds; 0 while online or never seen.
        last_seen_unix_secs: u64,
    },
    /// The answer to [`crate::Client::prekeys_fetch`] (empty bundle: none).
    Prekeys {
        /// Whose bundle.
        user: Vec<u8>,
        /// The CBOR map.
        bundle: Vec<u8>,
    },
    /// The answer to [`crate::Client::ping`].
    Pong {
        /// The nonce `ping` returned.
        nonce: u64,
    },
    /// The server limited an action. A limited SEND stays in the outbox and is sent again
    /// by the client after `retry_after_ms`.
    RateLimited {
        /// What was limited.
        what: LimitedAction,
        /// Retry after this long.
        retry_after_ms: u32,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
    },
    /// An ERROR frame. With a `reference` (a client_msg_id) the send failed for good and left
    /// the outbox, except `store_unavailable` (2000), which the client retries after 1 s.
    Error {
        /// Wire code (`iris_wire::v2::ErrorCode::from_code`).
        code: u16,
        /// Its reason.
        reason: String,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
    },
    /// The connection dropped and a new one is logged in; un-acked sends were sent again.
    Reconnected,
}
