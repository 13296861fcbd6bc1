//! [`ProtoError`]: every way a client frame can be rejected, and its wire reason.
//!
//! The decoder ([`mod@super::decode`]) and the CBOR check ([`super::cbor`]) return these errors;
//! the server answers with [`ProtoError::encode_wire`] (`0xFE | u16 len | reason`) and then skips
//! the frame or closes the connection. This is the one place where errors map to wire reasons:
//! [`ProtoError::reason`] is the ASCII text v1 clients see.

use super::frame;

/// Why a client frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first byte of a frame is not a client opcode.
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    /// A length field is inconsistent with the bytes it describes (for example batch entries that
    /// do not exactly fill the blob, a read-receipt id of 0 or more than 256 bytes, or a server
    /// frame with impossible contents).
    #[error("malformed frame")]
    BadFrame,
    /// The LOGIN body is longer than the configured maximum.
    #[error("login too long")]
    LoginTooLong,
    /// The LOGIN user name is empty. [`mod@super::decode`] never produces it (a LOGIN body is at
    /// least one byte); the server uses it for an empty user part of `user:token`.
    #[error("empty login")]
    EmptyLogin,
    /// A target, user or group id is empty or longer than the configured maximum.
    #[error("bad target")]
    BadTarget,
    /// A length field exceeds its configured limit (CBOR message, batch blob, prekey bundle,
    /// E2EE header or ciphertext, sender key).
    #[error("frame too large")]
    FrameTooLarge,
    /// A batch holds no entry or more than the configured maximum.
    #[error("batch has zero or too many entries")]
    TooManyEntries,
    /// A CBOR payload is not one well-formed map (or is nested too deep).
    #[error("malformed CBOR")]
    BadCbor,
    /// An ACK body is not 16 hex digits.
    #[error("malformed ack id")]
    BadAck,
}

impl ProtoError {
    /// The ASCII reason sent to the client in the `0xFE` ERROR frame.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtoError::UnknownOpcode(_) => "unknown_opcode",
            ProtoError::BadFrame => "bad_frame",
            ProtoError::LoginTooLong => "login_too_long",
            ProtoError::EmptyLogin => "bad_login",
            ProtoError::BadTarget => "bad_target",
            ProtoError::FrameTooLarge => "frame_too_large",
            ProtoError::TooManyEntries => "too_many_entries",
            ProtoError::BadCbor => "bad_cbor",
            ProtoError::BadAck => "bad_ack",
        }
    }

    /// Appends the ERROR frame for this error: `0xFE | u16 len | reason`.
    pub fn encode_wire(&self, out: &mut Vec<u8>) {
        frame::encode_error(out, self.reason());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ProtoError; 9] = [
        ProtoError::UnknownOpcode(0x99),
        ProtoError::BadFrame,
        ProtoError::LoginTooLong,
        ProtoError::EmptyLogin,
        ProtoError::BadTarget,
        ProtoError::FrameTooLarge,
        ProtoError::TooManyEntries,
        ProtoError::BadCbor,
        ProtoError::BadAck,
    ];

    #[test]
    fn reasons_are_the_wire_texts() {
        let got: Vec<&str> = ALL.iter().map(ProtoError::reason).collect();
        assert_eq!(
            got,
            [
                "unknown_opcode",
                "bad_frame",
                "login_too_long",
                "bad_login",
                "bad_target",
                "frame_too_large",
                "too_many_entries",
                "bad_cbor",
                "bad_ack"
            ]
        );
        for e in &ALL {
            assert!(e.reason().bytes().all(|b| b.is_ascii_graphic()));
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn encode_wire_appends_error_frame() {
        let mut out = vec![0xAA];
        ProtoError::UnknownOpcode(7).encode_wire(&mut out);
        let mut want = vec![0xAA, 0xFE, 0x00, 14];
        want.extend_from_slice(b"unknown_opcode");
        assert_eq!(out, want);

        let mut out = Vec::new();
        ProtoError::BadAck.encode_wire(&mut out);
        assert_eq!(out, b"\xFE\x00\x07bad_ack");
    }
}
