//! The frames of protocol v2, their type bytes, and the protocol's limits.
//!
//! A frame on the wire is `u32 len | u8 type | body` (big-endian; `len` counts the type byte
//! and the body, never the 4 length bytes). Field encodings: `u8`/`u16`/`u32`/`u64` big-endian;
//! a *str* is `u16 len | bytes` (any bytes, UTF-8 not required: user names are bytes); a *blob*
//! is `u32 len | bytes`; an *id list* is `u16 count | count × u64`.
//!
//! Client type bytes are `0x01..=0x0A`, server type bytes `0x81..=0x8B`: the high bit says the
//! direction, so a frame sent the wrong way is an unknown type. A server frame that answers a
//! client frame has the client's type byte with the high bit set: HELLO `0x01` → HELLO_OK
//! `0x81`, SEND `0x02` → SEND_ACK `0x82`, STATUS_QUERY `0x06` → STATUS `0x86`, PREKEY_FETCH
//! `0x09` → PREKEYS `0x89`; PING and PONG exist in both directions (`0x07`/`0x87`,
//! `0x08`/`0x88`).

/// The protocol version a HELLO carries and HELLO_OK confirms.
pub const VERSION: u8 = 2;

/// Bytes of the length field that starts every frame.
pub const LEN_BYTES: usize = 4;

/// Longest user name (SEND recipient, RECEIPT original sender or reader, TYPING target or
/// sender, STATUS_QUERY/STATUS user, PREKEY_FETCH/PREKEYS user, DELIVER sender): 256 bytes.
/// A user name is never empty.
pub const MAX_USER_BYTES: usize = 256;

/// Most ids in one ACK or RECEIPT (and at least one).
pub const MAX_ACK_IDS: usize = 1024;

/// Largest PREKEY_UPLOAD bundle and PREKEYS bundle: 8 KiB.
pub const MAX_PREKEY_BYTES: usize = 8192;

/// Room a SEND payload leaves in a frame: a SEND or DELIVER payload may be at most
/// `max_frame_bytes - FRAME_OVERHEAD_BYTES`, so the DELIVER of any accepted SEND (whose sender
/// name may be longer than the recipient name) fits in `max_frame_bytes` too. DELIVER's own
/// fields take at most 1 + 8 + 2 + 256 + 8 + 1 + 4 = 280 bytes.
pub const FRAME_OVERHEAD_BYTES: usize = 512;

/// The default maximum frame (`len`) announced in HELLO_OK: 1 MiB of payload plus
/// [`FRAME_OVERHEAD_BYTES`].
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024 + FRAME_OVERHEAD_BYTES;

/// The smallest maximum frame a server may announce: every v1 message (the largest is a 256 KiB
/// CBOR_MSG) must fit in a DELIVER to a v2 recipient.
pub const MIN_MAX_FRAME_BYTES: usize = 256 * 1024 + FRAME_OVERHEAD_BYTES;

/// The maximum frame (`len`) a server accepts before it has sent HELLO_OK, i.e. for the HELLO
/// itself: 4 KiB (client name, version and token together).
pub const MAX_HELLO_FRAME_BYTES: usize = 4096;

/// The type byte of each frame.
pub mod ty {
    /// Client → server: HELLO.
    pub const HELLO: u8 = 0x01;
    /// Client → server: SEND.
    pub const SEND: u8 = 0x02;
    /// Client → server: ACK.
    pub const ACK: u8 = 0x03;
    /// Client → server: RECEIPT.
    pub const RECEIPT: u8 = 0x04;
    /// Client → server: TYPING.
    pub const TYPING: u8 = 0x05;
    /// Client → server: STATUS_QUERY.
    pub const STATUS_QUERY: u8 = 0x06;
    /// Client → server: PING.
    pub const PING: u8 = 0x07;
    /// Client → server: PONG.
    pub const PONG: u8 = 0x08;
    /// Client → server: PREKEY_FETCH.
    pub const PREKEY_FETCH: u8 = 0x09;
    /// Client → server: PREKEY_UPLOAD.
    pub const PREKEY_UPLOAD: u8 = 0x0A;

