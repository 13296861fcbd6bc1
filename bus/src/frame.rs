//! The bus frame types: everything that crosses node boundaries in a regional cluster.
//!
//! Each type derives rkyv's `Archive`, so its archived twin (`ArchivedBusFrame`,
//! `ArchivedDeliver`, …) is what a consumer reads in place from a Kafka payload after
//! [`crate::decode`] validated it. The owned types here are what producers build and hand to
//! [`crate::encode`]. The archived form is fixed by the crate's rkyv features (`unaligned`,
//! `little_endian`, 32-bit relative pointers): any change to a type in this module changes the
//! wire format and must bump [`crate::VERSION`] (see `docs/BUS.md`).
//!
//! A [`Route`] wraps a [`Routed`] frame, not a [`BusFrame`]: a route never holds another route,
//! so the archive has no recursion and validating hostile bytes needs a bounded stack.

use rkyv::{Archive, Deserialize, Serialize};

/// A message for `recipient`, on its way to the recipient's core shard (deliver topic) or to the
/// edge holding the recipient (edge inbox).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Deliver {
    /// The message id given by the accepting edge; acks and drains refer to it.
    pub id: u64,
    pub recipient: Vec<u8>,
    pub sender: Vec<u8>,
    /// The message as the recipient's client will receive it (opaque to the bus).
    pub payload: Vec<u8>,
    /// The region whose edge accepted the message (the sender's region).
    pub origin: String,
}

/// `user` acknowledged message `id`: the core marks it delivered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Ack {
    pub user: Vec<u8>,
    pub id: u64,
}

/// After `user` logged in on edge `node`, shard `shard`, connection `conn`: asks the core for up
/// to `limit` stored messages with an id greater than `after`, in id order. Answered with a
/// [`DrainChunk`] on that edge's inbox.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct DrainRequest {
    pub user: Vec<u8>,
    /// The edge node id (names its inbox topic).
    pub node: u32,
    pub shard: u32,
    pub conn: u64,
    /// Exclusive lower bound of the ids wanted (0: from the first stored message).
    pub after: u64,
    pub limit: u32,
}

/// One stored message inside a [`DrainChunk`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Drained {
    pub id: u64,
    pub sender: Vec<u8>,
    pub payload: Vec<u8>,
}

/// The core's answer to a [`DrainRequest`]: `messages` in id order; `more` is true when more
/// are stored after the last one (the edge asks again with `after` = the last id).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct DrainChunk {
    pub user: Vec<u8>,
    pub node: u32,
    pub shard: u32,
    pub conn: u64,
    pub messages: Vec<Drained>,
    pub more: bool,
}

/// `user` went online (or offline) on edge `node`, shard `shard`, at `unix_ms`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Presence {
    pub user: Vec<u8>,
    pub online: bool,
    pub node: u32,
    pub shard: u32,
    /// Milliseconds since the Unix epoch, by the publishing edge's clock.
    pub unix_ms: u64,
}

/// What a [`Relay`] carries.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum RelayKind {
    TypingStart,
    TypingStop,
    /// `data` is the message id as the reader's client knows it.
    ReadReceipt,
}

/// A best-effort frame for `recipient` (typing, read receipt): never stored, dropped when the
/// recipient is offline. The core routes it to the edge holding the recipient (edge inbox).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Relay {
    pub recipient: Vec<u8>,
    pub kind: RelayKind,
    /// The complete client frame the recipient's client receives (0x72 or 0x75), opaque to the
    /// bus like a deliver's payload.
    pub frame: Vec<u8>,
}

/// Store (replace) `user`'s E2EE prekey bundle (a CBOR map, opaque to the bus). Core-bound.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PrekeyPut {
    pub user: Vec<u8>,
    pub bundle: Vec<u8>,
}

/// Asks the core for `user`'s prekey bundle on behalf of edge `node`, shard `shard`,
/// connection `conn`; answered with a [`PrekeyBundle`] on that edge's inbox.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PrekeyFetch {
    pub user: Vec<u8>,
    pub node: u32,
    pub shard: u32,
    pub conn: u64,
}

/// The core's answer to a [`PrekeyFetch`]: the bundle, or `None` when none is stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PrekeyBundle {
    pub user: Vec<u8>,
    pub node: u32,
    pub shard: u32,
    pub conn: u64,
    pub bundle: Option<Vec<u8>>,
}

