//! `iris-perf`: the tools that measure an Iris deployment.
//!
//! This crate will hold `iris-load` (a thread-per-core v1-protocol load generator with
//! coordinated-omission-free latency histograms), the benchmark suite driven by
//! `scripts/bench.sh`, the reference echo server that measures this machine's loopback ceiling,
//! and `iris-plan`, the capacity planner. Not built yet.