    /// Server → client: HELLO_OK.
    pub const HELLO_OK: u8 = 0x81;
    /// Server → client: SEND_ACK.
    pub const SEND_ACK: u8 = 0x82;
    /// Server → client: DELIVER.
    pub const DELIVER: u8 = 0x83;
    /// Server → client: RECEIPT.
    pub const S_RECEIPT: u8 = 0x84;
    /// Server → client: TYPING.
    pub const S_TYPING: u8 = 0x85;
    /// Server → client: STATUS.
    pub const STATUS: u8 = 0x86;
    /// Server → client: PING.
    pub const S_PING: u8 = 0x87;
    /// Server → client: PONG.
    pub const S_PONG: u8 = 0x88;
    /// Server → client: PREKEYS.
    pub const PREKEYS: u8 = 0x89;
    /// Server → client: RATE_LIMITED.
    pub const RATE_LIMITED: u8 = 0x8A;
    /// Server → client: ERROR.
    pub const ERROR: u8 = 0x8B;
}

/// What a message payload is (SEND and DELIVER `kind`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum MsgKind {
    /// 0: plain bytes (v1 SEND, BATCH_SEND entries, SEND_SEQ).
    Plain,
    /// 1: one CBOR map (v1 CBOR_MSG).
    Cbor,
    /// 2: end-to-end encrypted: `u16 hlen | header (CBOR map ≤ 1 KiB) | u32 clen | ciphertext
    /// (≤ 64 KiB)`, v1's E2EE_MSG (`0x23`) body after its recipient.
    E2ee,
}

impl MsgKind {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            MsgKind::Plain => 0,
            MsgKind::Cbor => 1,
            MsgKind::E2ee => 2,
        }
    }

    /// The kind of a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<MsgKind> {
        match b {
            0 => Some(MsgKind::Plain),
            1 => Some(MsgKind::Cbor),
            2 => Some(MsgKind::E2ee),
            _ => None,
        }
    }
}

/// What a RECEIPT says about the messages it names.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReceiptKind {
    /// 1: delivered to the reader's device.
    Delivered,
    /// 2: read by the reader.
    Read,
}

impl ReceiptKind {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            ReceiptKind::Delivered => 1,
            ReceiptKind::Read => 2,
        }
    }

    /// The kind of a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<ReceiptKind> {
        match b {
            1 => Some(ReceiptKind::Delivered),
            2 => Some(ReceiptKind::Read),
            _ => None,
        }
    }
}

/// What a RATE_LIMITED frame limits (`what`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitedAction {
    /// 1: SEND (the message named by `reference` was not accepted: send it again later).
    Send,
    /// 2: relays (TYPING, RECEIPT): dropped.
    Relay,
    /// 3: PREKEY_FETCH: not answered.
    PrekeyFetch,
    /// 4: logins (HELLO): the server closes the connection after this frame.
    Login,
}

impl LimitedAction {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            LimitedAction::Send => 1,
            LimitedAction::Relay => 2,
            LimitedAction::PrekeyFetch => 3,
            LimitedAction::Login => 4,
        }
    }

    /// The action of a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<LimitedAction> {
        match b {
            1 => Some(LimitedAction::Send),
            2 => Some(LimitedAction::Relay),
            3 => Some(LimitedAction::PrekeyFetch),
            4 => Some(LimitedAction::Login),
            _ => None,
        }
    }
}