/// Edge `node` started at `unix_ms`: none of the sessions it announced before are alive (it
/// restarted, maybe after a crash). Published once on the presence topic (the partition of the
/// empty key). Receivers keep each node's latest reset time and compare it with the times in
/// that node's presence events, so the outcome does not depend on the order in which partitions
/// are read: logins announced before the reset are dropped, later ones kept.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct EdgeReset {
    pub node: u32,
    pub unix_ms: u64,
}

/// A frame that a [`Route`] may carry to another region: every frame but a route.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub enum Routed {
    Deliver(Deliver),
    Ack(Ack),
    DrainRequest(DrainRequest),
    DrainChunk(DrainChunk),
    Presence(Presence),
    Relay(Relay),
}

/// A frame for the home region `region`, published on `iris.global.route.{region}`; the
/// receiving region unwraps `inner` and publishes it on its own topics.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Route {
    /// The target (home) region.
    pub region: String,
    pub inner: Routed,
}

/// Every frame on the bus. Encoded as one version byte followed by the rkyv archive of this
/// enum (see [`crate::encode`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub enum BusFrame {
    Deliver(Deliver),
    Ack(Ack),
    DrainRequest(DrainRequest),
    DrainChunk(DrainChunk),
    Presence(Presence),
    Relay(Relay),
    Route(Route),
    PrekeyPut(PrekeyPut),
    PrekeyFetch(PrekeyFetch),
    PrekeyBundle(PrekeyBundle),
    EdgeReset(EdgeReset),
}

/// The kind of a frame, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Deliver,
    Ack,
    DrainRequest,
    DrainChunk,
    Presence,
    Relay,
    Route,
    PrekeyPut,
    PrekeyFetch,
    PrekeyBundle,
    EdgeReset,
}

impl FrameKind {
    /// A lowercase name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Deliver => "deliver",
            FrameKind::Ack => "ack",
            FrameKind::DrainRequest => "drain_request",
            FrameKind::DrainChunk => "drain_chunk",
            FrameKind::Presence => "presence",
            FrameKind::Relay => "relay",
            FrameKind::Route => "route",
            FrameKind::PrekeyPut => "prekey_put",
            FrameKind::PrekeyFetch => "prekey_fetch",
            FrameKind::PrekeyBundle => "prekey_bundle",
            FrameKind::EdgeReset => "edge_reset",
        }
    }
}

impl From<Routed> for BusFrame {
    fn from(r: Routed) -> Self {
        match r {
            Routed::Deliver(f) => BusFrame::Deliver(f),
            Routed::Ack(f) => BusFrame::Ack(f),
            Routed::DrainRequest(f) => BusFrame::DrainRequest(f),
            Routed::DrainChunk(f) => BusFrame::DrainChunk(f),
            Routed::Presence(f) => BusFrame::Presence(f),
            Routed::Relay(f) => BusFrame::Relay(f),
        }
    }
}

impl BusFrame {
    /// Wraps this frame for region `region`; `None` for a route (routes do not nest) and for the
    /// frames that never leave a region (prekeys, edge reset).
    pub fn route_to(self, region: impl Into<String>) -> Option<BusFrame> {
        let inner = match self {
            BusFrame::Deliver(f) => Routed::Deliver(f),
            BusFrame::Ack(f) => Routed::Ack(f),
            BusFrame::DrainRequest(f) => Routed::DrainRequest(f),
            BusFrame::DrainChunk(f) => Routed::DrainChunk(f),
            BusFrame::Presence(f) => Routed::Presence(f),
            BusFrame::Relay(f) => Routed::Relay(f),
            BusFrame::Route(_)
            | BusFrame::PrekeyPut(_)
            | BusFrame::PrekeyFetch(_)
            | BusFrame::PrekeyBundle(_)
            | BusFrame::EdgeReset(_) => return None,
        };
        Some(BusFrame::Route(Route {
            region: region.into(),
            inner,
        }))
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            BusFrame::Deliver(_) => FrameKind::Deliver,
            BusFrame::Ack(_) => FrameKind::Ack,
            BusFrame::DrainRequest(_) => FrameKind::DrainRequest,
            BusFrame::DrainChunk(_) => FrameKind::DrainChunk,
            BusFrame::Presence(_) => FrameKind::Presence,
            BusFrame::Relay(_) => FrameKind::Relay,
            BusFrame::Route(_) => FrameKind::Route,
            BusFrame::PrekeyPut(_) => FrameKind::PrekeyPut,
            BusFrame::PrekeyFetch(_) => FrameKind::PrekeyFetch,
            BusFrame::PrekeyBundle(_) => FrameKind::PrekeyBundle,
            BusFrame::EdgeReset(_) => FrameKind::EdgeReset,
        }
    }

    /// The user this frame is keyed (partitioned) by: the recipient of a deliver or relay, the
    /// user of the others, the inner frame's user for a route, empty for an edge reset.
    pub fn key_user(&self) -> &[u8] {
        match self {
            BusFrame::Deliver(f) => &f.recipient,
            BusFrame::Ack(f) => &f.user,
            BusFrame::DrainRequest(f) => &f.user,
            BusFrame::DrainChunk(f) => &f.user,
            BusFrame::Presence(f) => &f.user,
            BusFrame::Relay(f) => &f.recipient,
            BusFrame::Route(r) => r.inner.key_user(),
            BusFrame::PrekeyPut(f) => &f.user,
            BusFrame::PrekeyFetch(f) => &f.user,
            BusFrame::PrekeyBundle(f) => &f.user,
            BusFrame::EdgeReset(_) => &[],
        }
    }
}

