//! `iris-bus`: what crosses node boundaries in an Iris cluster.
//!
//! This crate will hold the rkyv-archived bus frames (deliver, ack, login drain, presence,
//! receipts, cross-region route), each starting with a version byte, and the two transports
//! behind one interface: the in-process transport used by the embedded one-box deployment and a
//! Kafka transport on rdkafka for the regional cluster. Not built yet: the embedded deployment
//! currently wires the edge shards straight to the in-process core in `iris-core`.
