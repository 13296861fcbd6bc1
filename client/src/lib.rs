//! `iris-client`: a blocking Rust client for the Iris client protocol v2 (`iris-wire`), and
//! the `iris-chat` command-line chat built on it.
//!
//! One [`Client`] is one logged-in user. It speaks plain TCP (behind an internal transport
//! seam, so TLS or WebSocket can come later), uses std threads and no async runtime: a reader
//! and a writer thread per connection and one maintenance thread per client.
//!
//! What it does for the app:
//! - **Login**: HELLO with `token` = `user` or `user:jwt` and `resume_after`; waits for
//!   HELLO_OK ([`Client::server_limits`]); an ERROR answer is [`ClientError::Refused`].
//! - **Sending**: [`Client::send`] gives each message a client_msg_id (monotonic, seeded with
//!   unix microseconds or [`ClientOptions::first_client_msg_id`]) and keeps it in a bounded
//!   outbox until its SEND_ACK ([`Event::SendAck`], the "sent" tick). A full outbox blocks the
//!   sender up to `outbox_wait_ms`, then fails with [`ClientError::OutboxFull`].
//! - **Reconnecting**: when the connection drops (read error, EOF, or no frame for 3 ping
//!   intervals), [`Client::reconnect`] or, with `auto_reconnect`, the client itself (backoff
//!   `reconnect_min_ms`..`reconnect_max_ms`) logs in again and sends every un-acked SEND again
//!   with the same client_msg_id; the server acknowledges a resend with the first server id
//!   and never delivers it twice.
//! - **Receiving**: [`Client::recv`] returns [`Event`]s. Each delivery is acked once the app
//!   has it (returned by `recv`), in ACK frames of up to 1024 ids sent `ack_flush_ms` after the
//!   oldest pending one or at once when 256 are pending, unless `manual_ack` (then
//!   [`Client::ack`]). A delivery seen before (a redelivery after a reconnect) is acked again
//!   but not returned twice (the last `dedupe_window` ids are remembered). Server PINGs are
//!   answered.
//! - Receipts, typing, status, prekeys, ping: one call each, answers come as events.
//!
//! ```no_run
//! use std::time::Duration;
//! use iris_client::{Client, ClientOptions, Event, MsgKind};
//!
//! # fn main() -> Result<(), iris_client::ClientError> {
//! let alice = Client::connect("127.0.0.1:7001", ClientOptions::new("alice"))?;
//! let id = alice.send(b"bob", MsgKind::Plain, b"hello bob")?;
//! while let Some(event) = alice.recv(Duration::from_secs(5))? {
//!     match event {
//!         Event::SendAck { client_msg_id, .. } if client_msg_id == id => println!("sent ✓"),
//!         Event::Deliver { sender, payload, .. } => {
//!             println!("{}: {}", String::from_utf8_lossy(&sender), String::from_utf8_lossy(&payload));
//!         }
//!         _ => {}
//!     }
//! }
//! alice.close();
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`client`] (the API and the maintenance thread), `conn` (login, reader and
//! writer threads), `book` (outbox, redelivery window, ack batches), `transport` (TCP),
//! [`error`], [`event`], [`options`].

#![forbid(unsafe_code)]

mod book;
pub mod client;
mod conn;
pub mod error;
pub mod event;
pub mod options;
mod transport;

pub use client::Client;
pub use error::ClientError;
pub use event::Event;
pub use iris_wire::v2::{ErrorCode, LimitedAction, MsgKind, ReceiptKind};
pub use options::{roots_from_pem, ClientOptions, ServerLimits, Transport};
pub use rustls;
