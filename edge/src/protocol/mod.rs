//! The Iris v1 client protocol (`shared/PROTOCOL.md`), byte for byte.
//!
//! - [`frame`]: the client frames as borrowed views ([`frame::ClientFrame`]) and the encoders of
//!   every server frame (plus the client side: client-frame encoder, server-frame decoder).
//! - [`mod@decode`]: the incremental decoder. It checks that a frame is complete before parsing it;
//!   an incomplete frame is `Decoded::Incomplete`, a state, not an error. It also holds the rule
//!   that delimits a LOGIN, which has no length field.
//! - [`error`]: `ProtoError`, the one place where decoding errors map to wire reasons.
//! - [`cbor`]: a well-formedness check for the CBOR maps some frames carry.
//! - [`msgid`]: the fixed-length server message ids that make ACK self-delimiting.

pub mod cbor;
pub mod decode;
pub mod error;
pub mod frame;
pub mod msgid;

#[cfg(test)]
pub(crate) mod testutil;

pub use decode::{decode, Decoded, Limits};
pub use error::ProtoError;
pub use frame::ClientFrame;
pub use msgid::{MsgId, MSG_ID_LEN};
