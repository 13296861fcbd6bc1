//! The wire error table ([`ErrorCode`]) and the decoders' errors ([`WireError`]).
//!
//! Every ERROR frame the server sends carries a code of [`ErrorCode`] with its reason text, and
//! this file is the one place where both are defined: [`ErrorCode::code`], [`ErrorCode::reason`]
//! and [`ErrorCode::closes`] (whether the server closes the connection after sending it).
//! Client errors (the client sent something wrong) are `1xxx`, server errors `2xxx`.
//!
//! [`WireError`] is every way [`super::decode_client`] / [`super::decode_server`] refuse bytes.
//! Each maps to exactly one code ([`WireError::error_code`]). A refusal either ends the
//! connection (the frame's extent cannot be trusted or the client is broken:
//! [`WireError::skip`] is `None`), or names a well-delimited frame the caller skips
//! (`skip() == Some(consumed)`) after answering ERROR, keeping the connection open.

use super::frame::ServerFrame;

/// Every wire error code of protocol v2 (`docs/PROTOCOL-v2.md`, "Errors").
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1000 `bad_frame`: a body that does not match its type's layout (a field cut short,
    /// bytes left over, an impossible value), or `len` = 0. Closes.
    BadFrame,
    /// 1001 `frame_too_large`: `len` above the maximum frame. Closes, the body unread.
    FrameTooLarge,
    /// 1002 `unknown_type`: a type byte this server does not know; the frame is skipped.
    UnknownType,
    /// 1003 `hello_required`: the first frame is not HELLO. Closes.
    HelloRequired,
    /// 1004 `duplicate_hello`: a HELLO after the first. Closes.
    DuplicateHello,
    /// 1005 `bad_token`: the HELLO token is refused (auth on and the JWT missing, invalid or
    /// expired, or its user part empty or longer than 256 bytes). Closes.
    BadToken,
    /// 1006 `unsupported_version`: HELLO's version byte is not 2. Closes.
    UnsupportedVersion,
    /// 1007 `recipient_too_long`: a SEND recipient longer than 256 bytes; not accepted.
    RecipientTooLong,
    /// 1008 `bad_user`: an empty user name, or one longer than 256 bytes in a frame other
    /// than SEND; the frame is dropped.
    BadUser,
    /// 1009 `unknown_kind`: a SEND kind or RECEIPT kind this server does not know.
    UnknownKind,
    /// 1010 `bad_id_count`: an ACK or RECEIPT with 0 ids or more than 1024.
    BadIdCount,
    /// 1011 `prekeys_too_large`: a PREKEY_UPLOAD bundle over 8 KiB.
    PrekeysTooLarge,
    /// 1012 `payload_too_large`: a SEND payload over `max_frame_bytes - 512`.
    PayloadTooLarge,
    /// 1013 `bad_payload`: a payload that does not fit its kind (kind 1 not one well-formed
    /// CBOR map, kind 2 not a valid E2EE body), or a prekey bundle that is not a CBOR map.
    BadPayload,
    /// 1014 `recipient_inbox_full`: the recipient's stored messages are at the deployment's
    /// quota; the message was not stored.
    RecipientInboxFull,
    /// 1015 `too_many_errors`: more non-closing errors than the server allows in its window.
    /// Closes.
    TooManyErrors,
    /// 1016 `idle_timeout`: nothing received for 3 ping intervals. Closes.
    IdleTimeout,
    /// 2000 `store_unavailable`: the store could not make the message durable; not accepted,
    /// send it again later.
    StoreUnavailable,
    /// 2001 `service_unavailable`: the feature or service the frame needs is not available
    /// (not built, or down); the frame was not acted on.
    ServiceUnavailable,
    /// 2002 `shutting_down`: the server is draining. Closes.
    ShuttingDown,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownType,
        ErrorCode::HelloRequired,
        ErrorCode::DuplicateHello,
        ErrorCode::BadToken,
        ErrorCode::UnsupportedVersion,
        ErrorCode::RecipientTooLong,
        ErrorCode::BadUser,
        ErrorCode::UnknownKind,
        ErrorCode::BadIdCount,
        ErrorCode::PrekeysTooLarge,
        ErrorCode::PayloadTooLarge,
        ErrorCode::BadPayload,
        ErrorCode::RecipientInboxFull,
        ErrorCode::TooManyErrors,
        ErrorCode::IdleTimeout,
        ErrorCode::StoreUnavailable,
        ErrorCode::ServiceUnavailable,
        ErrorCode::ShuttingDown,
    ];

    /// The `u16` code on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1000,
            ErrorCode::FrameTooLarge => 1001,
            ErrorCode::UnknownType => 1002,
            ErrorCode::HelloRequired => 1003,
            ErrorCode::DuplicateHello => 1004,
            ErrorCode::BadToken => 1005,
            ErrorCode::UnsupportedVersion => 1006,
            ErrorCode::RecipientTooLong => 1007,
            ErrorCode::BadUser => 1008,
            ErrorCode::UnknownKind => 1009,
            ErrorCode::BadIdCount => 1010,
            ErrorCode::PrekeysTooLarge => 1011,
            ErrorCode::PayloadTooLarge => 1012,
            ErrorCode::BadPayload => 1013,
            ErrorCode::RecipientInboxFull => 1014,
            ErrorCode::TooManyErrors => 1015,
            ErrorCode::IdleTimeout => 1016,
            ErrorCode::StoreUnavailable => 2000,
            ErrorCode::ServiceUnavailable => 2001,
            ErrorCode::ShuttingDown => 2002,
        }
    }

    /// The ASCII reason sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::DuplicateHello => "duplicate_hello",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::RecipientTooLong => "recipient_too_long",
            ErrorCode::BadUser => "bad_user",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::BadIdCount => "bad_id_count",
            ErrorCode::PrekeysTooLarge => "prekeys_too_large",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BadPayload => "bad_payload",
            ErrorCode::RecipientInboxFull => "recipient_inbox_full",
            ErrorCode::TooManyErrors => "too_many_errors",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }

    /// Whether the server closes the connection after sending this error.
    pub fn closes(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame
                | ErrorCode::FrameTooLarge
                | ErrorCode::HelloRequired
                | ErrorCode::DuplicateHello
                | ErrorCode::BadToken
                | ErrorCode::UnsupportedVersion
                | ErrorCode::TooManyErrors
                | ErrorCode::IdleTimeout
                | ErrorCode::ShuttingDown
        )
    }

    /// The code of a wire `u16`, if this crate knows it.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// Why a decoder refused the bytes at the head of a buffer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// `len` is 0: a frame has at least its type byte.
    #[error("frame length 0")]
    EmptyFrame,
    /// `len` is above the maximum frame given to the decoder (refused as soon as the 4 length
    /// bytes arrived).
    #[error("frame length {len} above the maximum {max}")]
    FrameTooLarge {
        /// The `len` field.
        len: u32,
        /// The maximum the decoder was given.
        max: usize,
    },
    /// The body of a frame of a known type does not match its layout: a field cut short,
    /// bytes left over, or an impossible value (a state byte other than 0/1, an unknown
    /// RATE_LIMITED `what`, a non-ASCII ERROR reason).
    #[error("malformed frame of type 0x{ty:02x}")]
    BadFrame {
        /// The frame's type byte.
        ty: u8,
    },
    /// A HELLO whose version byte is not [`super::VERSION`].
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version byte.
        version: u8,
    },
    /// A SEND recipient longer than [`super::MAX_USER_BYTES`].
    #[error("recipient of {len} bytes (at most 256)")]
    RecipientTooLong {
        /// The SEND's client_msg_id.
        client_msg_id: u64,
        /// The recipient's length.
        len: usize,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
    /// An empty user name, or (outside SEND's recipient) one longer than
    /// [`super::MAX_USER_BYTES`].
    #[error("user name of {len} bytes in a frame of type 0x{ty:02x}")]
    BadUser {
        /// The frame's type byte.
        ty: u8,
        /// The name's length.
        len: usize,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
    /// A SEND/DELIVER kind or RECEIPT kind byte this crate does not know.
    #[error("unknown kind {kind} in a frame of type 0x{ty:02x}")]
    UnknownKind {
        /// The frame's type byte.
        ty: u8,
        /// The kind byte.
        kind: u8,
        /// The SEND's client_msg_id, or 0.
        reference: u64,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
    /// An ACK or RECEIPT with 0 ids or more than [`super::MAX_ACK_IDS`].
    #[error("{count} ids in a frame of type 0x{ty:02x} (1 to 1024)")]
    BadIdCount {
        /// The frame's type byte.
        ty: u8,
        /// The count field.
        count: u16,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
    /// A prekey bundle larger than [`super::MAX_PREKEY_BYTES`].
    #[error("prekey bundle of {len} bytes (at most 8192)")]
    PrekeysTooLarge {
        /// The bundle's length.
        len: usize,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
    /// A SEND or DELIVER payload longer than the maximum frame minus
    /// [`super::FRAME_OVERHEAD_BYTES`].
    #[error("payload of {len} bytes (at most {max})")]
    PayloadTooLarge {
        /// The SEND's client_msg_id, or 0 (DELIVER).
        reference: u64,
        /// The payload's length.
        len: usize,
        /// The largest payload allowed.
        max: usize,
        /// Bytes of the frame, to skip.
        consumed: usize,
    },
}

impl WireError {
    /// The error's entry in the wire error table.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            WireError::EmptyFrame | WireError::BadFrame { .. } => ErrorCode::BadFrame,
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::RecipientTooLong { .. } => ErrorCode::RecipientTooLong,
            WireError::BadUser { .. } => ErrorCode::BadUser,
            WireError::UnknownKind { .. } => ErrorCode::UnknownKind,
            WireError::BadIdCount { .. } => ErrorCode::BadIdCount,
            WireError::PrekeysTooLarge { .. } => ErrorCode::PrekeysTooLarge,
            WireError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        }
    }

    /// The `u16` code the ERROR frame carries.
    pub fn code(&self) -> u16 {
        self.error_code().code()
    }

    /// The ASCII reason the ERROR frame carries.
    pub fn reason(&self) -> &'static str {
        self.error_code().reason()
    }

    /// The ERROR frame's `reference`: the client_msg_id of the SEND refused, else 0.
    pub fn reference(&self) -> u64 {
        match self {
            WireError::RecipientTooLong { client_msg_id, .. } => *client_msg_id,
            WireError::BadUser { reference, .. }
            | WireError::UnknownKind { reference, .. }
            | WireError::PayloadTooLarge { reference, .. } => *reference,
            _ => 0,
        }
    }

    /// `Some(n)`: the refused frame is the first `n` bytes of the buffer; skip them and keep
    /// the connection. `None`: answer ERROR and close (the error's code
    /// [closes](ErrorCode::closes)).
    pub fn skip(&self) -> Option<usize> {
        match self {
            WireError::EmptyFrame
            | WireError::FrameTooLarge { .. }
            | WireError::BadFrame { .. }
            | WireError::UnsupportedVersion { .. } => None,
            WireError::RecipientTooLong { consumed, .. }
            | WireError::BadUser { consumed, .. }
            | WireError::UnknownKind { consumed, .. }
            | WireError::BadIdCount { consumed, .. }
            | WireError::PrekeysTooLarge { consumed, .. }
            | WireError::PayloadTooLarge { consumed, .. } => Some(*consumed),
        }
    }

    /// The ERROR frame that answers this error.
    pub fn to_frame(&self) -> ServerFrame {
        ServerFrame::error(self.error_code(), self.reference())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_reasons_are_unique_and_ascii() {
        let codes: HashSet<u16> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        let reasons: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        assert_eq!(reasons.len(), ErrorCode::ALL.len());
        for c in ErrorCode::ALL {
            assert!(c
                .reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
            // Client errors 1xxx, server errors 2xxx.
            assert!((1000..3000).contains(&c.code()), "{c:?}");
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(1999), None);
    }

    #[test]
    fn the_table_as_documented() {
        let got: Vec<(u16, &str, bool)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.code(), c.reason(), c.closes()))
            .collect();
        assert_eq!(
            got,
            [
                (1000, "bad_frame", true),
                (1001, "frame_too_large", true),
                (1002, "unknown_type", false),
                (1003, "hello_required", true),
                (1004, "duplicate_hello", true),
                (1005, "bad_token", true),
                (1006, "unsupported_version", true),
                (1007, "recipient_too_long", false),
                (1008, "bad_user", false),
                (1009, "unknown_kind", false),
                (1010, "bad_id_count", false),
                (1011, "prekeys_too_large", false),
                (1012, "payload_too_large", false),
                (1013, "bad_payload", false),
                (1014, "recipient_inbox_full", false),
                (1015, "too_many_errors", true),
                (1016, "idle_timeout", true),
                (2000, "store_unavailable", false),
                (2001, "service_unavailable", false),
                (2002, "shutting_down", true),
            ]
        );
    }

    #[test]
    fn a_wire_error_closes_exactly_when_its_code_does() {
        let all = [
            WireError::EmptyFrame,
            WireError::FrameTooLarge { len: 9, max: 8 },
            WireError::BadFrame { ty: 2 },
            WireError::UnsupportedVersion { version: 3 },
            WireError::RecipientTooLong {
                client_msg_id: 7,
                len: 257,
                consumed: 300,
            },
            WireError::BadUser {
                ty: 6,
                len: 0,
                reference: 0,
                consumed: 7,
            },
            WireError::UnknownKind {
                ty: 2,
                kind: 9,
                reference: 7,
                consumed: 20,
            },
            WireError::BadIdCount {
                ty: 3,
                count: 0,
                consumed: 7,
            },
            WireError::PrekeysTooLarge {
                len: 8193,
                consumed: 8202,
            },
            WireError::PayloadTooLarge {
                reference: 7,
                len: 10,
                max: 9,
                consumed: 40,
            },
        ];
        for e in &all {
            assert_eq!(e.skip().is_none(), e.error_code().closes(), "{e:?}");
            assert!(!e.to_string().is_empty());
            let ServerFrame::Error {
                code,
                reason,
                reference,
            } = e.to_frame()
            else {
                panic!("not an ERROR frame");
            };
            assert_eq!(
                (code, reason.as_str(), reference),
                (e.code(), e.reason(), e.reference())
            );
        }
        assert_eq!(all[4].reference(), 7);
        assert_eq!(all[4].skip(), Some(300));
        assert_eq!(all[0].reference(), 0);
    }
}
