//! `iris-client`: a blocking Rust client for the Iris client protocol v2 (`iris-wire`), and
//! the `iris-chat` command-line chat built on it.
//!
//! One [`Client`] is one logged-in user. It uses std threads and no async runtime: a reader
//! and a writer thread per connection and one maintenance thread per client.
//!
//! **Transports** ([`ClientOptions::transport`], docs/PROTOCOL-v2.md "Transports"): plain TCP
//! (the default), TLS, WebSocket (`ws://`, one binary message per v2 frame) and WebSocket over
//! TLS, each to the server's matching v2 port; reconnects use the same transport. TLS is
//! rustls (ring, TLS 1.2 and 1.3) and trusts only the roots given: for a server with a
//! self-signed certificate, pass that certificate's PEM file to [`roots_from_pem`] and a
//! `server_name` the certificate is valid for. A failed handshake is [`ClientError::Tls`], a
//! failed upgrade [`ClientError::WebSocket`]. Over TLS and WebSocket, whose streams cannot be
//! split, a write can wait up to 20 ms for the reader's current read.
//!
//! ```no_run
//! use iris_client::{roots_from_pem, Client, ClientOptions, Transport};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut opts = ClientOptions::new("alice");
//! opts.transport = Transport::Wss {
//!     server_name: "localhost".into(),
//!     roots: roots_from_pem(&std::fs::read("edge.crt")?)?,
//!     path: "/".into(),
//! };
//! let alice = Client::connect("127.0.0.1:7443", opts)?;
//! # drop(alice);
//! # Ok(())
//! # }
//! ```
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
//! writer threads), `book` (outbox, redelivery window, ack batches), `transport` (TCP, TLS, WebSocket),
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
/// The rustls version the TLS transports use (for [`rustls::RootCertStore`]).
pub use rustls;
