//! `iris-perf`: the tools that measure an Iris deployment and turn the figures into node counts.
//!
//! - [`load`]: `iris-load`, a thread-per-core v1-protocol load generator (scenarios `connect`,
//!   `pairs`, `offline`, `logins`) with coordinated-omission-free latency histograms, plus the
//!   reference echo server that measures this machine's loopback ceiling.
//! - [`plan`]: `iris-plan`, the capacity planner.
//! - [`proxy`]: `iris-delay-proxy`, a TCP proxy adding a fixed delay (multi-region benchmark).

pub mod load;
pub mod plan;
pub mod proxy;
