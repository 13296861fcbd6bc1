//! Encoding and validated in-place decoding of bus frames, and the counters consumers keep.
//!
//! Wire form of a bus frame (a Kafka record value): one version byte ([`VERSION`]) followed by
//! the rkyv archive of a [`BusFrame`]. Because the crate enables rkyv's `unaligned` and
//! `little_endian` features, every archived type has alignment 1, so [`decode`] reads the frame
//! in place from any byte buffer — a Kafka payload at any address — after `bytecheck` validated
//! it. Nothing is copied; [`to_owned`] deserializes when an owned frame is needed.
//!
//! Consumers skip bad frames rather than stop: [`decode_counted`] classifies every outcome into
//! a [`FrameStats`] and logs the first occurrence of each kind of failure once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rkyv::rancor;

use crate::frame::{ArchivedBusFrame, BusFrame};

/// The version byte that starts every frame this build encodes (and the only one it decodes).
pub const VERSION: u8 = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The buffer holds no bytes at all (not even a version byte).
    #[error("empty bus frame")]
    Empty,
    /// The version byte names a format this build does not read.
    #[error("unknown bus frame version {version} (this build reads version {VERSION})")]
    UnknownVersion { version: u8 },
    /// The bytes after the version byte are not a valid archived frame (truncated, corrupted,
    /// or written by a different layout under the same version).
    #[error("invalid bus frame: {0}")]
    Invalid(#[source] rancor::Error),
    /// Serializing or deserializing failed (allocation; never expected in practice).
    #[error("bus frame serialization failed: {0}")]
    Serialize(#[source] rancor::Error),
}

impl BusError {
    /// True for the failures [`FrameStats`] counts as `invalid` (empty or failed validation).
    pub fn is_invalid(&self) -> bool {
        matches!(self, BusError::Empty | BusError::Invalid(_))
    }
}

/// Appends the encoded form of `frame` (version byte, then the archive) to `out`.
///
/// Existing bytes of `out` are kept, so many frames can be built into reused buffers; the new
/// frame is `out[old_len..]`.
pub fn encode_into(frame: &BusFrame, out: &mut Vec<u8>) -> Result<(), BusError> {
    out.push(VERSION);
    // Relative pointers are differences between positions, so the archive is valid wherever
    // it starts; with alignment 1 no padding depends on the start either.
    let taken = std::mem::take(out);
    match rkyv::api::high::to_bytes_in::<_, rancor::Error>(frame, taken) {
        Ok(v) => {
            *out = v;
            Ok(())
        }
        Err(e) => Err(BusError::Serialize(e)),
    }
}

/// The encoded form of `frame` in a new buffer.
pub fn encode(frame: &BusFrame) -> Result<Vec<u8>, BusError> {
    let mut out = Vec::with_capacity(64);
    encode_into(frame, &mut out)?;
    Ok(out)
}

/// Validates `bytes` (a whole encoded frame, version byte first) and returns the archived frame,
/// borrowed in place. Never panics, whatever the bytes; any buffer alignment is accepted.
pub fn decode(bytes: &[u8]) -> Result<&ArchivedBusFrame, BusError> {
    let (&version, body) = bytes.split_first().ok_or(BusError::Empty)?;
    if version != VERSION {
        return Err(BusError::UnknownVersion { version });
    }
    rkyv::access::<ArchivedBusFrame, rancor::Error>(body).map_err(BusError::Invalid)
}

/// Deserializes a validated archived frame into an owned [`BusFrame`].
pub fn to_owned(frame: &ArchivedBusFrame) -> Result<BusFrame, BusError> {
    rkyv::deserialize::<BusFrame, rancor::Error>(frame).map_err(BusError::Serialize)
}

/// Counters of decode outcomes for one consumer (or one process), shared between threads.
#[derive(Debug, Default)]
pub struct FrameStats {
    ok: AtomicU64,
    unknown_version: AtomicU64,
    invalid: AtomicU64,
    logged_unknown_version: AtomicBool,
    logged_invalid: AtomicBool,
}

/// A copy of the counters of a [`FrameStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts {
    /// Frames decoded and validated.
    pub ok: u64,
    /// Frames skipped because their version byte is not [`VERSION`].
    pub unknown_version: u64,
    /// Frames skipped because they were empty or failed validation.
    pub invalid: u64,
}

