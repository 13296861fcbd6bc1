//! Tests of the v2 codec: the byte-level examples of `docs/PROTOCOL-v2.md` (read from the
//! document itself, so the document and the code cannot drift apart), round trips of every
//! frame of both directions, prefixes, oversize lengths, refusals, and arbitrary bytes.

use super::*;
use proptest::prelude::*;

/// The contract, whose `<!-- example: NAME -->` blocks are checked below.
const DOC: &str = include_str!("../../../docs/PROTOCOL-v2.md");

/// The server id of the examples: accepted 2025-01-01T00:00:00Z on shard 1.
const ID: u64 = 0x0730_aa7a_d000_0001;
/// Its accept time.
const T: u64 = 1_735_689_600_000;
/// The CBOR map `{"ik": h'0102'}`.
const CBOR: &[u8] = &[0xa1, 0x62, 0x69, 0x6b, 0x42, 0x01, 0x02];

fn client_examples() -> Vec<(&'static str, ClientFrame)> {
    vec![
        (
            "c-hello",
            ClientFrame::Hello {
                client_name: b"iris-js".to_vec(),
                client_version: b"2.0.1".to_vec(),
                token: b"alice".to_vec(),
                resume_after: 0,
            },
        ),
        (
            "c-send",
            ClientFrame::Send {
                client_msg_id: 1,
                recipient: b"bob".to_vec(),
                kind: MsgKind::Plain,
                payload: b"hi".to_vec(),
            },
        ),
        ("c-ack", ClientFrame::Ack { ids: vec![ID] }),
        (
            "c-receipt",
            ClientFrame::Receipt {
                kind: ReceiptKind::Read,
                sender: b"alice".to_vec(),
                ids: vec![ID],
            },
        ),
        (
            "c-typing",
            ClientFrame::Typing {
                target: b"alice".to_vec(),
                typing: true,
            },
        ),
        (
            "c-status-query",
            ClientFrame::StatusQuery {
                user: b"bob".to_vec(),
            },
        ),
        ("c-ping", ClientFrame::Ping { nonce: 42 }),
        ("c-pong", ClientFrame::Pong { nonce: 9 }),
        (
            "c-prekey-fetch",
            ClientFrame::PrekeyFetch {
                user: b"bob".to_vec(),
            },
        ),
        (
            "c-prekey-upload",
            ClientFrame::PrekeyUpload {
                bundle: CBOR.to_vec(),
            },
        ),
    ]
}

fn server_examples() -> Vec<(&'static str, ServerFrame)> {
    vec![
        (
            "s-hello-ok",
            ServerFrame::HelloOk {
                version: 2,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES as u32,
                ping_interval_ms: 30_000,
                send_rate_per_sec: 50,
                send_burst: 100,
                session_id: 7,
                server_time_unix_ms: T,
            },
        ),
        (
            "s-send-ack",
            ServerFrame::SendAck {
                client_msg_id: 1,
                server_id: ID,
                server_time_unix_ms: T,
            },
        ),
        (
            "s-deliver",
            ServerFrame::Deliver {
                server_id: ID,
                sender: b"alice".to_vec(),
                server_time_unix_ms: T,
                kind: MsgKind::Plain,
                payload: b"hi".to_vec(),
            },
        ),
        (
            "s-receipt",
            ServerFrame::Receipt {
                kind: ReceiptKind::Read,
                reader: b"bob".to_vec(),
                unix_ms: T + 1500,
                ids: vec![ID],
            },
        ),
        (
            "s-typing",
            ServerFrame::Typing {
                sender: b"alice".to_vec(),
                typing: true,
            },
        ),
        (
            "s-status",
            ServerFrame::Status {
                user: b"bob".to_vec(),
                online: false,
                last_seen_unix_secs: 1_735_689_000,
            },
        ),
        ("s-ping", ServerFrame::Ping { nonce: 9 }),
        ("s-pong", ServerFrame::Pong { nonce: 42 }),
        (
            "s-prekeys",
            ServerFrame::Prekeys {
                user: b"bob".to_vec(),
                bundle: CBOR.to_vec(),
            },
        ),
        (
            "s-prekeys-not-found",
            ServerFrame::Prekeys {
                user: b"carol".to_vec(),
                bundle: Vec::new(),
            },
        ),
        (
            "s-rate-limited",
            ServerFrame::RateLimited {
                what: LimitedAction::Send,
                retry_after_ms: 250,
                reference: 1,
            },
        ),
        (
            "s-error",
            ServerFrame::error(ErrorCode::RecipientTooLong, 2),
        ),
        (
            "s-error-unknown-type",
            ServerFrame::error(ErrorCode::UnknownType, 0),
        ),
    ]
}