impl Routed {
    pub fn key_user(&self) -> &[u8] {
        match self {
            Routed::Deliver(f) => &f.recipient,
            Routed::Ack(f) => &f.user,
            Routed::DrainRequest(f) => &f.user,
            Routed::DrainChunk(f) => &f.user,
            Routed::Presence(f) => &f.user,
            Routed::Relay(f) => &f.recipient,
        }
    }
}

impl ArchivedBusFrame {
    pub fn kind(&self) -> FrameKind {
        match self {
            ArchivedBusFrame::Deliver(_) => FrameKind::Deliver,
            ArchivedBusFrame::Ack(_) => FrameKind::Ack,
            ArchivedBusFrame::DrainRequest(_) => FrameKind::DrainRequest,
            ArchivedBusFrame::DrainChunk(_) => FrameKind::DrainChunk,
            ArchivedBusFrame::Presence(_) => FrameKind::Presence,
            ArchivedBusFrame::Relay(_) => FrameKind::Relay,
            ArchivedBusFrame::Route(_) => FrameKind::Route,
            ArchivedBusFrame::PrekeyPut(_) => FrameKind::PrekeyPut,
            ArchivedBusFrame::PrekeyFetch(_) => FrameKind::PrekeyFetch,
            ArchivedBusFrame::PrekeyBundle(_) => FrameKind::PrekeyBundle,
            ArchivedBusFrame::EdgeReset(_) => FrameKind::EdgeReset,
        }
    }

    /// [`BusFrame::key_user`], read in place.
    pub fn key_user(&self) -> &[u8] {
        match self {
            ArchivedBusFrame::Deliver(f) => &f.recipient,
            ArchivedBusFrame::Ack(f) => &f.user,
            ArchivedBusFrame::DrainRequest(f) => &f.user,
            ArchivedBusFrame::DrainChunk(f) => &f.user,
            ArchivedBusFrame::Presence(f) => &f.user,
            ArchivedBusFrame::Relay(f) => &f.recipient,
            ArchivedBusFrame::Route(r) => r.inner.key_user(),
            ArchivedBusFrame::PrekeyPut(f) => &f.user,
            ArchivedBusFrame::PrekeyFetch(f) => &f.user,
            ArchivedBusFrame::PrekeyBundle(f) => &f.user,
            ArchivedBusFrame::EdgeReset(_) => &[],
        }
    }
}

impl ArchivedRouted {
    pub fn key_user(&self) -> &[u8] {
        match self {
            ArchivedRouted::Deliver(f) => &f.recipient,
            ArchivedRouted::Ack(f) => &f.user,
            ArchivedRouted::DrainRequest(f) => &f.user,
            ArchivedRouted::DrainChunk(f) => &f.user,
            ArchivedRouted::Presence(f) => &f.user,
            ArchivedRouted::Relay(f) => &f.recipient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_to_wraps_everything_but_a_route() {
        let ack = BusFrame::Ack(Ack {
            user: b"bob".to_vec(),
            id: 7,
        });
        let routed = ack.clone().route_to("eu").unwrap();
        assert_eq!(routed.kind(), FrameKind::Route);
        assert_eq!(routed.key_user(), b"bob");
        let BusFrame::Route(r) = &routed else {
            unreachable!()
        };
        assert_eq!(r.region, "eu");
        assert_eq!(BusFrame::from(r.inner.clone()), ack);
        assert!(routed.route_to("us").is_none());
    }
}