impl FrameStats {
    pub const fn new() -> Self {
        FrameStats {
            ok: AtomicU64::new(0),
            unknown_version: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            logged_unknown_version: AtomicBool::new(false),
            logged_invalid: AtomicBool::new(false),
        }
    }

    pub fn counts(&self) -> FrameCounts {
        FrameCounts {
            ok: self.ok.load(Ordering::Relaxed),
            unknown_version: self.unknown_version.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }

    /// Counts one decode outcome of a frame of `len` bytes; logs the first failure of each kind.
    pub fn record<T>(&self, len: usize, result: &Result<T, BusError>) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(BusError::UnknownVersion { version }) => {
                self.unknown_version.fetch_add(1, Ordering::Relaxed);
                if !self.logged_unknown_version.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        version = *version,
                        expected = VERSION,
                        len,
                        "unknown bus frame version, frame skipped (logged once, counted after)"
                    );
                }
            }
            Err(e) => {
                self.invalid.fetch_add(1, Ordering::Relaxed);
                if !self.logged_invalid.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        len,
                        "invalid bus frame, frame skipped (logged once, counted after)"
                    );
                }
            }
        }
    }
}

/// [`decode`], with the outcome counted in `stats` (and the first failure of each kind logged).
pub fn decode_counted<'a>(
    stats: &FrameStats,
    bytes: &'a [u8],
) -> Result<&'a ArchivedBusFrame, BusError> {
    let r = decode(bytes);
    stats.record(bytes.len(), &r);
    r
}

#[cfg(test)]
mod tests {

    use proptest::prelude::*;

    use super::*;
    use crate::frame::*;

    fn deliver() -> Deliver {
        Deliver {
            id: 0x0102_0304_0506_0708,
            recipient: b"bob".to_vec(),
            sender: b"alice".to_vec(),
            payload: vec![0xab; 64],
            origin: "eu-west".into(),
            kind: 1,
            confirm: None,
        }
    }

    /// One frame of every variant, a route of every routable variant, and edge cases.
    fn samples() -> Vec<BusFrame> {
        let mut v = vec![
            BusFrame::Deliver(deliver()),
            BusFrame::Deliver(Deliver {
                id: 0,
                recipient: vec![],
                sender: vec![],
                payload: vec![],
                origin: String::new(),
                kind: u8::MAX,
                confirm: None,
            }),
            BusFrame::Deliver(Deliver {
                confirm: Some(Box::new(ConfirmTo {
                    client: u64::MAX,
                    node: 2,
                    shard: 1,
                    conn: 99,
                    run: 1_700_000_000_000,
                })),
                ..deliver()
            }),
            BusFrame::Ack(Ack {
                user: b"bob".to_vec(),
                id: u64::MAX,
            }),
            BusFrame::DrainRequest(DrainRequest {
                user: b"bob".to_vec(),
                node: 3,
                shard: 1,
                conn: 99,
                after: 41,
                limit: 512,
                region: String::new(),
            }),
            BusFrame::DrainRequest(DrainRequest {
                user: b"bob".to_vec(),
                node: 3,
                shard: 1,
                conn: 99,
                after: 0,
                limit: 512,
                region: "eu-west".into(),
            }),
            BusFrame::DrainChunk(DrainChunk {
                user: b"bob".to_vec(),
                node: 3,
                shard: 1,
                conn: 99,
                messages: (42..45)
                    .map(|id| Drained {
                        id,
                        sender: b"alice".to_vec(),
                        payload: format!("m{id}").into_bytes(),
                        kind: (id % 3) as u8,
                    })
                    .collect(),
                more: true,
            }),
            BusFrame::DrainChunk(DrainChunk {
                user: b"carol".to_vec(),
                node: 0,
                shard: 0,
                conn: 0,
                messages: vec![],
                more: false,
            }),
            BusFrame::Presence(Presence {
                user: "zoë".as_bytes().to_vec(),
                online: true,
                node: 7,
                shard: 2,
                unix_ms: 1_700_000_000_123,
            }),
        ];
        for kind in [
            RelayKind::TypingStart,
            RelayKind::TypingStop,
            RelayKind::ReadReceipt,
        ] {
            v.push(BusFrame::Relay(Relay {
                recipient: b"bob".to_vec(),
                kind,
                frame: b"\x72\x00\x05alice\x01".to_vec(),
            }));
        }
        v.extend([
            BusFrame::PrekeyPut(PrekeyPut {
                user: b"bob".to_vec(),
                bundle: b"\xa1\x61k\x01".to_vec(),
            }),
            BusFrame::PrekeyFetch(PrekeyFetch {
                user: b"bob".to_vec(),
                node: 2,
                shard: 1,
                conn: 17,
                region: "eu-west".into(),
            }),
            BusFrame::PrekeyBundle(PrekeyBundle {
                user: b"bob".to_vec(),
                node: 2,
                shard: 1,
                conn: 17,
                bundle: Some(b"\xa1\x61k\x01".to_vec()),
            }),
            BusFrame::PrekeyBundle(PrekeyBundle {
                user: b"nobody".to_vec(),
                node: 2,
                shard: 1,
                conn: 18,
                bundle: None,
            }),
            BusFrame::EdgeReset(EdgeReset {
                node: 4,
                unix_ms: 1_700_000_000_000,
            }),
            BusFrame::Stored(Stored {
                sender: b"alice".to_vec(),
                id: 0x0102_0304_0506_0708,
                home: "eu-west".into(),
            }),
            BusFrame::Confirmed(Confirmed {
                sender: b"alice".to_vec(),
                to: ConfirmTo {
                    client: 7,
                    node: 1,
                    shard: 0,
                    conn: 3,
                    run: 1_700_000_000_000,
                },
                id: 0x0102_0304_0506_0708,
                duplicate: true,
            }),
        ]);
        let routed: Vec<BusFrame> = v
            .iter()
            .cloned()
            .filter_map(|f| f.route_to("ap-south"))
            .collect();
        v.extend(routed);
        v
    }

