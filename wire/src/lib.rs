//! `iris-wire`: the Iris client protocol v2, as a standalone codec.
//!
//! The contract is `docs/PROTOCOL-v2.md`; this crate is its executable form, shared by the
//! server (the edge's v2 listeners) and the client library. It holds no I/O and no state: frame
//! types, encoders that append to a caller's `Vec<u8>`, and decoders that look at the head of a
//! buffer and say "a frame of N bytes", "not all there yet" or "refused, and why".
//!
//! - [`v2`]: frames of protocol v2 ([`v2::ClientFrame`], [`v2::ServerFrame`]), their codec,
//!   limits and the error code table ([`v2::ErrorCode`], [`v2::WireError`]).
//!
//! Protocol v1 (`shared/PROTOCOL.md`) is not here: its codec lives in `iris-edge`
//! (`edge/src/protocol/`), which serves it byte for byte on its own port.

#![forbid(unsafe_code)]

pub mod v2;
