//! The Iris v1 client protocol (`shared/PROTOCOL.md`), byte for byte.
//!
//! - [`frame`]: the client frames as borrowed views ([`frame::ClientFrame`]) and the encoders of
//!   every server frame.
//! - [`decode`]: the incremental decoder. It checks that a frame is complete before parsing it;
//!   an incomplete frame is `Decoded::Incomplete`, a state, not an error.
//! - [`error`]: `ProtoError`, the one place where decoding errors map to wire reasons.
//! - [`cbor`]: a well-formedness check for the CBOR maps some frames carry.
//! - [`msgid`]: the fixed-length server message ids that make ACK self-delimiting.

pub mod cbor;
pub mod decode;
pub mod error;
pub mod frame;
pub mod msgid;
