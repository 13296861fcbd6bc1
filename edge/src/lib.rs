//! `iris-edge`: the Iris edge appliance.
//!
//! One glommio shard per CPU core, each with its own `SO_REUSEPORT` listener, its own sockets and
//! its own slice of presence; shards share nothing and talk only over SPSC rings. The v1 client
//! protocol lives in [`protocol`]. See `docs/ARCHITECTURE.md` for the path of a message.

pub mod protocol;