/// The bytes of every `<!-- example: NAME -->` block of the document: each line of the
/// ```` ```text ```` block that follows, up to the first double space, is hex bytes.
fn doc_examples() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.next().map(str::trim), Some("```text"), "{name}");
        let mut bytes = Vec::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            let hex = l.split("  ").next().unwrap_or("");
            for tok in hex.split_whitespace() {
                assert_eq!(tok.len(), 2, "{name}: {tok:?} in {l:?}");
                bytes.push(u8::from_str_radix(tok, 16).expect("hex byte"));
            }
        }
        out.push((name.to_owned(), bytes));
    }
    out
}

fn enc_c(f: &ClientFrame) -> Vec<u8> {
    let mut v = Vec::new();
    encode_client(f, &mut v);
    v
}

fn enc_s(f: &ServerFrame) -> Vec<u8> {
    let mut v = Vec::new();
    encode_server(f, &mut v);
    v
}

const MAX: usize = DEFAULT_MAX_FRAME_BYTES;

#[test]
fn the_documented_examples_are_the_codec_bytes() {
    let doc = doc_examples();
    let client = client_examples();
    let server = server_examples();
    let names: Vec<&str> = doc.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = client
        .iter()
        .map(|(n, _)| *n)
        .chain(server.iter().map(|(n, _)| *n))
        .collect();
    assert_eq!(names, want, "the document's examples, in order");
    for ((name, bytes), (_, frame)) in doc.iter().zip(&client) {
        assert_eq!(&enc_c(frame), bytes, "{name}: encoding");
        let got = decode_client(bytes, MAX).unwrap();
        assert_eq!(
            got,
            Decoded::Frame {
                frame: frame.clone(),
                consumed: bytes.len()
            },
            "{name}"
        );
    }
    for ((name, bytes), (_, frame)) in doc.iter().skip(client.len()).zip(&server) {
        assert_eq!(&enc_s(frame), bytes, "{name}: encoding");
        let got = decode_server(bytes, MAX).unwrap();
        assert_eq!(
            got,
            Decoded::Frame {
                frame: frame.clone(),
                consumed: bytes.len()
            },
            "{name}"
        );
    }
    // Every type byte has an example.
    let mut tys: Vec<u8> = client.iter().map(|(_, f)| f.ty()).collect();
    tys.extend(server.iter().map(|(_, f)| f.ty()));
    tys.dedup();
    assert_eq!(
        tys,
        [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
            0x8a, 0x8b
        ]
    );
}

#[test]
fn the_example_id_carries_the_example_time() {
    assert_eq!(id::id_unix_ms(ID), T);
    assert_eq!(&id::id_v1_text(ID), b"0730aa7ad0000001");
}

#[test]
fn the_documented_error_table_is_the_code_table() {
    // Every row `| 1007 | `recipient_too_long` | open | ...` of the document, in order.
    let rows: Vec<(u16, String, bool)> = DOC
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let code: u16 = cells.get(1)?.parse().ok()?;
            let reason = cells.get(2)?.trim_matches('`').to_owned();
            let closes = match *cells.get(3)? {
                "closes" => true,
                "stays open" => false,
                other => panic!("code {code}: {other:?}"),
            };
            Some((code, reason, closes))
        })
        .collect();
    let want: Vec<(u16, String, bool)> = ErrorCode::ALL
        .iter()
        .map(|c| (c.code(), c.reason().to_owned(), c.closes()))
        .collect();
    assert_eq!(rows, want);
}