    fn round_trip(frame: &BusFrame) {
        let bytes = encode(frame).unwrap();
        assert_eq!(bytes[0], VERSION);
        let archived = decode(&bytes).unwrap();
        assert_eq!(archived, frame);
        assert_eq!(archived.kind(), frame.kind());
        assert_eq!(archived.key_user(), frame.key_user());
        assert_eq!(&to_owned(archived).unwrap(), frame);
    }

    #[test]
    fn every_variant_round_trips() {
        let samples = samples();
        let kinds: std::collections::HashSet<_> = samples.iter().map(BusFrame::kind).collect();
        assert_eq!(kinds.len(), 13, "every FrameKind is sampled");
        for f in &samples {
            round_trip(f);
        }
    }

    #[test]
    fn fields_read_in_place() {
        let bytes = encode(&BusFrame::Deliver(deliver())).unwrap();
        let ArchivedBusFrame::Deliver(d) = decode(&bytes).unwrap() else {
            panic!("not a deliver");
        };
        assert_eq!(d.id.to_native(), 0x0102_0304_0506_0708);
        assert_eq!(d.recipient.as_slice(), b"bob");
        assert_eq!(d.sender.as_slice(), b"alice");
        assert_eq!(d.payload.as_slice(), &[0xab; 64][..]);
        assert_eq!(d.origin.as_str(), "eu-west");
        // The payload is borrowed from the input buffer, not copied.
        let range = bytes.as_ptr_range();
        assert!(range.contains(&d.payload.as_slice().as_ptr()));
    }

