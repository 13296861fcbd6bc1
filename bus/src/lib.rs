//! `iris-bus`: what crosses node boundaries in an Iris cluster.
//!
//! This crate holds the bus frames ([`frame`]: deliver, ack, login drain request and chunk,
//! presence, relay of typing and receipts, prekeys, edge reset, cross-region route), archived with rkyv and read in
//! place from any byte buffer after validation ([`codec`]: every encoded frame starts with a
//! version byte, [`VERSION`]), and the topic layout with the user partitioning ([`topics`]).
//! `docs/BUS.md` documents the wire rules and the layout.
//! [`kafka`]: the Kafka transport on rdkafka (a producer thread fed by one ring per shard, with
//! `QueueFull` backpressure and per-frame delivery reports; a consumer thread handing frames to
//! the owning shard's queue; topic creation at startup). [`hops`]: per-hop latency histograms
//! measured from the accept time every message id carries, and the id layout's fields.
//! [`home`]: federated regions: the region list, each user's home region (home table, else
//! rendezvous hashing) — see `docs/REGIONS.md`.
//!
//! Not built yet: the one interface that lets the edge use either the in-process core (the
//! embedded one-box deployment, wired today straight to `iris-core`) or this Kafka transport.

#![forbid(unsafe_code)]

pub mod codec;
pub mod frame;
pub mod home;
pub mod hops;
pub mod kafka;
pub mod topics;

pub use codec::{
    decode, decode_counted, encode, encode_into, to_owned, BusError, FrameCounts, FrameStats,
    VERSION,
};
pub use frame::{
    Ack, ArchivedAck, ArchivedBusFrame, ArchivedConfirmTo, ArchivedConfirmed, ArchivedDeliver,
    ArchivedDrainChunk, ArchivedDrainRequest, ArchivedDrained, ArchivedEdgeReset,
    ArchivedPrekeyBundle, ArchivedPrekeyFetch, ArchivedPrekeyPut, ArchivedPresence, ArchivedRelay,
    ArchivedRelayKind, ArchivedRoute, ArchivedRouted, ArchivedStored, BusFrame, ConfirmTo,
    Confirmed, Deliver, DrainChunk, DrainRequest, Drained, EdgeReset, FrameKind, PrekeyBundle,
    PrekeyFetch, PrekeyPut, Presence, Relay, RelayKind, Route, Routed, Stored,
};