#[test]
fn the_documented_type_table_is_the_codec() {
    // Rows `| 0x02 | SEND | ...` of the document's type table.
    let rows: Vec<(u8, String)> = DOC
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let t = u8::from_str_radix(cells.get(1)?.strip_prefix("`0x")?.strip_suffix('`')?, 16)
                .ok()?;
            Some((t, cells.get(2)?.to_string()))
        })
        .collect();
    let mut want: Vec<(u8, String)> = Vec::new();
    for (name, f) in client_examples() {
        if !want.iter().any(|(t, _)| *t == f.ty()) {
            want.push((f.ty(), name.to_owned()));
        }
    }
    for (name, f) in server_examples() {
        if !want.iter().any(|(t, _)| *t == f.ty()) {
            want.push((f.ty(), name.to_owned()));
        }
    }
    let got: Vec<u8> = rows.iter().map(|(t, _)| *t).collect();
    let want_tys: Vec<u8> = want.iter().map(|(t, _)| *t).collect();
    assert_eq!(got, want_tys);
    // The names match the examples' names (`c-status-query` <-> `STATUS_QUERY`).
    for ((_, doc_name), (_, ex)) in rows.iter().zip(&want) {
        let ex = ex[2..].replace('-', "_").to_uppercase();
        assert_eq!(doc_name.trim_matches('`'), ex);
    }
}

#[test]
fn every_strict_prefix_of_every_example_is_incomplete() {
    for (name, bytes) in doc_examples() {
        for k in 0..bytes.len() {
            let total = if k < 4 { None } else { Some(bytes.len()) };
            if name.starts_with("c-") {
                let want = Decoded::Incomplete { total };
                assert_eq!(
                    decode_client(&bytes[..k], MAX).unwrap(),
                    want,
                    "{name}[..{k}]"
                );
            } else {
                let want = Decoded::Incomplete { total };
                assert_eq!(
                    decode_server(&bytes[..k], MAX).unwrap(),
                    want,
                    "{name}[..{k}]"
                );
            }
        }
    }
}