    /// Pins the wire format of version 4: if this changes (a type in `frame`, the rkyv version
    /// or its features), the version byte must be bumped (see `docs/BUS.md`).
    #[test]
    fn wire_format_of_version_4_is_pinned() {
        let ack = encode(&BusFrame::Ack(Ack {
            user: b"bob".to_vec(),
            id: 7,
        }))
        .unwrap();
        let mut want = vec![VERSION, b'b', b'o', b'b'];
        // Root: tag 1 (Ack), user = relative pointer -4 (i32 LE) and length 3 (u32 LE),
        // id = 7 (u64 LE), then zeros up to the size of the largest variant.
        want.extend_from_slice(&[
            1, 0xfc, 0xff, 0xff, 0xff, 3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0,
        ]);
        want.resize(63, 0);
        assert_eq!(ack, want);
        // A 64-byte message between short names: 53 bytes of framing (5 of them for the
        // absent v2 confirm request).
        assert_eq!(encode(&BusFrame::Deliver(deliver())).unwrap().len(), 132);
        let stored = encode(&BusFrame::Stored(Stored {
            sender: b"al".to_vec(),
            id: 7,
            home: "eu".into(),
        }))
        .unwrap();
        let mut want = vec![VERSION, b'a', b'l'];
        // Root: tag 11 (Stored), sender = relative pointer -3 and length 2, id = 7, home = "eu"
        // inline (rkyv keeps strings of up to 8 bytes inside the 8-byte string header).
        want.extend_from_slice(&[
            11, 0xfd, 0xff, 0xff, 0xff, 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0,
        ]);
        want.extend_from_slice(&[b'e', b'u', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        want.resize(62, 0);
        assert_eq!(stored, want);
    }

    #[test]
    fn encode_into_appends_after_existing_bytes() {
        let mut buf = b"junk".to_vec();
        let frame = BusFrame::Ack(Ack {
            user: b"u".to_vec(),
            id: 5,
        });
        encode_into(&frame, &mut buf).unwrap();
        assert_eq!(&buf[..4], b"junk");
        assert_eq!(decode(&buf[4..]).unwrap(), &frame);
        assert_eq!(&buf[4..], encode(&frame).unwrap().as_slice());
    }

    #[test]
    fn decodes_from_misaligned_buffers() {
        for frame in samples() {
            let bytes = encode(&frame).unwrap();
            for offset in 1..8 {
                let mut shifted = vec![0u8; offset];
                shifted.extend_from_slice(&bytes);
                let view = &shifted[offset..];
                assert_eq!(decode(view).unwrap(), &frame, "offset {offset}");
            }
            // Explicitly odd address, whatever the allocator's alignment.
            let mut v = vec![0u8; bytes.len() + 1];
            let start = usize::from((v.as_ptr() as usize).is_multiple_of(2));
            v[start..start + bytes.len()].copy_from_slice(&bytes);
            let view = &v[start..start + bytes.len()];
            assert_eq!(view.as_ptr() as usize % 2, 1);
            assert_eq!(decode(view).unwrap(), &frame);
        }
    }

    #[test]
    fn empty_and_unknown_version_are_errors() {
        assert!(matches!(decode(&[]), Err(BusError::Empty)));
        let mut bytes = encode(&BusFrame::Deliver(deliver())).unwrap();
        for v in [0u8, 1, 2, 3, 5, 0xff] {
            bytes[0] = v;
            assert!(matches!(
                decode(&bytes),
                Err(BusError::UnknownVersion { version }) if version == v
            ));
        }
        assert!(matches!(decode(&[VERSION]), Err(BusError::Invalid(_))));
    }

    #[test]
    fn truncated_frames_are_errors() {
        for frame in samples() {
            let bytes = encode(&frame).unwrap();
            for len in 1..bytes.len() {
                let r = decode(&bytes[..len]);
                assert!(
                    matches!(r, Err(BusError::Invalid(_))),
                    "{frame:?} cut at {len} of {} gave {r:?}",
                    bytes.len()
                );
            }
        }
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn arb_deliver() -> impl Strategy<Value = Deliver> {
        (
            any::<u64>(),
            bytes(40),
            bytes(40),
            bytes(300),
            "[a-z0-9-]{0,16}",
            any::<u8>(),
            proptest::option::of(arb_confirm_to()),
        )
            .prop_map(
                |(id, recipient, sender, payload, origin, kind, confirm)| Deliver {
                    id,
                    recipient,
                    sender,
                    payload,
                    origin,
                    kind,
                    confirm: confirm.map(Box::new),
                },
            )
    }

    fn arb_confirm_to() -> impl Strategy<Value = ConfirmTo> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(client, node, shard, conn, run)| ConfirmTo {
                client,
                node,
                shard,
                conn,
                run,
            })
    }

    fn arb_routed() -> impl Strategy<Value = Routed> {
        let relay_kind = prop_oneof![
            Just(RelayKind::TypingStart),
            Just(RelayKind::TypingStop),
            Just(RelayKind::ReadReceipt),
        ];
        prop_oneof![
            arb_deliver().prop_map(Routed::Deliver),
            (bytes(40), any::<u64>()).prop_map(|(user, id)| Routed::Ack(Ack { user, id })),
            (
                bytes(40),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                "[a-z0-9-]{0,16}",
            )
                .prop_map(|(user, node, shard, conn, after, limit, region)| {
                    Routed::DrainRequest(DrainRequest {
                        user,
                        node,
                        shard,
                        conn,
                        after,
                        limit,
                        region,
                    })
                }),
            (
                bytes(40),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(
                    (any::<u64>(), bytes(40), bytes(100), any::<u8>()).prop_map(
                        |(id, sender, payload, kind)| Drained {
                            id,
                            sender,
                            payload,
                            kind,
                        }
                    ),
                    0..8
                ),
                any::<bool>()
            )
                .prop_map(|(user, node, shard, conn, messages, more)| {
                    Routed::DrainChunk(DrainChunk {
                        user,
                        node,
                        shard,
                        conn,
                        messages,
                        more,
                    })
                }),
            (bytes(40), bytes(100))
                .prop_map(|(user, bundle)| { Routed::PrekeyPut(PrekeyPut { user, bundle }) }),
            (
                bytes(40),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                "[a-z0-9-]{0,16}",
            )
                .prop_map(|(user, node, shard, conn, region)| {
                    Routed::PrekeyFetch(PrekeyFetch {
                        user,
                        node,
                        shard,
                        conn,
                        region,
                    })
                }),
            (
                bytes(40),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                proptest::option::of(bytes(100)),
            )
                .prop_map(|(user, node, shard, conn, bundle)| {
                    Routed::PrekeyBundle(PrekeyBundle {
                        user,
                        node,
                        shard,
                        conn,
                        bundle,
                    })
                }),
            (bytes(40), any::<u64>(), "[a-z0-9-]{0,16}")
                .prop_map(|(sender, id, home)| Routed::Stored(Stored { sender, id, home })),
            (bytes(40), arb_confirm_to(), any::<u64>(), any::<bool>()).prop_map(
                |(sender, to, id, duplicate)| Routed::Confirmed(Confirmed {
                    sender,
                    to,
                    id,
                    duplicate,
                })
            ),
            (bytes(40), relay_kind, bytes(40)).prop_map(|(recipient, kind, frame)| {
                Routed::Relay(Relay {
                    recipient,
                    kind,
                    frame,
                })
            }),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = BusFrame> {
        prop_oneof![
            3 => arb_routed().prop_map(BusFrame::from),
            1 => (
                bytes(40),
                any::<bool>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(user, online, node, shard, unix_ms)| {
                    BusFrame::Presence(Presence {
                        user,
                        online,
                        node,
                        shard,
                        unix_ms,
                    })
                }),
            1 => (any::<u32>(), any::<u64>())
                .prop_map(|(node, unix_ms)| BusFrame::EdgeReset(EdgeReset { node, unix_ms })),
            1 => ("[a-z0-9-]{0,16}", arb_routed())
                .prop_map(|(region, inner)| BusFrame::Route(Route { region, inner })),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(frame in arb_frame(), offset in 0usize..8) {
            let bytes = encode(&frame).unwrap();
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(&bytes);
            let archived = decode(&shifted[offset..]).unwrap();
            prop_assert_eq!(archived, &frame);
            prop_assert_eq!(to_owned(archived).unwrap(), frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut raw in bytes(512), versioned in any::<bool>()) {
            if versioned && !raw.is_empty() {
                raw[0] = VERSION;
            }
            let stats = FrameStats::new();
            let r = decode_counted(&stats, &raw);
            // Whatever validated must deserialize and re-encode to something that decodes.
            if let Ok(archived) = r {
                let owned = to_owned(archived).unwrap();
                let again = encode(&owned).unwrap();
                prop_assert_eq!(decode(&again).unwrap(), &owned);
            }
            let c = stats.counts();
            prop_assert_eq!(c.ok + c.unknown_version + c.invalid, 1);
        }

        #[test]
        fn corrupted_frames_never_panic(
            frame in arb_frame(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&frame).unwrap();
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            let len = cut.index(bytes.len() + 1);
            if let Ok(archived) = decode(&bytes[..len]) {
                to_owned(archived).unwrap();
            }
        }
    }
}
