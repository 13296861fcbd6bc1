//! The server's codec (`iris_edge::protocol`) against our hand-written encoders and decoder:
//! every client frame encodes to the same bytes and decodes to the same fields, and every kind
//! of server frame received over a real socket decodes the same with both decoders. Message ids
//! round-trip through `MsgId`.

use iris_edge::protocol::frame::{decode_server as edge_decode_server, ClientFrame, ServerFrame};
use iris_edge::protocol::{decode, Decoded, Limits, MsgId};
use iris_tests::{cbor, wire, Bytes, Frame, Server};

#[test]
fn client_frames_encode_and_decode_identically() {
    let map = cbor::map(&[("k", cbor::V::Text("v"))]);
    let id = MsgId(0x0123_4567_89ab_cdef);
    let blob = [wire::l16(b"one"), wire::l16(b"two")].concat();
    let group_raw = wire::raw(
        0x33,
        &[wire::l16(b"g"), wire::l16(&map), wire::l32(b"ct")].concat(),
    );
    let cases: Vec<(ClientFrame<'_>, Vec<u8>)> = vec![
        (ClientFrame::Login { body: b"alice" }, wire::login(b"alice")),
        (
            ClientFrame::Send {
                target: b"bob",
                msg: b"hi",
            },
            wire::send(b"bob", b"hi"),
        ),
        (ClientFrame::Ack { id }, wire::ack(b"0123456789abcdef")),
        (
            ClientFrame::BatchSend {
                target: b"bob",
                blob: &blob,
            },
            wire::batch_send(b"bob", &[b"one", b"two"]),
        ),
        (
            ClientFrame::GetStatus { target: b"bob" },
            wire::get_status(b"bob"),
        ),
        (
            ClientFrame::SendSeq {
                target: b"bob",
                seq: 0x0102_0304_0506_0708,
                msg: b"s",
            },
            wire::send_seq(b"bob", 0x0102_0304_0506_0708, b"s"),
        ),
        (
            ClientFrame::CborMsg {
                target: b"bob",
                cbor: &map,
            },
            wire::cbor_msg(b"bob", &map),
        ),
        (
            ClientFrame::UploadPrekeys { bundle: &map },
            wire::upload_prekeys(&map),
        ),
        (
            ClientFrame::FetchPrekeys { user: b"bob" },
            wire::fetch_prekeys(b"bob"),
        ),
        (
            ClientFrame::E2eeMsg {
                recipient: b"bob",
                header: &map,
                ciphertext: b"ct",
            },
            wire::e2ee_msg(b"bob", &map, b"ct"),
        ),
        (
            ClientFrame::Group {
                op: 0x33,
                raw: &group_raw,
            },
            group_raw.clone(),
        ),
        (
            ClientFrame::Typing {
                target: b"bob",
                on: true,
            },
            wire::typing(b"bob", true),
        ),
        (
            ClientFrame::Typing {
                target: b"bob",
                on: false,
            },
            wire::typing(b"bob", false),
        ),
        (
            ClientFrame::ReadReceipt {
                id: b"0123456789abcdef",
                sender: b"alice",
            },
            wire::read_receipt(b"0123456789abcdef", b"alice"),
        ),
    ];
    let limits = Limits::default();
    for (frame, ours) in &cases {
        let mut theirs = Vec::new();
        frame.encode(&mut theirs);
        assert_eq!(
            &theirs,
            ours,
            "encoding of {frame:?}: server {:?} vs ours {:?}",
            Bytes(&theirs),
            Bytes(ours)
        );
        match decode(ours, &limits) {
            Ok(Decoded::Frame(f, n)) => {
                assert_eq!(&f, frame, "decoding {:?}", Bytes(ours));
                assert_eq!(n, ours.len(), "decoded length of {frame:?}");
            }
            other => panic!("decoding {:?}: {other:?}", Bytes(ours)),
        }
    }
}

fn same(ours: &Frame, theirs: &ServerFrame<'_>) -> bool {
    match (ours, theirs) {
        (Frame::LoginOk, ServerFrame::LoginOk) => true,
        (
            Frame::Reliable { id, payload },
            ServerFrame::Reliable {
                id: i2,
                payload: p2,
            },
        ) => id == i2 && payload == p2,
        (
            Frame::Status {
                user,
                online,
                last_seen,
            },
            ServerFrame::Status {
                user: u2,
                online: o2,
                last_seen: l2,
            },
        ) => user == u2 && (*online == 1) == *o2 && last_seen == l2,
        (Frame::Typing { sender, on }, ServerFrame::Typing { sender: s2, on: o2 }) => {
            sender == s2 && (*on == 1) == *o2
        }
        (
            Frame::Receipt {
                id,
                reader,
                unix_ms,
            },
            ServerFrame::ReceiptRelay {
                id: i2,
                reader: r2,
                unix_ms: u2,
            },
        ) => id == i2 && reader == r2 && unix_ms == u2,
        (Frame::Error(r), ServerFrame::Error { reason }) => r.as_bytes() == *reason,
        (Frame::RateLimited(ms), ServerFrame::RateLimited { retry_after_ms }) => {
            ms == retry_after_ms
        }
        (Frame::Prekeys(c), ServerFrame::PrekeyResponse { cbor }) => c == cbor,
        _ => false,
    }
}

#[test]
fn live_server_frames_decode_identically() {
    let s = Server::with_shards(2);
    let mut a = s.connect();
    let mut b = s.login("ag-b");
    a.write(&wire::login(b"ag-a"));
    let mut raws = vec![a.recv_raw()];
    a.send("ag-b", b"payload");
    let (f, raw) = b.recv_raw();
    let id = match &f {
        Frame::Reliable { id, .. } => id.clone(),
        other => panic!("{other:?}"),
    };
    raws.push((f, raw));
    let parsed = MsgId::parse(&id).expect("server id parses as MsgId");
    assert_eq!(
        &parsed.encode()[..],
        &id[..],
        "MsgId round trip of {:?}",
        Bytes(&id)
    );
    b.wait_online("ag-a");
    b.write(&wire::read_receipt(&id, b"ag-a"));
    raws.push(a.recv_raw());
    b.write(&wire::typing(b"ag-a", true));
    raws.push(a.recv_raw());
    a.write(&wire::get_status(b"ag-b"));
    raws.push(a.recv_raw());
    a.write(&wire::fetch_prekeys(b"nobody"));
    raws.push(a.recv_raw());
    a.write(&wire::raw(0x30, &wire::l16(b"g")));
    raws.push(a.recv_raw());
    for (ours, raw) in &raws {
        match edge_decode_server(raw) {
            Ok(Some((theirs, n))) => {
                assert_eq!(n, raw.len(), "length of {ours:?}");
                assert!(same(ours, &theirs), "ours {ours:?} vs server's {theirs:?}");
            }
            other => panic!("server decoder on {:?}: {other:?}", Bytes(raw)),
        }
    }
}