#[test]
fn frames_back_to_back_decode_one_after_another() {
    let mut buf = Vec::new();
    let frames: Vec<ClientFrame> = client_examples().into_iter().map(|(_, f)| f).collect();
    for f in &frames {
        encode_client(f, &mut buf);
    }
    let mut at = 0;
    let mut got = Vec::new();
    while at < buf.len() {
        match decode_client(&buf[at..], MAX).unwrap() {
            Decoded::Frame { frame, consumed } => {
                got.push(frame);
                at += consumed;
            }
            other => panic!("{other:?} at {at}"),
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn oversize_len_is_refused_from_the_length_field_alone() {
    // Only the 4 length bytes: no body, no type byte.
    let len = (MAX + 1) as u32;
    let err = decode_client(&len.to_be_bytes(), MAX).unwrap_err();
    assert_eq!(err, WireError::FrameTooLarge { len, max: MAX });
    assert_eq!(
        (err.code(), err.reason(), err.skip()),
        (1001, "frame_too_large", None)
    );
    assert!(decode_server(&u32::MAX.to_be_bytes(), MAX).is_err());
    // Exactly the maximum is fine (and incomplete until all there).
    let len = MAX as u32;
    assert_eq!(
        decode_client(&len.to_be_bytes(), MAX).unwrap(),
        Decoded::Incomplete {
            total: Some(MAX + 4)
        }
    );
    // Before HELLO_OK the server allows 4 KiB.
    let big_hello = ClientFrame::Hello {
        client_name: vec![b'x'; 5000],
        client_version: Vec::new(),
        token: b"alice".to_vec(),
        resume_after: 0,
    };
    let b = enc_c(&big_hello);
    assert!(matches!(
        decode_client(&b[..4], MAX_HELLO_FRAME_BYTES),
        Err(WireError::FrameTooLarge { .. })
    ));
    assert!(matches!(decode_client(&b, MAX), Ok(Decoded::Frame { .. })));
}

#[test]
fn len_zero_is_a_bad_frame_that_closes() {
    let err = decode_client(&[0, 0, 0, 0], MAX).unwrap_err();
    assert_eq!(err, WireError::EmptyFrame);
    assert_eq!((err.code(), err.skip()), (1000, None));
    assert_eq!(
        decode_server(&[0, 0, 0, 0, 1], MAX).unwrap_err(),
        WireError::EmptyFrame
    );
}

#[test]
fn unknown_types_are_skipped_by_their_length() {
    // A server frame type sent to the server, an unassigned type, and type 0.
    for t in [0x00u8, 0x0b, 0x7f, 0x81, 0xff] {
        let mut b = vec![0, 0, 0, 3, t, 0xaa, 0xbb];
        b.extend_from_slice(&enc_c(&ClientFrame::Ping { nonce: 1 }));
        assert_eq!(
            decode_client(&b, MAX).unwrap(),
            Decoded::Unknown { ty: t, consumed: 7 }
        );
        assert_eq!(
            decode_client(&b[7..], MAX).unwrap(),
            Decoded::Frame {
                frame: ClientFrame::Ping { nonce: 1 },
                consumed: 13
            }
        );
        // Incomplete until the whole frame is there.
        assert_eq!(
            decode_client(&b[..6], MAX).unwrap(),
            Decoded::Incomplete { total: Some(7) }
        );
    }
    // Client types sent to a client.
    assert_eq!(
        decode_server(&enc_c(&ClientFrame::Ping { nonce: 1 }), MAX).unwrap(),
        Decoded::Unknown {
            ty: 0x07,
            consumed: 13
        }
    );
}

#[test]
fn malformed_bodies_close() {
    let ping = enc_c(&ClientFrame::Ping { nonce: 1 });
    // Short: PING with a 7-byte nonce.
    let short = [0, 0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 1];
    assert_eq!(
        decode_client(&short, MAX),
        Err(WireError::BadFrame { ty: 7 })
    );
    // Long: PING with a byte left over.
    let mut long = ping.clone();
    long[3] += 1;
    long.push(0);
    assert_eq!(
        decode_client(&long, MAX),
        Err(WireError::BadFrame { ty: 7 })
    );
    // A str longer than its frame.
    let b = [0, 0, 0, 4, 6, 0, 5, b'b'];
    assert_eq!(decode_client(&b, MAX), Err(WireError::BadFrame { ty: 6 }));
    // TYPING state 2.
    let mut t = enc_c(&ClientFrame::Typing {
        target: b"a".to_vec(),
        typing: true,
    });
    *t.last_mut().unwrap() = 2;
    assert_eq!(decode_client(&t, MAX), Err(WireError::BadFrame { ty: 5 }));
    // ACK whose count says 2 but holds 1 id.
    let mut a = enc_c(&ClientFrame::Ack { ids: vec![ID] });
    a[6] = 2;
    assert_eq!(decode_client(&a, MAX), Err(WireError::BadFrame { ty: 3 }));
    // HELLO version 3.
    let mut h = enc_c(&client_examples()[0].1);
    h[5] = 3;
    let e = decode_client(&h, MAX).unwrap_err();
    assert_eq!(e, WireError::UnsupportedVersion { version: 3 });
    assert_eq!((e.code(), e.skip()), (1006, None));
    // A non-ASCII ERROR reason, and an unknown RATE_LIMITED `what`.
    let mut e = enc_s(&ServerFrame::error(ErrorCode::BadUser, 0));
    e[8] = 0xc3;
    assert_eq!(
        decode_server(&e, MAX),
        Err(WireError::BadFrame { ty: 0x8b })
    );
    let mut r = enc_s(&ServerFrame::RateLimited {
        what: LimitedAction::Login,
        retry_after_ms: 1,
        reference: 0,
    });
    r[5] = 5;
    assert_eq!(
        decode_server(&r, MAX),
        Err(WireError::BadFrame { ty: 0x8a })
    );
    let e = WireError::BadFrame { ty: 7 };
    assert_eq!((e.code(), e.reason(), e.skip()), (1000, "bad_frame", None));
}

fn send(recipient: &[u8], kind: u8, payload_len: usize) -> Vec<u8> {
    let mut b = enc_c(&ClientFrame::Send {
        client_msg_id: 77,
        recipient: recipient.to_vec(),
        kind: MsgKind::Plain,
        payload: vec![0x5a; payload_len],
    });
    let k = 4 + 1 + 8 + 2 + recipient.len();
    b[k] = kind;
    b
}

#[test]
fn refused_values_keep_the_connection_and_name_the_message() {
    // Recipient 257 bytes.
    let b = send(&[b'r'; 257], 0, 3);
    let e = decode_client(&b, MAX).unwrap_err();
    assert_eq!(
        e,
        WireError::RecipientTooLong {
            client_msg_id: 77,
            len: 257,
            consumed: b.len()
        }
    );
    assert_eq!(
        (e.code(), e.reason(), e.reference(), e.skip()),
        (1007, "recipient_too_long", 77, Some(b.len()))
    );
    // 256 is fine.
    assert!(matches!(
        decode_client(&send(&[b'r'; 256], 0, 3), MAX),
        Ok(Decoded::Frame { .. })
    ));
    // Empty recipient.
    let b = send(b"", 0, 3);
    let e = decode_client(&b, MAX).unwrap_err();
    assert_eq!(
        (e.code(), e.reference(), e.skip()),
        (1008, 77, Some(b.len()))
    );
    // Unknown kind.
    let b = send(b"bob", 3, 3);
    let e = decode_client(&b, MAX).unwrap_err();
    assert_eq!(
        e,
        WireError::UnknownKind {
            ty: 2,
            kind: 3,
            reference: 77,
            consumed: b.len()
        }
    );
    assert_eq!((e.code(), e.reason()), (1009, "unknown_kind"));
    // Payload over max - overhead, frame within max.
    let small_max = MIN_MAX_FRAME_BYTES;
    let ok = small_max - FRAME_OVERHEAD_BYTES;
    assert!(matches!(
        decode_client(&send(b"bob", 0, ok), small_max),
        Ok(Decoded::Frame { .. })
    ));
    let b = send(b"bob", 0, ok + 1);
    let e = decode_client(&b, small_max).unwrap_err();
    assert_eq!(
        e,
        WireError::PayloadTooLarge {
            reference: 77,
            len: ok + 1,
            max: ok,
            consumed: b.len()
        }
    );
    assert_eq!(e.code(), 1012);
    // ACK of 0 ids, 1025 ids; 1024 is fine.
    for (n, fine) in [(0usize, false), (1, true), (1024, true), (1025, false)] {
        let b = enc_c(&ClientFrame::Ack { ids: vec![ID; n] });
        match decode_client(&b, MAX) {
            Ok(Decoded::Frame { .. }) => assert!(fine, "{n}"),
            Err(e) => {
                assert!(!fine, "{n}");
                assert_eq!(
                    e,
                    WireError::BadIdCount {
                        ty: 3,
                        count: n as u16,
                        consumed: b.len()
                    }
                );
                assert_eq!((e.code(), e.skip()), (1010, Some(b.len())));
            }
            other => panic!("{other:?}"),
        }
    }
    // Prekey bundle of 8193 bytes; 8192 is fine.
    let b = enc_c(&ClientFrame::PrekeyUpload {
        bundle: vec![0xa0; 8193],
    });
    let e = decode_client(&b, MAX).unwrap_err();
    assert_eq!(
        (e.code(), e.reason(), e.skip()),
        (1011, "prekeys_too_large", Some(b.len()))
    );
    let b = enc_c(&ClientFrame::PrekeyUpload {
        bundle: vec![0xa0; 8192],
    });
    assert!(matches!(decode_client(&b, MAX), Ok(Decoded::Frame { .. })));
    // User names of other frames: empty, 257.
    for user in [Vec::new(), vec![b'u'; 257]] {
        let b = enc_c(&ClientFrame::StatusQuery { user: user.clone() });
        let e = decode_client(&b, MAX).unwrap_err();
        assert_eq!(
            e,
            WireError::BadUser {
                ty: 6,
                len: user.len(),
                reference: 0,
                consumed: b.len()
            }
        );
        assert_eq!(e.skip(), Some(b.len()));
    }
    // After a skip, the next frame decodes.
    let mut b = send(&[b'r'; 300], 0, 1);
    let skip = decode_client(&b, MAX).unwrap_err().skip().unwrap();
    encode_client(&ClientFrame::Ping { nonce: 5 }, &mut b);
    assert_eq!(
        decode_client(&b[skip..], MAX).unwrap(),
        Decoded::Frame {
            frame: ClientFrame::Ping { nonce: 5 },
            consumed: 13
        }
    );
}

#[test]
fn encoders_cut_oversized_fields_to_a_well_formed_frame() {
    // A str of 70,000 bytes is cut to 65,535; the frame is still well delimited.
    let b = enc_c(&ClientFrame::StatusQuery {
        user: vec![b'u'; 70_000],
    });
    assert_eq!(b.len(), 4 + 1 + 2 + 65_535);
    assert_eq!(
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
        b.len() - 4
    );
    // A non-ASCII reason is written with '?'.
    let b = enc_s(&ServerFrame::Error {
        code: 1,
        reason: "é!".into(),
        reference: 0,
    });
    let Decoded::Frame {
        frame: ServerFrame::Error { reason, .. },
        ..
    } = decode_server(&b, MAX).unwrap()
    else {
        panic!("not an error frame");
    };
    assert_eq!(reason, "??!");
    // Appending keeps what was there.
    let mut out = vec![0xee];
    encode_server(&ServerFrame::Ping { nonce: 1 }, &mut out);
    assert_eq!(out[0], 0xee);
    assert_eq!(out.len(), 14);
}

// ---- property tests ----

fn user() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..=16),
        proptest::collection::vec(any::<u8>(), 1..=MAX_USER_BYTES),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

fn ids() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        proptest::collection::vec(any::<u64>(), 1..=4),
        proptest::collection::vec(any::<u64>(), 1..=MAX_ACK_IDS),
    ]
}

