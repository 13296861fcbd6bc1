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
    /// The message's protocol v2 kind (0 plain, 1 CBOR, 2 E2EE; opaque to the bus), stored
    /// with it by the core. `u8::MAX`: not recorded (a message stored by an older build).
    pub kind: u8,
    /// A protocol v2 sender's request for a [`Confirmed`] once the message is durable at its
    /// home core; `None` for v1 messages and for every copy the core routes. Boxed: a v1
    /// message pays 5 bytes for it on the wire, not the whole record.
    pub confirm: Option<Box<ConfirmTo>>,
}

/// Where the core sends the [`Confirmed`] of a v2 message, and its idempotency key: the
/// sender's client message id, unique per sender. The core keeps `(sender, client) -> id` for
/// its dedup period, so a resend through any edge of the region is confirmed with the first
/// message's id and neither stored nor routed again.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ConfirmTo {
    /// The v2 client message id.
    pub client: u64,
    /// The accepting edge: node (its inbox), shard and shard-local connection.
    pub node: u32,
    pub shard: u32,
    pub conn: u64,
    /// The accepting edge's run (its start, Unix ms; see [`EdgeReset`]): a confirm for an
    /// earlier run is dropped, since connection numbers start again at a restart.
    pub run: u64,
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
    /// The region of the edge that asks (the answer crosses back to it); empty = the consumer's
    /// own region.
    pub region: String,
}

/// One stored message inside a [`DrainChunk`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Drained {
    pub id: u64,
    pub sender: Vec<u8>,
    pub payload: Vec<u8>,
    /// As stored: see [`Deliver::kind`].
    pub kind: u8,
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
    /// The region of the edge that asks; empty = the consumer's own region.
    pub region: String,
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

/// Message `id` from `sender` is stored in its recipient's home region `home`: sent back to the
/// sender's (accepting) region, which records the cross-region latency. Keyed by `sender`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Stored {
    pub sender: Vec<u8>,
    pub id: u64,
    /// The recipient's home region, where the message is stored.
    pub home: String,
}

/// The home core's answer to a [`Deliver`] that asked for one ([`Deliver::confirm`]), sent
/// only once the message is durable (its window fsynced) to the inbox of the edge named in
/// `to` (across the global bus to `origin` when the sender is in another region). `id` is the
/// stored message's id: the deliver's own, or the first message's when `duplicate` (the same
/// `(sender, client)` was seen before: this copy was neither stored nor routed). Keyed by
/// `sender`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Confirmed {
    pub sender: Vec<u8>,
    pub to: ConfirmTo,
    pub id: u64,
    pub duplicate: bool,
}

/// A frame that a [`Route`] may carry to another region. Presence and edge resets are not
/// routable: presence never crosses regions by construction.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub enum Routed {
    Deliver(Deliver),
    Ack(Ack),
    DrainRequest(DrainRequest),
    DrainChunk(DrainChunk),
    Relay(Relay),
    PrekeyPut(PrekeyPut),
    PrekeyFetch(PrekeyFetch),
    PrekeyBundle(PrekeyBundle),
    Stored(Stored),
    Confirmed(Confirmed),
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
    Stored(Stored),
    Confirmed(Confirmed),
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
    Stored,
    Confirmed,
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
            FrameKind::Stored => "stored",
            FrameKind::Confirmed => "confirmed",
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
            Routed::Relay(f) => BusFrame::Relay(f),
            Routed::PrekeyPut(f) => BusFrame::PrekeyPut(f),
            Routed::PrekeyFetch(f) => BusFrame::PrekeyFetch(f),
            Routed::PrekeyBundle(f) => BusFrame::PrekeyBundle(f),
            Routed::Stored(f) => BusFrame::Stored(f),
            Routed::Confirmed(f) => BusFrame::Confirmed(f),
        }
    }
}

impl BusFrame {
    /// Wraps this frame for region `region`; `None` for a route (routes do not nest) and for the
    /// frames that never leave a region (presence, edge reset).
    pub fn route_to(self, region: impl Into<String>) -> Option<BusFrame> {
        let inner = match self {
            BusFrame::Deliver(f) => Routed::Deliver(f),
            BusFrame::Ack(f) => Routed::Ack(f),
            BusFrame::DrainRequest(f) => Routed::DrainRequest(f),
            BusFrame::DrainChunk(f) => Routed::DrainChunk(f),
            BusFrame::Relay(f) => Routed::Relay(f),
            BusFrame::PrekeyPut(f) => Routed::PrekeyPut(f),
            BusFrame::PrekeyFetch(f) => Routed::PrekeyFetch(f),
            BusFrame::PrekeyBundle(f) => Routed::PrekeyBundle(f),
            BusFrame::Stored(f) => Routed::Stored(f),
            BusFrame::Confirmed(f) => Routed::Confirmed(f),
            BusFrame::Route(_) | BusFrame::Presence(_) | BusFrame::EdgeReset(_) => return None,
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
            BusFrame::Stored(_) => FrameKind::Stored,
            BusFrame::Confirmed(_) => FrameKind::Confirmed,
        }
    }

    /// The user this frame is keyed (partitioned) by: the recipient of a deliver or relay, the
    /// user of the others, the sender of a stored notice, the inner frame's user for a route,
    /// empty for an edge reset.
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
            BusFrame::Stored(f) => &f.sender,
            BusFrame::Confirmed(f) => &f.sender,
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
            Routed::Relay(f) => &f.recipient,
            Routed::PrekeyPut(f) => &f.user,
            Routed::PrekeyFetch(f) => &f.user,
            Routed::PrekeyBundle(f) => &f.user,
            Routed::Stored(f) => &f.sender,
            Routed::Confirmed(f) => &f.sender,
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
            ArchivedBusFrame::Stored(_) => FrameKind::Stored,
            ArchivedBusFrame::Confirmed(_) => FrameKind::Confirmed,
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
            ArchivedBusFrame::Stored(f) => &f.sender,
            ArchivedBusFrame::Confirmed(f) => &f.sender,
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
            ArchivedRouted::Relay(f) => &f.recipient,
            ArchivedRouted::PrekeyPut(f) => &f.user,
            ArchivedRouted::PrekeyFetch(f) => &f.user,
            ArchivedRouted::PrekeyBundle(f) => &f.user,
            ArchivedRouted::Stored(f) => &f.sender,
            ArchivedRouted::Confirmed(f) => &f.sender,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_to_wraps_every_routable_frame() {
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
        let presence = BusFrame::Presence(Presence {
            user: b"bob".to_vec(),
            online: true,
            node: 1,
            shard: 0,
            unix_ms: 1,
        });
        assert!(presence.route_to("eu").is_none(), "presence never crosses");
        let reset = BusFrame::EdgeReset(EdgeReset {
            node: 1,
            unix_ms: 1,
        });
        assert!(reset.route_to("eu").is_none(), "edge resets never cross");
        let stored = BusFrame::Stored(Stored {
            sender: b"alice".to_vec(),
            id: 9,
            home: "eu".into(),
        });
        let routed = stored.clone().route_to("us").unwrap();
        assert_eq!(routed.key_user(), b"alice");
        let BusFrame::Route(r) = routed else {
            unreachable!()
        };
        assert_eq!(BusFrame::from(r.inner), stored);
        let fetch = BusFrame::PrekeyFetch(PrekeyFetch {
            user: b"bob".to_vec(),
            node: 1,
            shard: 0,
            conn: 3,
            region: "us".into(),
        });
        assert_eq!(fetch.route_to("eu").unwrap().kind(), FrameKind::Route);
    }
}
