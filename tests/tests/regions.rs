//! Several regions on one host: every test starts its own global broker (sqlite tansu, so it
//! can be `kill -9`'d and restarted) and its own regions ([`Regions`]: per region a tansu, a
//! `redis-server`, `iris-core` members and `iris-edge` processes, all given the region list,
//! the global brokers and optionally a home table), and talks to the edges as unchanged v1
//! clients. User names are picked by home region with the same rendezvous hash as the bus
//! (`Regions::user_homed_in`).
//!
//! Needs `tansu`, `redis-server` and the built binaries (`cargo build --workspace --bins`:
//! `iris-edge`, `iris-core` and the perf crate's `iris-delay-proxy`).
//!
//! Modules: `harness` (the regions start, the single-region path still works in each region,
//! the global broker is reachable through the delay proxy and survives `kill -9`); `delivery`
//! (both ways in order with exact counts and the origin's `stored_at_home` hop, the home table
//! over the hash, an offline recipient draining at home with nothing stored in the sender's
//! region, typing and read receipts, the ack deleting at home); `roaming` (a user logged in
//! outside its home gets its stored and live messages, acks at home, its prekeys are fetched
//! across; no presence on the global route topics); `crash` (`kill -9` under cross-region load
//! of the home core, the global broker, the home broker and the sender's edge); `startup` (an
//! unknown region refused by `iris-edge` and `iris-core` at startup); `rehome` (a user's home
//! changed by the home table: its stored messages and prekeys moved by `POST /rehome`, messages
//! of edges still on the old table forwarded, a `kill -9` mid-move); `v2` (a protocol v2 SEND to
//! a user homed in another region, acknowledged by that home through the global bus, a resend
//! acknowledged with the first id and delivered once). `common` is the cluster
//! tests' helpers (paced sender, acking receiver with exact loss/duplicate accounting, raw
//! producer).

#[allow(dead_code)]
#[path = "cluster/common.rs"]
mod common;
#[path = "regions/crash.rs"]
mod crash;
#[path = "regions/delivery.rs"]
mod delivery;
#[path = "regions/harness.rs"]
mod harness;
#[path = "regions/rehome.rs"]
mod rehome;
#[path = "regions/roaming.rs"]
mod roaming;
#[path = "regions/startup.rs"]
mod startup;
#[path = "regions/v2.rs"]
mod v2;