fn msg_kind() -> impl Strategy<Value = MsgKind> {
    prop_oneof![
        Just(MsgKind::Plain),
        Just(MsgKind::Cbor),
        Just(MsgKind::E2ee)
    ]
}

fn receipt_kind() -> impl Strategy<Value = ReceiptKind> {
    prop_oneof![Just(ReceiptKind::Delivered), Just(ReceiptKind::Read)]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (bytes(64), bytes(32), bytes(1024), any::<u64>()).prop_map(|(n, v, t, r)| {
            ClientFrame::Hello {
                client_name: n,
                client_version: v,
                token: t,
                resume_after: r,
            }
        }),
        (any::<u64>(), user(), msg_kind(), bytes(2048)).prop_map(|(c, r, k, p)| {
            ClientFrame::Send {
                client_msg_id: c,
                recipient: r,
                kind: k,
                payload: p,
            }
        }),
        ids().prop_map(|ids| ClientFrame::Ack { ids }),
        (receipt_kind(), user(), ids()).prop_map(|(kind, sender, ids)| ClientFrame::Receipt {
            kind,
            sender,
            ids
        }),
        (user(), any::<bool>()).prop_map(|(target, typing)| ClientFrame::Typing { target, typing }),
        user().prop_map(|user| ClientFrame::StatusQuery { user }),
        any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| ClientFrame::Pong { nonce }),
        user().prop_map(|user| ClientFrame::PrekeyFetch { user }),
        bytes(MAX_PREKEY_BYTES).prop_map(|bundle| ClientFrame::PrekeyUpload { bundle }),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let limited = prop_oneof![
        Just(LimitedAction::Send),
        Just(LimitedAction::Relay),
        Just(LimitedAction::PrekeyFetch),
        Just(LimitedAction::Login),
    ];
    prop_oneof![
        (
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(v, m, p, r, b, s, t)| ServerFrame::HelloOk {
                version: v,
                max_frame_bytes: m,
                ping_interval_ms: p,
                send_rate_per_sec: r,
                send_burst: b,
                session_id: s,
                server_time_unix_ms: t,
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(c, s, t)| ServerFrame::SendAck {
            client_msg_id: c,
            server_id: s,
            server_time_unix_ms: t,
        }),
        (any::<u64>(), user(), any::<u64>(), msg_kind(), bytes(2048)).prop_map(
            |(i, s, t, k, p)| {
                ServerFrame::Deliver {
                    server_id: i,
                    sender: s,
                    server_time_unix_ms: t,
                    kind: k,
                    payload: p,
                }
            }
        ),
        (receipt_kind(), user(), any::<u64>(), ids()).prop_map(|(kind, reader, unix_ms, ids)| {
            ServerFrame::Receipt {
                kind,
                reader,
                unix_ms,
                ids,
            }
        }),
        (user(), any::<bool>()).prop_map(|(sender, typing)| ServerFrame::Typing { sender, typing }),
        (user(), any::<bool>(), any::<u64>()).prop_map(|(user, online, last)| {
            ServerFrame::Status {
                user,
                online,
                last_seen_unix_secs: last,
            }
        }),
        any::<u64>().prop_map(|nonce| ServerFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| ServerFrame::Pong { nonce }),
        (user(), bytes(MAX_PREKEY_BYTES))
            .prop_map(|(user, bundle)| ServerFrame::Prekeys { user, bundle }),
        (limited, any::<u32>(), any::<u64>()).prop_map(|(what, retry_after_ms, reference)| {
            ServerFrame::RateLimited {
                what,
                retry_after_ms,
                reference,
            }
        }),
        (any::<u16>(), "[ -~]{0,64}", any::<u64>()).prop_map(|(code, reason, reference)| {
            ServerFrame::Error {
                code,
                reason,
                reference,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_frames_round_trip(f in client_frame(), tail in bytes(16)) {
        let mut b = enc_c(&f);
        let n = b.len();
        prop_assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize, n - 4);
        prop_assert_eq!(b[4], f.ty());
        b.extend_from_slice(&tail);
        prop_assert_eq!(decode_client(&b, MAX), Ok(Decoded::Frame { frame: f, consumed: n }));
    }

    #[test]
    fn server_frames_round_trip(f in server_frame(), tail in bytes(16)) {
        let mut b = enc_s(&f);
        let n = b.len();
        prop_assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize, n - 4);
        prop_assert_eq!(b[4], f.ty());
        b.extend_from_slice(&tail);
        prop_assert_eq!(decode_server(&b, MAX), Ok(Decoded::Frame { frame: f, consumed: n }));
    }

    #[test]
    fn every_prefix_of_a_client_frame_is_incomplete(f in client_frame()) {
        let b = enc_c(&f);
        for k in 0..b.len() {
            let total = if k < 4 { None } else { Some(b.len()) };
            prop_assert_eq!(decode_client(&b[..k], MAX), Ok(Decoded::Incomplete { total }));
        }
    }

    #[test]
    fn every_prefix_of_a_server_frame_is_incomplete(f in server_frame()) {
        let b = enc_s(&f);
        for k in 0..b.len() {
            let total = if k < 4 { None } else { Some(b.len()) };
            prop_assert_eq!(decode_server(&b[..k], MAX), Ok(Decoded::Incomplete { total }));
        }
    }

    #[test]
    fn any_bytes_never_panic(b in bytes(96), max in prop_oneof![Just(0usize), 1..64usize, Just(MAX)]) {
        for d in [decode_client(&b, max).map(|d| size(&d)), decode_server(&b, max).map(|d| size(&d))] {
            match d {
                Ok(Some(n)) => prop_assert!((5..=b.len()).contains(&n)),
                Ok(None) => {}
                Err(e) => {
                    if let Some(n) = e.skip() {
                        prop_assert!((5..=b.len()).contains(&n));
                    }
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    #[test]
    fn framed_noise_never_panics_and_re_encodes(t in any::<u8>(), body in bytes(64)) {
        // Random bodies behind a correct length and a known or unknown type byte.
        let mut b = u32::try_from(body.len() + 1).unwrap().to_be_bytes().to_vec();
        b.push(t);
        b.extend_from_slice(&body);
        if let Ok(Decoded::Frame { frame, consumed }) = decode_client(&b, MAX) {
            prop_assert_eq!(consumed, b.len());
            prop_assert_eq!(enc_c(&frame), b.clone());
        }
        if let Ok(Decoded::Frame { frame, consumed }) = decode_server(&b, MAX) {
            prop_assert_eq!(consumed, b.len());
            prop_assert_eq!(enc_s(&frame), b.clone());
        }
    }

    #[test]
    fn split_reads_decode_as_whole(f in client_frame(), cut in any::<prop::sample::Index>()) {
        // Whatever the cut, the first part is incomplete and the whole decodes the same.
        let b = enc_c(&f);
        let k = cut.index(b.len());
        let incomplete = matches!(decode_client(&b[..k], MAX), Ok(Decoded::Incomplete { .. }));
        prop_assert!(incomplete);
        prop_assert_eq!(decode_client(&b, MAX), Ok(Decoded::Frame { frame: f, consumed: b.len() }));
    }
}

/// The size a result names, if any.
fn size<F>(d: &Decoded<F>) -> Option<usize> {
    match d {
        Decoded::Incomplete { .. } => None,
        Decoded::Frame { consumed, .. } | Decoded::Unknown { consumed, .. } => Some(*consumed),
    }
}
