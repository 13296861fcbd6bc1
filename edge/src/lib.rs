//! `iris-edge`: the Iris edge appliance.
//!
//! One glommio shard per CPU core, each with its own `SO_REUSEPORT` listener, its own sockets and
//! its own slice of presence; shards share nothing and talk only over SPSC rings. See
//! `docs/ARCHITECTURE.md` for the path of a message, file by file.
//!
//! - [`protocol`]: the v1 client protocol codec.
//! - [`config`]: the TOML configuration.
//! - [`server`]: startup and shutdown of the whole edge.
//! - [`shard`]: one shard: accept loop, connections, presence slice, rings.
//! - [`admin`], [`metrics`]: `/metrics` and `/health`.
//! - [`alloc`]: idle shards return freed memory to the OS.
//! - [`ratelimit`]: token buckets of the client rate limits.
//! - [`tls`]: the TLS certificate of the v2 transports and its reload on SIGHUP.
//! - [`auth`]: JWT login tokens. [`idgen`]: message ids. [`hostcheck`]: startup host checks.

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod bounded;
pub mod config;
pub mod hostcheck;
pub mod idgen;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod shard;
pub mod tls;
