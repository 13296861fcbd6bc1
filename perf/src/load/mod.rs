//! `iris-load`: a thread-per-core load generator that speaks the Iris client protocols: v1, or
//! v2 (`--protocol v2`) over plain TCP, TLS, WebSocket or WebSocket over TLS (`--transport`,
//! [`transport`]).
//!
//! One pinned glommio executor per chosen CPU (`--cpus`) drives its share of the connections,
//! so the generator scales with the cores it is given and is never the bottleneck it measures.
//! One process can drive many target addresses (`--target`, repeatable; connections are spread
//! round-robin over them).
//!
//! Scenarios ([`scenario`]):
//!
//! - `connect`: hold N logged-in idle connections, ramped at a set rate; connects/s and, given
//!   `--server-pid`, the server's resident memory per connection.
//! - `pairs`: P sender → receiver pairs, open loop at a constant rate (latency from the
//!   *intended* send time, so no coordinated omission) or `--max` (a window of messages in
//!   flight per pair) to find saturation; receivers ack every message.
//! - `offline`: fill N users' inboxes while they are offline, then time the drain at login.
//! - `logins`: login/logout churn.
//! - `echo`: the client of the reference echo server ([`echo`]), which measures the loopback
//!   ceiling of this machine.
//! - `report`: draws the charts and regenerates the tables of `BENCHMARKS.md` from result JSON
//!   files ([`bench_report`]).
//!
//! Every payload carries a stream id, a sequence number and its intended send time
//! ([`payload`]), so losses, duplicates and reordering are counted exactly ([`seq`]) and
//! latency is end to end. Latency goes into HdrHistograms ([`stats`]); a progress line is
//! printed every second and a final table at the end; `--json FILE` writes the whole
//! [`report::Report`], including the command line and the host.

pub mod bench_report;
pub mod cli;
pub mod clock;
pub mod conn;
pub mod echo;
pub mod host;
pub mod monitor;
pub mod payload;
pub mod report;
pub mod runtime;
pub mod scenario;
pub mod seq;
pub mod stats;
pub mod transport;
pub mod v2;

pub use cli::{main_with_args, Cli};
pub use report::Report;