/// A client → server frame. Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientFrame {
    /// `0x01`: `u8 version (2) | str client_name | str client_version | str token |
    /// u64 resume_after`. The first frame of every connection. `token` is `user` or `user:jwt`
    /// (v1's auth rules); `resume_after` is the highest server id the client has fully
    /// processed (0: none). The version byte is [`VERSION`], written by the encoder; the
    /// decoder refuses any other ([`crate::v2::WireError::UnsupportedVersion`]).
    Hello {
        /// Free-form client name (`str`).
        client_name: Vec<u8>,
        /// Free-form client version (`str`).
        client_version: Vec<u8>,
        /// `user` or `user:jwt` (`str`).
        token: Vec<u8>,
        /// Highest server id fully processed, 0 for none.
        resume_after: u64,
    },
    /// `0x02`: `u64 client_msg_id | str recipient | u8 kind | blob payload`.
    Send {
        /// Idempotency key, unique per sender.
        client_msg_id: u64,
        /// Recipient user name, 1..=[`MAX_USER_BYTES`].
        recipient: Vec<u8>,
        /// Payload kind.
        kind: MsgKind,
        /// Payload, at most `max_frame_bytes - FRAME_OVERHEAD_BYTES` bytes.
        payload: Vec<u8>,
    },
    /// `0x03`: `u16 count | count × u64 server id`, 1..=[`MAX_ACK_IDS`] ids.
    Ack {
        /// Server ids of delivered messages the client has processed.
        ids: Vec<u64>,
    },
    /// `0x04`: `u8 kind | str original_sender | u16 count | count × u64 server id`.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The sender of the messages named (who gets the receipt).
        sender: Vec<u8>,
        /// Server ids, 1..=[`MAX_ACK_IDS`].
        ids: Vec<u64>,
    },
    /// `0x05`: `str target | u8 state (1 typing, 0 stopped)`.
    Typing {
        /// Who is told.
        target: Vec<u8>,
        /// `true`: typing; `false`: stopped.
        typing: bool,
    },
    /// `0x06`: `str user`.
    StatusQuery {
        /// The user asked about.
        user: Vec<u8>,
    },
    /// `0x07`: `u64 nonce`; the server answers PONG with the same nonce.
    Ping {
        /// Echoed in the PONG.
        nonce: u64,
    },
    /// `0x08`: `u64 nonce`, the answer to a server PING.
    Pong {
        /// The server PING's nonce.
        nonce: u64,
    },
    /// `0x09`: `str user`; answered by PREKEYS.
    PrekeyFetch {
        /// Whose bundle.
        user: Vec<u8>,
    },
    /// `0x0A`: `blob bundle` (a CBOR map, at most [`MAX_PREKEY_BYTES`]).
    PrekeyUpload {
        /// The CBOR map.
        bundle: Vec<u8>,
    },
}

impl ClientFrame {
    /// The frame's type byte.
    pub fn ty(&self) -> u8 {
        match self {
            ClientFrame::Hello { .. } => ty::HELLO,
            ClientFrame::Send { .. } => ty::SEND,
            ClientFrame::Ack { .. } => ty::ACK,
            ClientFrame::Receipt { .. } => ty::RECEIPT,
            ClientFrame::Typing { .. } => ty::TYPING,
            ClientFrame::StatusQuery { .. } => ty::STATUS_QUERY,
            ClientFrame::Ping { .. } => ty::PING,
            ClientFrame::Pong { .. } => ty::PONG,
            ClientFrame::PrekeyFetch { .. } => ty::PREKEY_FETCH,
            ClientFrame::PrekeyUpload { .. } => ty::PREKEY_UPLOAD,
        }
    }
}

