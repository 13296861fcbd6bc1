//! `iris-edge` binary: parses flags and config, checks the host, starts the shards.

fn main() {}
