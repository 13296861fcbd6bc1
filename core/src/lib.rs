//! `iris-core`: the record of truth for messages.
//!
//! In the embedded (one-box) deployment the core runs in-process: [`embedded::EmbeddedCore`]
//! is a dedicated OS thread that owns the [`store::MessageStore`] (an fjall LSM on local disk)
//! and talks to every edge shard over a pair of bounded crossbeam queues per shard
//! ([`api::ShardLink`]). Shards never wait on it: they push [`api::CoreRequest`]s and poll
//! [`api::CoreReply`]s. In the regional cluster the edge starts [`remote::RemoteCore`] instead:
//! the same links, with the requests turned into bus frames on Kafka and the replies read from
//! the edge's inbox, sessions written to Redis.
//!
//! - [`api`]: the request and reply types that cross the shard/core boundary.
//! - [`store`]: the durable message store (inbox per user, prekey bundles).
//! - [`embedded`]: the core thread: group commit, ack cancellation, ordered login drains.
//! - [`hotlog`]: the embedded store's hot tier: messages acked soon after the commit window
//!   are logged once and kept in memory, never written to and deleted from the LSM.
//! - [`sessions`]: Redis sessions (`session:{user}`): a batching, pipelining writer thread fed
//!   by non-blocking per-shard sinks, and a blocking reader for the core.
//! - [`remote`]: the edge's cluster link: shard requests to Kafka frames and Redis sessions,
//!   the edge inbox and presence topic back to the owning shards.
//! - [`service`]: the cluster core (`iris-core` binary): consumes its statically owned
//!   partitions of the region's deliver topic, stores with group commit, routes messages and
//!   relays to edge inboxes via Redis sessions and login hints, answers drains and prekey
//!   fetches.
//! - [`import`]: the home region's importer (multi-region): the region's route topic on the
//!   global bus into the regional deliver topic and edge inboxes, committed only once the
//!   regional broker has each record.
//! - [`outbox`]: the cluster edge's write-ahead log: every accepted message is on local disk
//!   until the broker acknowledged it, replayed after a crash, trimmed on the broker's ack.
//! - [`http`]: the small HTTP responder of the admin endpoints (edge and core).
//! - [`error`]: [`CoreError`], classified by cause (environment, invalid input, internal).

pub mod api;
pub mod embedded;
pub mod error;
pub mod hotlog;
pub mod http;
pub mod idle;
pub mod import;
pub mod outbox;
pub mod remote;
pub mod resume;
pub mod service;
pub mod sessions;
pub mod store;

pub use api::{CoreReply, CoreRequest, ShardLink, StoredMsg};
pub use error::CoreError;