/// A server → client frame. Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerFrame {
    /// `0x81`: `u8 version | u32 max_frame_bytes | u32 ping_interval_ms | u32 send_rate_per_sec
    /// | u32 send_burst | u64 session_id | u64 server_time_unix_ms`.
    HelloOk {
        /// The protocol version spoken ([`VERSION`]).
        version: u8,
        /// Largest `len` the client may send (and the server sends).
        max_frame_bytes: u32,
        /// The server PINGs after this much silence; 3 silent intervals close the connection.
        ping_interval_ms: u32,
        /// SENDs per second allowed on this connection (0: no limit).
        send_rate_per_sec: u32,
        /// SENDs allowed in a burst above the rate.
        send_burst: u32,
        /// This session's id (for logs and support).
        session_id: u64,
        /// The server's clock.
        server_time_unix_ms: u64,
    },
    /// `0x82`: `u64 client_msg_id | u64 server_id | u64 server_time_unix_ms`: the message is
    /// durable.
    SendAck {
        /// The SEND's idempotency key.
        client_msg_id: u64,
        /// The message's server id.
        server_id: u64,
        /// The accept time (also readable from the id).
        server_time_unix_ms: u64,
    },
    /// `0x83`: `u64 server_id | str sender | u64 server_time_unix_ms | u8 kind | blob payload`.
    Deliver {
        /// The message's server id (ACK it).
        server_id: u64,
        /// Who sent it.
        sender: Vec<u8>,
        /// The accept time.
        server_time_unix_ms: u64,
        /// Payload kind.
        kind: MsgKind,
        /// Payload.
        payload: Vec<u8>,
    },
    /// `0x84`: `u8 kind | str reader | u64 unix_ms | u16 count | count × u64 server id`.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// Who delivered/read.
        reader: Vec<u8>,
        /// When, Unix milliseconds.
        unix_ms: u64,
        /// Server ids of the client's own messages, 1..=[`MAX_ACK_IDS`].
        ids: Vec<u64>,
    },
    /// `0x85`: `str sender | u8 state (1 typing, 0 stopped)`.
    Typing {
        /// Who is typing.
        sender: Vec<u8>,
        /// `true`: typing; `false`: stopped.
        typing: bool,
    },
    /// `0x86`: `str user | u8 online (1/0) | u64 last_seen_unix_secs` (0 while online or never).
    Status {
        /// The user asked about.
        user: Vec<u8>,
        /// Connected now.
        online: bool,
        /// Last disconnect, Unix seconds; 0 while online or never seen.
        last_seen_unix_secs: u64,
    },
    /// `0x87`: `u64 nonce`; the client answers PONG with the same nonce.
    Ping {
        /// Echoed in the PONG.
        nonce: u64,
    },
    /// `0x88`: `u64 nonce`, the answer to a client PING.
    Pong {
        /// The client PING's nonce.
        nonce: u64,
    },
    /// `0x89`: `str user | blob bundle` (a CBOR map; empty: no bundle for that user).
    Prekeys {
        /// Whose bundle.
        user: Vec<u8>,
        /// The CBOR map, at most [`MAX_PREKEY_BYTES`]; empty when not found.
        bundle: Vec<u8>,
    },
    /// `0x8A`: `u8 what | u32 retry_after_ms | u64 reference`.
    RateLimited {
        /// What was limited.
        what: LimitedAction,
        /// Try again after this long.
        retry_after_ms: u32,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
    },
    /// `0x8B`: `u16 code | str reason (ASCII) | u64 reference`. `code` and `reason` come from
    /// [`crate::v2::ErrorCode`]; a client should act on `code` (a newer server may send codes
    /// this crate does not know). The encoder writes each non-ASCII byte of `reason` as `?`;
    /// the decoder refuses a non-ASCII reason.
    Error {
        /// The error code.
        code: u16,
        /// Its ASCII reason.
        reason: String,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
    },
}

impl ServerFrame {
    /// The frame's type byte.
    pub fn ty(&self) -> u8 {
        match self {
            ServerFrame::HelloOk { .. } => ty::HELLO_OK,
            ServerFrame::SendAck { .. } => ty::SEND_ACK,
            ServerFrame::Deliver { .. } => ty::DELIVER,
            ServerFrame::Receipt { .. } => ty::S_RECEIPT,
            ServerFrame::Typing { .. } => ty::S_TYPING,
            ServerFrame::Status { .. } => ty::STATUS,
            ServerFrame::Ping { .. } => ty::S_PING,
            ServerFrame::Pong { .. } => ty::S_PONG,
            ServerFrame::Prekeys { .. } => ty::PREKEYS,
            ServerFrame::RateLimited { .. } => ty::RATE_LIMITED,
            ServerFrame::Error { .. } => ty::ERROR,
        }
    }

    /// The ERROR frame for `code` with its reason and `reference` (a client_msg_id, or 0).
    pub fn error(code: crate::v2::ErrorCode, reference: u64) -> ServerFrame {
        ServerFrame::Error {
            code: code.code(),
            reason: code.reason().to_owned(),
            reference,
        }
    }
}
