//! Protocol v2: every frame is `u32 len | u8 type | body`, big-endian (`docs/PROTOCOL-v2.md`).
//!
//! - [`frame`]: [`ClientFrame`], [`ServerFrame`], the type bytes ([`ty`]), the enums of the
//!   one-byte fields and the limits (`MAX_*`, [`DEFAULT_MAX_FRAME_BYTES`]).
//! - [`mod@encode`]: [`encode_client`] and [`encode_server`] append one frame to a `Vec<u8>`.
//! - [`mod@decode`]: [`decode_client`] and [`decode_server`] read the frame at the head of a
//!   buffer. They check that the whole frame is there before parsing it: an incomplete frame is
//!   [`Decoded::Incomplete`], a state, not an error. A length above the caller's maximum is
//!   refused as soon as the 4 length bytes have arrived, before any of the body. An unknown
//!   type byte is [`Decoded::Unknown`] with its size, so the caller skips it and answers
//!   `ERROR unknown_type`.
//! - [`error`]: [`ErrorCode`], the table of wire error codes and reasons, and [`WireError`],
//!   every way the decoders refuse bytes. [`WireError::code`] / [`WireError::reason`] are the
//!   one place where decoding errors map to wire errors; [`WireError::skip`] says whether the
//!   connection survives it.
//! - [`id`]: what a client can read from a server message id (its accept time, its v1 text).
//!
//! The API uses owned `Vec<u8>` fields: a frame outlives the buffer it was read from.
//! Nothing here panics on any input, and there is no `unsafe`.

pub mod decode;
pub mod encode;
pub mod error;
pub mod frame;
pub mod id;

#[cfg(test)]
mod tests;

pub use decode::{decode_client, decode_server, Decoded};
pub use encode::{encode_client, encode_server};
pub use error::{ErrorCode, WireError};
pub use frame::{
    ty, ClientFrame, LimitedAction, MsgKind, ReceiptKind, ServerFrame, DEFAULT_MAX_FRAME_BYTES,
    FRAME_OVERHEAD_BYTES, LEN_BYTES, MAX_ACK_IDS, MAX_HELLO_FRAME_BYTES, MAX_PREKEY_BYTES,
    MAX_USER_BYTES, MIN_MAX_FRAME_BYTES, VERSION,
};
